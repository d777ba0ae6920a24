"""Per-GPU memory and step throughput of a run, computed from its flags before any GPU is used.

``plan_run(config, world_size, hardware, shape=None) -> RunPlan`` takes the same
:class:`PretrainConfig` the pretraining entry point parses, and the sizes its validation
derives from it (``validation.RunShape``: layout, sequence length, global batch and its
ramp-up), and returns, per pipeline stage, the bytes one GPU holds at the full global batch:

* **weights** -- the parameters of the stage's layers on this TP/EP rank (embedding on the
  first stage, output layer and MTP on the last), 2 bytes each under ``--bf16``, else 4;
* **grads** -- megatron-core DDP's contiguous gradient buffer, fp32 (4 bytes per parameter:
  ``pretrain`` builds DDP with ``grad_reduce_in_fp32=True``), never sharded;
* **optimizer** -- AdamW: exp_avg + exp_avg_sq (8 bytes) plus an fp32 master copy under bf16
  (4 bytes); Muon matrices: momentum (4) plus the master copy. ``--use-distributed-optimizer``
  divides these by the data-parallel group that shards them (DP x CP for dense parameters,
  the expert-data-parallel group for experts; Muon shards whole parameters layer-wise, which
  averages to the same division);
* **activations** -- bytes saved for backward per token of each layer (derived term by term
  below, bf16, flash attention so no s x s matrix), times the tokens of one micro-batch on this
  rank (``micro_batch x seq / CP``), times the micro-batches in flight on that stage under
  1F1B (``min(m, p - stage)``; interleaved: megatron-core's warm-up count + 1 chunk passes),
  plus the logits and cross-entropy buffers on the last stage. Recomputation keeps only each
  recomputed unit's input and adds one unit's activations during its backward;
* a fixed **runtime reserve** (CUDA context, NCCL communicators, cuBLAS/TE workspaces,
  allocator fragmentation), stated in :class:`Hardware`.

A plan "fits" when every stage's total is within the GPU memory; ``check_fits`` raises
otherwise, naming the stage and the flags that reduce it. The weight/grad/optimizer formulas
are checked against the bytes megatron-core actually allocates for CPU tiny models
(tests/test_planner.py).

Throughput uses ``megatron_trillion.training.flops`` (model FLOPs, the MFU numerator) with
every sequence one full causal block -- an upper bound: XLDA blocks cut attention FLOPs.
Tokens/s at a stated MFU is ``MFU x peak x GPUs / FLOPs per token``. Hardware FLOPs (HFU) add
the forward recomputed under ``--recompute-granularity``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from megatron_trillion.errors import UserError
from megatron_trillion.models.presets import ModelPreset
from megatron_trillion.training.arguments import PretrainConfig

if TYPE_CHECKING:
    from megatron_trillion.training.validation import RunShape

GIB = 1024 ** 3


@dataclass(frozen=True)
class Hardware:
    """The GPU a plan is made for (default: H100 SXM 80 GB)."""

    memory_gib: float = 79.6
    """What the GPU reports (H100 SXM "80GB": 81,559 MiB in nvidia-smi)."""
    peak_tflops: float = 989.0
    """Dense BF16 TFLOP/s of one GPU (H100 SXM: 989)."""
    runtime_reserve_gib: float = 6.0
    """Not modelled tensor by tensor: CUDA context (~0.5 GiB), NCCL communicators and buffers
    (1-2 GiB), cuBLAS / Transformer Engine workspaces and allocator fragmentation."""


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of a run and the parameter groups they shard."""

    tensor: int
    pipeline: int
    virtual_pipeline: int
    context: int
    expert: int
    expert_tensor: int
    data: int
    """Data-parallel size (without CP)."""
    expert_data: int
    """Expert-data-parallel size: the group expert grads are reduced over."""
    sequence_parallel: bool

    @classmethod
    def of(cls, config: PretrainConfig, shape: RunShape, world_size: int) -> "Layout":
        """The layout of a validated run (``validation.run_shape``: the sizes divide)."""
        sizes = shape.parallel
        etp = sizes.expert_tensor or sizes.tensor
        return cls(tensor=sizes.tensor, pipeline=sizes.pipeline,
                   virtual_pipeline=sizes.virtual_pipeline or 1, context=sizes.context,
                   expert=sizes.expert, expert_tensor=etp, data=shape.data_parallel_size,
                   expert_data=world_size // (etp * sizes.expert * sizes.pipeline),
                   sequence_parallel=config.parallel.sequence_parallel)


# --------------------------------------------------------------------------------------------
# parameters per rank


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor on one rank, as megatron-core creates it."""

    numel: int
    group: str
    """"adam" (AdamW under either optimizer: embeddings, output, norms, router), "muon"
    (non-expert 2-D hidden matrices: Muon's under ``--optimizer muon``) or "expert"."""


@dataclass(frozen=True)
class RankParams:
    """Parameter counts one GPU holds, split by how they are sharded and optimised."""

    dense_adam: int = 0
    dense_muon: int = 0
    expert: int = 0

    @classmethod
    def of(cls, tensors: list) -> "RankParams":
        count = {"adam": 0, "muon": 0, "expert": 0}
        for tensor in tensors:
            count[tensor.group] += tensor.numel
        return cls(count["adam"], count["muon"], count["expert"])

    @property
    def total(self) -> int:
        return self.dense_adam + self.dense_muon + self.expert


def layer_tensors(p: ModelPreset, moe: bool, lay: Layout) -> list:
    """One decoder layer's parameter tensors on one TP/EP rank: norms and the router are
    replicated across TP, matrices split by TP, experts by EP and expert TP. The attention
    output gate is fused into ``linear_qkv`` (megatron-core's layout)."""
    h, d, nq, nkv, t = p.hidden_size, p.head_dim, p.num_attention_heads, p.query_groups, lay.tensor
    qkv_rows = (nq + 2 * nkv) * d + (nq * d if p.attention_output_gate else 0)
    out = [ParamTensor(h, "adam"), ParamTensor(qkv_rows * h // t, "muon"),
           ParamTensor(nq * d * h // t, "muon"), ParamTensor(h, "adam")]
    if p.qk_layernorm:
        out += [ParamTensor(d, "adam"), ParamTensor(d, "adam")]
    if p.sandwich_norm:
        out += [ParamTensor(h, "adam"), ParamTensor(h, "adam")]
    if not moe:
        f = p.ffn_hidden_size
        return out + [ParamTensor(2 * f * h // t, "muon"), ParamTensor(f * h // t, "muon")]
    out.append(ParamTensor(p.num_experts * h, "adam"))
    fe = p.moe_ffn_hidden_size // lay.expert_tensor
    for _ in range(p.num_experts // lay.expert):
        out += [ParamTensor(2 * fe * h, "expert"), ParamTensor(fe * h, "expert")]
    if p.moe_shared_expert_intermediate_size:
        fs = p.moe_shared_expert_intermediate_size
        out += [ParamTensor(2 * fs * h // t, "muon"), ParamTensor(fs * h // t, "muon")]
    return out


def mtp_tensors(p: ModelPreset, lay: Layout) -> list:
    """One MTP module: enorm, hnorm, the 2H -> H projection, a decoder layer like the last
    one, its final norm."""
    h = p.hidden_size
    return ([ParamTensor(h, "adam"), ParamTensor(h, "adam"),
             ParamTensor(2 * h * h // lay.tensor, "muon")]
            + layer_tensors(p, bool(p.moe_layer_pattern()[-1]), lay) + [ParamTensor(h, "adam")])


def stage_tensors(p: ModelPreset, lay: Layout, layers: list, first: bool, last: bool,
                  vocab: int) -> list:
    """Every parameter tensor of one pipeline stage's rank (``layers``: decoder layer ids)."""
    pattern = p.moe_layer_pattern()
    h, t = p.hidden_size, lay.tensor
    out = [ParamTensor(vocab * h // t, "adam")] if first else []
    for i in layers:
        out += layer_tensors(p, bool(pattern[i]), lay)
    if last:
        out.append(ParamTensor(h, "adam"))
        if p.untie_embeddings_and_output_weights:
            out.append(ParamTensor(vocab * h // t, "adam"))
        if not first and (p.mtp_num_layers or not p.untie_embeddings_and_output_weights):
            # The last stage keeps its own copy of the word embeddings when the output layer
            # is tied to them or MTP embeds the shifted tokens there.
            out.append(ParamTensor(vocab * h // t, "adam"))
        for _ in range(p.mtp_num_layers):
            out += mtp_tensors(p, lay)
    return out


def layer_wise_shards(tensors: list, ranks: int, state_bytes) -> list:
    """Per-rank optimizer bytes of megatron-core's LayerWiseDistributedOptimizer: whole
    tensors sorted by size, dealt to ranks 0..n-1, n-1..0, 0..n-1, ... (its ping-pong order)."""
    loop = list(range(ranks)) + list(range(ranks))[::-1]
    shards = [0.0] * ranks
    # Ties keep megatron-core's order: Muon's param groups come before AdamW's.
    for i, tensor in enumerate(sorted(tensors, key=lambda x: (x.numel, x.group == "adam"))):
        shards[loop[i % len(loop)]] += tensor.numel * state_bytes(tensor)
    return shards


def padded_vocab(p: ModelPreset, config: PretrainConfig, tensor: int) -> int:
    from megatron_trillion.models.vocab import padded_vocab_size

    return padded_vocab_size(p.vocab_size, config.model.make_vocab_size_divisible_by, tensor)


# --------------------------------------------------------------------------------------------
# activations per token


def layer_activation_bytes_per_token(p: ModelPreset, moe: bool, lay: Layout) -> float:
    """Bytes one decoder layer saves for backward per token of a micro-batch on this rank
    (before CP, which divides the tokens). bf16 tensors unless noted.

    Hidden-size tensors (split over TP only with sequence parallelism): the two norm inputs,
    the QKV and FC1 inputs (norm outputs), and under sandwich norm the two post-norm inputs.
    TP-split: Q, K, V as the attention kernel saves them, the attention output (projection
    input), the QK-norm inputs, the output gate's logits and pre-gate output, flash attention's
    fp32 log-sum-exp per head; SwiGLU FC1 output (2F) and its output (F). MoE: fp32 router
    logits and scores (2E), per routed copy (top-k, perfect balance) the dispatched input, FC1
    output (2Fe / expert TP), SwiGLU output (Fe / expert TP) and the expert output kept for the
    probability-weighted un-permute; the shared expert like a dense MLP of width Fs.
    """
    h, d, nq, nkv, t = p.hidden_size, p.head_dim, p.num_attention_heads, p.query_groups, lay.tensor
    sp = t if lay.sequence_parallel else 1
    hidden = 4 * h + (2 * h if p.sandwich_norm else 0)
    attention = (nq + 2 * nkv) * d + nq * d
    if p.qk_layernorm:
        attention += (nq + nkv) * d
    if p.attention_output_gate:
        attention += 2 * nq * d
    bytes_ = 2.0 * hidden / sp + 2.0 * attention / t + 4.0 * nq / t
    if not moe:
        return bytes_ + 2.0 * 3 * p.ffn_hidden_size / t
    k, fe = p.moe_router_topk, p.moe_ffn_hidden_size
    # MoE with TP requires sequence parallelism in megatron-core: each TP rank routes its own
    # sequence shard, so every MoE term is per SP-local token.
    routed = 4.0 * 2 * p.num_experts + 2.0 * k * (2 * h + 3 * fe / lay.expert_tensor)
    shared = 2.0 * 3 * (p.moe_shared_expert_intermediate_size or 0)
    return bytes_ + routed / t + shared / t


def layer_input_bytes_per_token(p: ModelPreset, lay: Layout) -> float:
    """What a fully recomputed layer keeps: its bf16 input (split by sequence parallelism)."""
    return 2.0 * p.hidden_size / (lay.tensor if lay.sequence_parallel else 1)


def head_activation_bytes_per_token(p: ModelPreset, lay: Layout, vocab: int) -> float:
    """The last stage's extra per token: final norm input and output, the bf16 logits and the
    fp32 softmax of vocab-parallel cross-entropy (both live at the loss), once for the model
    and once per MTP module (plus the MTP module's norms and 2H projection input/output)."""
    h, t = p.hidden_size, lay.tensor
    sp = t if lay.sequence_parallel else 1
    head = 2.0 * 2 * h / sp + 6.0 * vocab / t
    mtp = 2.0 * (2 * h + 2 * h + h + 2 * h) / sp + head
    return head + p.mtp_num_layers * mtp


# --------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class StageMemory:
    """Bytes one GPU of pipeline stage ``stage`` holds at its peak."""

    stage: int
    decoder_layers: int
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    in_flight_microbatches: float
    """Micro-batches (in units of this stage's layers) whose activations are held at once."""
    reserve: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.reserve


@dataclass(frozen=True)
class Throughput:
    flops_per_token: float
    """Model FLOPs (forward + backward) per trained token, full causal attention."""
    hardware_flops_per_token: float
    """Model FLOPs plus the recomputed forward."""
    tokens_per_step: int
    step_flops: float
    mfu: float
    tokens_per_second: float
    """Whole cluster at ``mfu``."""
    tokens_per_second_per_gpu: float
    step_seconds: float

    six_n_flops_per_token: float
    """6 x (active) parameters of the exported model: the FLOPs per token many reports
    (Trillion's included) count for MFU, without attention and MTP."""
    pipeline_bubble: float
    """Idle fraction of a 1F1B step, (p - 1) / (v m): time no MFU figure can recover."""

    @property
    def hfu(self) -> float:
        return self.mfu * self.hardware_flops_per_token / self.flops_per_token

    def gpu_hours(self, tokens: float) -> float:
        return tokens / self.tokens_per_second_per_gpu / 3600.0


@dataclass(frozen=True)
class RunPlan:
    preset: ModelPreset
    layout: Layout
    world_size: int
    hardware: Hardware
    shape: RunShape
    """The run's sizes (``validation.validate``): sequence length, global batch, ramp-up."""
    micro_batch_size: int
    microbatches_per_step: int
    """At the full global batch."""
    stages: list
    throughput: Throughput

    @property
    def seq_length(self) -> int:
        return self.shape.seq_length

    @property
    def global_batch_size(self) -> int:
        """The full (final) global batch size: the one planned for."""
        return self.shape.global_batch_size

    @property
    def rampup(self) -> tuple[int, int]:
        """(iterations, samples) at the start of the run below the full global batch."""
        from megatron_trillion.training.schedules import rampup_phase

        schedule = self.shape.batch_schedule
        return rampup_phase(schedule) if schedule is not None else (0, 0)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.hardware.memory_gib * GIB


def _bytes_per_param(config: PretrainConfig) -> tuple[int, int, int, int]:
    """(weight, grad, AdamW state, Muon state) bytes per parameter before sharding."""
    bf16 = config.training.bf16
    master = 4 if bf16 else 0
    return (2 if bf16 else 4), 4, master + 8, master + 4


def _in_flight(stage: int, pp: int, vpp: int, microbatches: int) -> float:
    """Micro-batches of this stage's layers held at once (megatron-core's schedules)."""
    if vpp == 1:
        return float(min(microbatches, pp - stage))
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    chunks = min(warmup + 1, microbatches * vpp)
    return chunks / vpp


def _stage_activations(config, p, lay, layers_moe, tokens, in_flight, vocab, last) -> float:
    train = config.training
    full = [layer_activation_bytes_per_token(p, bool(m), lay) for m in layers_moe]
    keep = layer_input_bytes_per_token(p, lay)
    if train.recompute_granularity == "full":
        n = train.recompute_num_layers or 1
        if train.recompute_method == "block":
            stored = sum(keep if i < n else a for i, a in enumerate(full))
            peak = sum(full[:n])
        else:  # uniform: every group of n layers keeps its input only
            stored = keep * math.ceil(len(full) / n)
            peak = max(sum(full[i:i + n]) for i in range(0, len(full), n)) if full else 0.0
        total = stored * in_flight + peak
    else:
        # selective recompute (megatron-core's default module: core attention) saves nothing
        # more under flash attention, which never materialises the s x s scores.
        total = sum(full) * in_flight
    if last:
        # The last stage runs each micro-batch's backward right after its forward: one in flight.
        mtp_layer = layer_activation_bytes_per_token(p, bool(p.moe_layer_pattern()[-1]), lay)
        total += head_activation_bytes_per_token(p, lay, vocab) + p.mtp_num_layers * mtp_layer
    return total * tokens


def _optimizer_bytes(config, tensors, params, lay, adam_b, muon_b) -> float:
    """Optimizer bytes on the most loaded rank of this stage's data-parallel groups."""
    distributed = config.parallel.use_distributed_optimizer
    dense_ranks = lay.data * lay.context if distributed else 1
    expert_ranks = lay.expert_data if distributed else 1
    if config.optimizer.optimizer != "muon":
        # DistributedOptimizer: contiguous buckets split evenly over the group.
        return ((params.dense_adam + params.dense_muon) * adam_b / dense_ranks
                + params.expert * adam_b / expert_ranks)

    def state_bytes(tensor):
        return adam_b if tensor.group == "adam" else muon_b

    if not distributed:
        return float(sum(x.numel * state_bytes(x) for x in tensors))
    # Muon shards whole tensors (layer-wise): the largest shard, not the average, is the peak.
    dense = [x for x in tensors if x.group != "expert"]
    experts = [x for x in tensors if x.group == "expert"]
    return (max(layer_wise_shards(dense, dense_ranks, state_bytes))
            + (max(layer_wise_shards(experts, expert_ranks, state_bytes)) if experts else 0.0))


def plan_memory(config: PretrainConfig, p: ModelPreset, lay: Layout, seq_length: int,
                microbatches: int, hardware: Hardware) -> list[StageMemory]:
    pp, vpp = lay.pipeline, lay.virtual_pipeline
    vocab = padded_vocab(p, config, lay.tensor)
    pattern = p.moe_layer_pattern()
    per_chunk = p.num_layers // (pp * vpp)
    tokens = config.batch.micro_batch_size * seq_length / lay.context
    w_b, g_b, adam_b, muon_b = _bytes_per_param(config)
    stages = []
    for stage in range(pp):
        layers = [i for chunk in range(vpp) for i in range(
            (chunk * pp + stage) * per_chunk, (chunk * pp + stage + 1) * per_chunk)]
        first, last = stage == 0, stage == pp - 1
        tensors = stage_tensors(p, lay, layers, first, last, vocab)
        params = RankParams.of(tensors)
        optimizer = _optimizer_bytes(config, tensors, params, lay, adam_b, muon_b)
        in_flight = _in_flight(stage, pp, vpp, microbatches)
        activations = _stage_activations(config, p, lay, [pattern[i] for i in layers], tokens,
                                         in_flight, vocab, last)
        stages.append(StageMemory(
            stage=stage, decoder_layers=len(layers), params=params.total,
            weights=params.total * w_b, grads=params.total * g_b, optimizer=optimizer,
            activations=activations, in_flight_microbatches=in_flight,
            reserve=hardware.runtime_reserve_gib * GIB))
    return stages


def plan_throughput(config: PretrainConfig, p: ModelPreset, lay: Layout, world_size: int,
                    seq: int, global_batch: int, microbatches: int, hardware: Hardware,
                    mfu: float) -> Throughput:
    from megatron_trillion.training.flops import causal_pairs, training_flops

    per_sequence = training_flops(p, [[seq]])
    flops_per_token = per_sequence / seq
    recompute = 0.0
    train = config.training
    if train.recompute_granularity == "full":
        n = train.recompute_num_layers or 1
        fraction = 1.0 if train.recompute_method != "block" else min(
            1.0, n * config.parallel.pipeline_model_parallel_size / p.num_layers)
        # The decoder's forward: training FLOPs of the decoder alone (no output layer, no MTP)
        # over 3 (one forward, two backward products).
        decoder = dataclasses.replace(p, vocab_size=0, mtp_num_layers=0)
        recompute = fraction * training_flops(decoder, [[seq]]) / 3.0 / seq
    elif train.recompute_granularity == "selective":
        d_attn = p.num_attention_heads * p.head_dim
        recompute = 4.0 * d_attn * causal_pairs([seq]) * p.num_layers / seq
    from megatron_trillion.models.param_count import count_parameters

    tokens = global_batch * seq
    cluster = mfu * hardware.peak_tflops * 1e12 * world_size
    tps = cluster / flops_per_token
    return Throughput(
        flops_per_token=flops_per_token, hardware_flops_per_token=flops_per_token + recompute,
        tokens_per_step=tokens, step_flops=per_sequence * global_batch, mfu=mfu,
        tokens_per_second=tps, tokens_per_second_per_gpu=tps / world_size,
        step_seconds=tokens / tps, six_n_flops_per_token=6.0 * count_parameters(p).active,
        pipeline_bubble=(lay.pipeline - 1) / (lay.virtual_pipeline * max(microbatches, 1)))


def plan_run(config: PretrainConfig, world_size: int, hardware: Hardware = Hardware(),
             mfu: float = 0.4, preset: Optional[ModelPreset] = None,
             shape: Optional[RunShape] = None) -> RunPlan:
    """The memory and throughput plan of ``config`` on ``world_size`` GPUs of ``hardware``,
    for the full global batch (the steps of a batch ramp-up hold fewer micro-batches).

    ``shape``: the run's sizes as ``validation.validate`` returns them; without it they come
    from ``validation.run_shape``, which raises ConfigError (a UserError) listing what does
    not fit together. The data, kernel and other flag checks of ``validate`` are not made here:
    a plan is for a run on another machine."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if preset is None:
        from megatron_trillion.training.model_flags import resolve_model

        # Without --preset the flags define the model; its vocabulary is --vocab-size.
        preset = resolve_model(config.model, vocab_size=None if config.model.preset
                               else config.data.vocab_size)
    from megatron_trillion.training.validation import context_parallel_errors, run_shape

    if shape is None:
        shape = run_shape(config, preset, world_size)
    # Planned runs are GPU runs: context parallelism there is TE's (THD: p2p ring only).
    unsupported = context_parallel_errors(config, preset, transformer_engine_available=True)
    if unsupported:
        raise UserError("; ".join(unsupported))
    lay = Layout.of(config, shape, world_size)
    micro = config.batch.micro_batch_size
    microbatches = shape.global_batch_size // (micro * lay.data)
    stages = plan_memory(config, preset, lay, shape.seq_length, microbatches, hardware)
    throughput = plan_throughput(config, preset, lay, world_size, shape.seq_length,
                                 shape.global_batch_size, microbatches, hardware, mfu)
    return RunPlan(preset=preset, layout=lay, world_size=world_size, hardware=hardware,
                   shape=shape, micro_batch_size=micro, microbatches_per_step=microbatches,
                   stages=stages, throughput=throughput)


class DoesNotFitError(ValueError):
    pass


def check_fits(plan: RunPlan) -> None:
    """Raise :class:`DoesNotFitError` when a stage needs more than the GPU's memory."""
    if plan.fits:
        return
    s = plan.peak
    raise DoesNotFitError(
        f"pipeline stage {s.stage} needs {s.total / GIB:.1f} GiB per GPU, more than "
        f"{plan.hardware.memory_gib:g} GiB (weights {s.weights / GIB:.1f}, grads "
        f"{s.grads / GIB:.1f}, optimizer {s.optimizer / GIB:.1f}, activations "
        f"{s.activations / GIB:.1f}, reserve {s.reserve / GIB:.1f}); reduce it with "
        "--use-distributed-optimizer, a larger --tensor-model-parallel-size (with "
        "--sequence-parallel) / --pipeline-model-parallel-size / --expert-model-parallel-size, "
        "a smaller --micro-batch-size, or --recompute-granularity full")


# --------------------------------------------------------------------------------------------
# report


def format_plan(plan: RunPlan, train_tokens: Optional[float] = None) -> str:
    lay, t = plan.layout, plan.throughput
    lines = [
        f"{plan.preset.name} on {plan.world_size} GPUs ({plan.hardware.memory_gib:g} GiB, "
        f"{plan.hardware.peak_tflops:g} TFLOP/s peak): TP {lay.tensor}"
        f"{' (SP)' if lay.sequence_parallel else ''} x PP {lay.pipeline}"
        + (f" (VPP {lay.virtual_pipeline})" if lay.virtual_pipeline > 1 else "")
        + f" x CP {lay.context} x DP {lay.data}"
        + (f"; EP {lay.expert} x expert-TP {lay.expert_tensor} x expert-DP {lay.expert_data}"
           if plan.preset.is_moe else ""),
        f"seq {plan.seq_length}, micro-batch {plan.micro_batch_size}, global batch "
        f"{plan.global_batch_size} ({plan.global_batch_size * plan.seq_length / 1e6:.2f}M "
        f"tokens), {plan.microbatches_per_step} micro-batches per step per DP rank",
        *_rampup_lines(plan),
        "",
        "per-GPU memory (GiB)",
        f"{'stage':>5} {'layers':>6} {'params':>9} {'weights':>8} {'grads':>7} "
        f"{'optim':>7} {'activ':>7} {'in-flight':>9} {'reserve':>7} {'total':>7}",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.stage:>5} {s.decoder_layers:>6} {s.params / 1e9:>8.2f}B "
            f"{s.weights / GIB:>8.2f} {s.grads / GIB:>7.2f} {s.optimizer / GIB:>7.2f} "
            f"{s.activations / GIB:>7.2f} {s.in_flight_microbatches:>9.2f} "
            f"{s.reserve / GIB:>7.2f} {s.total / GIB:>7.2f}")
    peak = plan.peak
    lines += [
        f"peak: stage {peak.stage}, {peak.total / GIB:.1f} of {plan.hardware.memory_gib:g} GiB "
        + ("-> fits" if plan.fits else "-> DOES NOT FIT"),
        "",
        f"step: {t.step_flops / 1e15:.1f} PFLOP (model, full-causal attention), "
        f"{t.flops_per_token / 1e9:.2f} GFLOP/token, "
        f"HFU/MFU {t.hardware_flops_per_token / t.flops_per_token:.3f}",
        f"at {t.mfu:.1%} MFU ({t.hfu:.1%} HFU): {t.tokens_per_second / 1e6:.2f}M tokens/s, "
        f"{t.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, {t.step_seconds:.2f} s/step",
        f"the same throughput counted as 6N FLOPs/token ({t.six_n_flops_per_token / 1e9:.2f} "
        f"GFLOP): {t.mfu * t.six_n_flops_per_token / t.flops_per_token:.1%} MFU",
    ]
    if plan.layout.pipeline > 1:
        lines.append(f"pipeline bubble (p-1)/(v m): {t.pipeline_bubble:.1%} of each step idle "
                     f"on every GPU; the busy time must run at "
                     f"{t.mfu / (1 - t.pipeline_bubble):.1%} MFU to average {t.mfu:.1%}")
    if train_tokens:
        lines.append(f"{_tokens(train_tokens)} tokens: {t.gpu_hours(train_tokens) / 1e3:.1f}K "
                     f"GPU hours, {t.gpu_hours(train_tokens) / plan.world_size / 24:.1f} days")
    return "\n".join(lines)


def _rampup_lines(plan: RunPlan) -> list[str]:
    """What a batch ramp-up (--rampup-batch-size, --step-batch-size-schedule) does."""
    iterations, samples = plan.rampup
    if not iterations:
        return []
    start = plan.shape.batch_schedule.global_batch_size_at(0)
    share = (f", {samples / plan.shape.train_samples:.2%} of the run"
             if plan.shape.train_samples > 0 else "")
    return [f"batch ramp-up: the global batch grows from {start} to {plan.global_batch_size} "
            f"over the first {iterations:,} iterations ({samples:,} samples, "
            f"{_tokens(samples * plan.seq_length)} tokens{share}); memory and step time "
            "here are for the full batch (ramp-up steps hold fewer micro-batches)"]


def _tokens(tokens: float) -> str:
    return f"{tokens / 1e12:.2f}T" if tokens >= 1e11 else f"{tokens / 1e9:.3g}B"


def required_mfu(flops_per_token: float, tokens: float, gpu_hours: float,
                 peak_tflops: float) -> float:
    """The MFU at which ``tokens`` take ``gpu_hours`` (e.g. a published run's budget)."""
    return tokens * flops_per_token / (gpu_hours * 3600.0 * peak_tflops * 1e12)


__all__ = ["Hardware", "Layout", "RankParams", "StageMemory", "Throughput", "RunPlan",
           "DoesNotFitError", "plan_run", "plan_memory", "plan_throughput", "check_fits",
           "format_plan", "required_mfu", "ParamTensor", "layer_tensors", "mtp_tensors",
           "stage_tensors", "layer_wise_shards",
           "layer_activation_bytes_per_token", "GIB"]
