"""Up-front validation of a whole run, before any process group exists.

Every conflict is collected and reported at once, each naming the flags involved, so a user
fixes a configuration in one round instead of one crash per conflict on a 256-GPU allocation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from megatron_trillion.data.attention_blocks import MASKING_NONE, MASKING_XLDA, SCOPE_PAIR
from megatron_trillion.errors import UserError
from megatron_trillion.models.presets import ModelPreset
from megatron_trillion.platform.distributed import ParallelSizes, validate_parallel_sizes
from megatron_trillion.posttraining.grpo_setup import grpo_config_errors
from megatron_trillion.training.arguments import BatchArgs, PretrainConfig
from megatron_trillion.training.model_flags import model_flag_errors, preset_field_flag
from megatron_trillion.training.schedules import (
    BatchSizeRampup,
    BatchSizeSchedule,
    StepBatchSizeSchedule,
    iterations_for_samples,
    samples_for_iterations,
)

if TYPE_CHECKING:
    from megatron_trillion.training.data import DataSplits


class ConfigError(UserError):
    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration (%d problem%s):\n  - %s" % (
            len(errors), "" if len(errors) == 1 else "s", "\n  - ".join(errors)))


@dataclass(frozen=True)
class RunShape:
    """Sizes derived from the flags and the world size."""

    parallel: ParallelSizes
    data_parallel_size: int
    global_batch_size: int
    train_samples: int
    train_iters: int
    seq_length: int
    lr_decay_samples: int
    """Length of the learning-rate schedule in samples (--lr-decay-iters/-samples, else the
    run's length)."""
    lr_warmup_samples: int
    batch_schedule: Optional[BatchSizeSchedule] = None
    """The global batch size of each iteration (``global_batch_size`` is the final one)."""


# --------------------------------------------------------------------------------------------
# sizes: each computed here once (the planner takes them through RunShape)


def virtual_pipeline_stages(num_layers: int, pipeline: int,
                            layers_per_virtual_stage: Optional[int]) -> Optional[int]:
    """Model chunks per pipeline stage under --num-layers-per-virtual-pipeline-stage (None
    without the flag)."""
    if not layers_per_virtual_stage:
        return None
    per_stage = num_layers // max(pipeline, 1)
    return max(1, per_stage // layers_per_virtual_stage)


def parallel_sizes(config: PretrainConfig, num_layers: int) -> ParallelSizes:
    p = config.parallel
    return ParallelSizes(
        tensor=p.tensor_model_parallel_size, pipeline=p.pipeline_model_parallel_size,
        virtual_pipeline=virtual_pipeline_stages(num_layers, p.pipeline_model_parallel_size,
                                                 p.num_layers_per_virtual_pipeline_stage),
        expert=p.expert_model_parallel_size, context=p.context_parallel_size,
        expert_tensor=p.expert_tensor_parallel_size,
    )


def data_parallel_size(sizes: ParallelSizes, world_size: int) -> int:
    """What the world size leaves to data parallelism (1 for a layout that does not divide
    it, which the layout checks report)."""
    mp = sizes.model_parallel()
    return sizes.data_parallel(world_size) if mp > 0 and world_size % mp == 0 else 1


def default_global_batch_size(batch: BatchArgs, data_parallel_size: int) -> int:
    """--global-batch-size, else Megatron-LM's default: one micro-batch per data-parallel
    rank."""
    return batch.global_batch_size or batch.micro_batch_size * data_parallel_size


# --------------------------------------------------------------------------------------------
# the checks, by group


def validate(config: PretrainConfig, preset: ModelPreset, world_size: int,
             transformer_engine_available: bool) -> RunShape:
    """Return the run's derived sizes or raise :class:`ConfigError` listing every problem."""
    te = transformer_engine_available
    shape, errors = _run_shape(config, preset, world_size)
    splits, source_errors = _data_sources(config)
    errors += (_model_errors(config, preset)
               + _parallel_flag_errors(config, preset, te)
               + _precision_errors(config, te)
               + _lr_schedule_errors(config, shape)
               + source_errors
               + _data_flag_errors(config)
               + (_sft_errors(config) if config.kind != "pretraining"
                  else _blend_errors(config, splits))
               + _dpo_errors(config)
               + grpo_config_errors(config)
               + kernel_errors(config, te)
               + _interval_errors(config)
               + _checkpoint_errors(config)
               + _output_dir_errors(config)
               + _eval_errors(config, splits))
    if errors:
        raise ConfigError(errors)
    return shape


def run_shape(config: PretrainConfig, preset: ModelPreset, world_size: int) -> RunShape:
    """The sizes of :func:`validate` alone (what the planner needs, for a run on any machine):
    raises :class:`ConfigError` listing the problems of the parallel layout, the batch sizes
    and the run and schedule lengths; data, kernels and the other flags are not checked."""
    shape, errors = _run_shape(config, preset, world_size)
    if errors:
        raise ConfigError(errors)
    return shape


def _run_shape(config: PretrainConfig, preset: ModelPreset,
               world_size: int) -> tuple[RunShape, list[str]]:
    """The sizes, and what is wrong with them (they mean nothing while that is not empty)."""
    sizes = parallel_sizes(config, preset.num_layers)
    dp = data_parallel_size(sizes, world_size)
    seq_length = config.model.seq_length or preset.seq_length
    schedule, batch_errors = _batch_schedule(config, dp, seq_length)
    global_batch = (schedule.global_batch_size if schedule is not None
                    else default_global_batch_size(config.batch, dp))
    train_samples, train_iters, length_errors = _run_length(config, schedule, global_batch)
    decay_samples, warmup_samples, lr_length_errors = _lr_schedule_samples(
        config, global_batch, train_samples)
    errors = (_parallel_size_errors(config, preset, sizes, world_size, seq_length)
              + batch_errors + _interleaving_errors(config, sizes, schedule)
              + length_errors + lr_length_errors)
    shape = RunShape(parallel=sizes, data_parallel_size=dp, global_batch_size=global_batch,
                     train_samples=train_samples, train_iters=train_iters,
                     seq_length=seq_length, lr_decay_samples=decay_samples,
                     lr_warmup_samples=warmup_samples, batch_schedule=schedule)
    return shape, errors


def _parallel_size_errors(config: PretrainConfig, preset: ModelPreset, sizes: ParallelSizes,
                          world_size: int, seq_length: int) -> list[str]:
    """The layout against the world size, the model and the sequence length."""
    par = config.parallel
    pp, tp, cp = (par.pipeline_model_parallel_size, par.tensor_model_parallel_size,
                  par.context_parallel_size)
    errors = validate_parallel_sizes(sizes, world_size, **preset.layout_dims())
    per_virtual_stage = par.num_layers_per_virtual_pipeline_stage
    if per_virtual_stage:
        per_stage = preset.num_layers // max(pp, 1)
        if per_stage % per_virtual_stage:
            errors.append(
                f"--num-layers ({preset.num_layers}) / --pipeline-model-parallel-size "
                f"({pp}) = {per_stage} layers per stage is not divisible by "
                f"--num-layers-per-virtual-pipeline-stage ({per_virtual_stage})")
        if pp < 2:
            errors.append("--num-layers-per-virtual-pipeline-stage needs "
                          "--pipeline-model-parallel-size >= 2")
    if par.sequence_parallel and tp < 2:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size >= 2")
    if seq_length < 2:
        errors.append(f"--seq-length must be >= 2, got {seq_length}")
    if par.sequence_parallel and seq_length % tp:
        errors.append(f"--seq-length ({seq_length}) must be divisible by "
                      f"--tensor-model-parallel-size ({tp}) with --sequence-parallel")
    if cp > 1 and seq_length % (2 * cp):
        errors.append(f"--seq-length ({seq_length}) must be divisible by 2 x "
                      f"--context-parallel-size ({2 * cp}) (load-balanced CP chunks)")
    return errors


def _batch_schedule(config: PretrainConfig, data_parallel: int,
                    seq_length: int) -> tuple[Optional[BatchSizeSchedule], list[str]]:
    """The global batch size of each iteration (None when its flags are wrong) and what is
    wrong with them."""
    batch = config.batch
    errors = []
    if batch.micro_batch_size < 1:
        errors.append(f"--micro-batch-size must be >= 1, got {batch.micro_batch_size}")
    micro = max(batch.micro_batch_size, 1)
    if batch.step_batch_size_schedule:
        errors += [f"--step-batch-size-schedule sets the global batch size: drop {flag_text}"
                   for flag_text, value in (("--global-batch-size", batch.global_batch_size),
                                            ("--rampup-batch-size", batch.rampup_batch_size))
                   if value is not None]
    try:
        if batch.step_batch_size_schedule:
            schedule = StepBatchSizeSchedule.from_flag(
                batch.step_batch_size_schedule, max(seq_length, 1), micro, data_parallel,
                check=False)
        else:
            schedule = BatchSizeRampup.from_flag(
                batch.rampup_batch_size, default_global_batch_size(batch, data_parallel),
                micro, data_parallel, check=False)
    except ValueError as exc:  # the flag's values do not parse (one message naming it)
        return None, errors + [str(exc)]
    problems = schedule.errors()
    return (None if problems else schedule), errors + problems


def _interleaving_errors(config: PretrainConfig, sizes: ParallelSizes,
                         schedule: Optional[BatchSizeSchedule]) -> list[str]:
    """Interleaved pipelining runs the micro-batches of a step in groups of the pipeline size."""
    pp = config.parallel.pipeline_model_parallel_size
    if not (sizes.virtual_pipeline and sizes.virtual_pipeline > 1) or schedule is None:
        return []
    smallest = schedule.num_microbatches_at(0)
    if smallest % pp:
        return [f"interleaved pipelining needs the number of micro-batches per step "
                f"({smallest} at the start) to be a multiple of "
                f"--pipeline-model-parallel-size ({pp})"]
    return []


def _run_length(config: PretrainConfig, schedule: Optional[BatchSizeSchedule],
                global_batch: int) -> tuple[int, int, list[str]]:
    """(samples, iterations) of the run, from --train-iters or --train-samples."""
    train, batch = config.training, config.batch
    if (train.train_iters is None) == (train.train_samples is None):
        return 0, 0, ["give exactly one of --train-iters and --train-samples"]
    errors = []
    if train.train_iters is not None:
        if batch.rampup_batch_size:
            errors.append("--rampup-batch-size counts samples: use --train-samples, "
                          "not --train-iters")
        iters = train.train_iters
        samples = (samples_for_iterations(schedule, iters)
                   if batch.step_batch_size_schedule and schedule else iters * global_batch)
        given = iters
    else:
        samples = given = train.train_samples
        iters = iterations_for_samples(schedule, samples) if schedule else 0
    if given <= 0:
        errors.append("--train-iters / --train-samples must be positive")
    return samples, iters, errors


def _lr_schedule_samples(config: PretrainConfig, global_batch: int,
                         train_samples: int) -> tuple[int, int, list[str]]:
    """(schedule length, warmup length) in samples, as Megatron-LM computes them, and the
    problems of their flags: the schedule spans --lr-decay-samples, or --lr-decay-iters x the
    global batch, or the whole run; the warmup is --lr-warmup-fraction of that, or
    --lr-warmup-samples, or --lr-warmup-iters x the global batch. (Megatron-LM only pairs
    *-iters with --train-iters; either unit works here.) An explicit schedule length is what
    lets a run be extended unchanged."""
    sched = config.schedule
    errors = []
    for kind, iters, samples in (("decay", sched.lr_decay_iters, sched.lr_decay_samples),
                                 ("warmup", sched.lr_warmup_iters or None,
                                  sched.lr_warmup_samples or None)):
        if iters is not None and samples is not None:
            errors.append(f"give one of --lr-{kind}-iters and --lr-{kind}-samples")
    for flag_text, value in (("--lr-decay-iters", sched.lr_decay_iters),
                             ("--lr-decay-samples", sched.lr_decay_samples)):
        if value is not None and value <= 0:
            errors.append(f"{flag_text} must be positive, got {value}")
    for flag_text, value in (("--lr-warmup-iters", sched.lr_warmup_iters),
                             ("--lr-warmup-samples", sched.lr_warmup_samples)):
        if value < 0:
            errors.append(f"{flag_text} must be >= 0, got {value}")
    if sched.lr_decay_samples is not None:
        decay = sched.lr_decay_samples
    elif sched.lr_decay_iters is not None:
        decay = sched.lr_decay_iters * global_batch
    else:
        decay = train_samples
    warmup = sched.lr_warmup_samples or sched.lr_warmup_iters * global_batch
    if sched.lr_warmup_fraction is not None:
        if sched.lr_warmup_iters or sched.lr_warmup_samples:
            errors.append("give one of --lr-warmup-fraction and --lr-warmup-iters/-samples")
        if not 0.0 <= sched.lr_warmup_fraction <= 1.0:
            errors.append(f"--lr-warmup-fraction must be in [0, 1], got "
                          f"{sched.lr_warmup_fraction}")
        warmup = int(sched.lr_warmup_fraction * (decay or 0))
    return max(decay or 0, 0), max(warmup, 0), errors


def _lr_schedule_errors(config: PretrainConfig, shape: RunShape) -> list[str]:
    """The learning-rate schedule the run will build (its lengths: ``_lr_schedule_samples``)."""
    from megatron_trillion.training.build import lr_schedule_config

    sched = config.schedule
    errors = []
    if shape.lr_decay_samples > 0:
        errors += lr_schedule_config(config, shape, check=False).errors()
    if sched.override_opt_param_scheduler and sched.use_checkpoint_opt_param_scheduler:
        errors.append("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                      "are mutually exclusive")
    return errors


def _model_errors(config: PretrainConfig, preset: ModelPreset) -> list[str]:
    """The preset's own consistency (``pretrain`` resolves the preset unchecked so these join
    the other errors), the architecture flags, vocabulary padding, RoPE and MoE sizes."""
    model = config.model
    errors = [f"--preset {preset.name}: {problem}"
              for problem in preset.errors(preset_field_flag)]
    errors += model_flag_errors(model, preset)
    # vocabulary padding: the padded vocabulary is split over TP ranks
    if model.make_vocab_size_divisible_by < 1:
        errors.append(f"--make-vocab-size-divisible-by must be >= 1, got "
                      f"{model.make_vocab_size_divisible_by}")
    if config.data.vocab_size is not None and config.data.vocab_size < 1:
        errors.append(f"--vocab-size must be >= 1, got {config.data.vocab_size}")
    # RoPE. --seq-length also sets the preset's seq_length, which is GPTModel's
    # max_sequence_length (the positions RoPE is built for), so the two cannot disagree.
    if preset.num_attention_heads > 0 and preset.head_dim % 2:
        errors.append(f"RoPE rotates pairs of channels: the head dimension ({preset.head_dim} "
                      f"= --hidden-size {preset.hidden_size} / --num-attention-heads "
                      f"{preset.num_attention_heads}) must be even")
    if preset.rotary_base <= 0:
        errors.append(f"--rotary-base must be > 0, got {preset.rotary_base}")
    # MoE sizes (topk <= experts: the preset's own check; EP | experts: the layout's)
    if preset.num_experts is None:
        if model.moe_router_topk is not None:
            errors.append(f"--moe-router-topk is set but --preset {preset.name} is dense "
                          "(give --num-experts or a MoE preset)")
    elif preset.num_experts < 1:
        errors.append(f"--num-experts must be >= 1, got {preset.num_experts}")
    return errors


def _parallel_flag_errors(config: PretrainConfig, preset: ModelPreset,
                          te_available: bool) -> list[str]:
    """Parallelism flags beyond the sizes: overlap and what context parallelism can run."""
    par = config.parallel
    errors = context_parallel_errors(config, preset, te_available)
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        errors.append("--overlap-param-gather needs --use-distributed-optimizer")
    if config.optimizer.optimizer == "muon" and par.overlap_param_gather:
        errors.append("--overlap-param-gather is not supported with --optimizer muon")
    return errors


def _precision_errors(config: PretrainConfig, te_available: bool) -> list[str]:
    train = config.training
    errors = []
    if train.fp8_format and not te_available:
        errors.append("--fp8-format needs Transformer Engine (GPU image); it is not installed")
    if config.model.transformer_impl == "transformer_engine" and not te_available:
        errors.append("--transformer-impl transformer_engine: Transformer Engine is not installed")
    if train.fp8_format and not train.bf16:
        errors.append("--fp8-format needs --bf16")
    return errors


def _data_sources(config: PretrainConfig) -> tuple[Optional[DataSplits], list[str]]:
    """The train/valid/test sources (None for --mock-data or when they are wrong) and the
    problems."""
    from megatron_trillion.training.data import resolve_data_splits

    data = config.data
    if data.mock_data:
        if data.data_path or data.data_args_path or data.train_data_path:
            return None, ["--mock-data replaces --data-path/--data-args-path/"
                          "--train-data-path: give one"]
        return None, []
    try:
        return resolve_data_splits(data), []
    except ValueError as exc:  # a UserError naming the flag and the file
        return None, [str(exc)]


def _data_flag_errors(config: PretrainConfig) -> list[str]:
    """The data flags one by one (the sources they name: ``_data_sources``)."""
    from megatron_trillion.training.data import parse_data_path, parse_lang_beta

    data = config.data
    errors = []
    if config.anneal.anneal_data_path:
        try:
            parse_data_path(config.anneal.anneal_data_path, "--anneal-data-path")
        except ValueError as exc:  # one message naming the flag and the file
            errors.append(str(exc))
    try:
        parse_lang_beta(data.lang_beta)
    except ValueError as exc:  # one message naming the flag
        errors.append(str(exc))
    if data.num_workers < 0:
        errors.append(f"--num-workers must be >= 0, got {data.num_workers}")
    if data.xlda_block_scope != SCOPE_PAIR and data.attention_masking != MASKING_XLDA:
        errors.append(f"--xlda-block-scope {data.xlda_block_scope} applies to "
                      f"--attention-masking {MASKING_XLDA} only (got {data.attention_masking})")
    if not 0.0 <= data.xlda_mixing_prob <= 1.0:
        errors.append(f"--xlda-mixing-prob must be in [0, 1], got {data.xlda_mixing_prob}")
    if data.lang_alpha is not None and not 0.0 <= data.lang_alpha <= 1.0:
        errors.append(f"--lang-alpha must be in [0, 1], got {data.lang_alpha}")
    if not data.mock_data and data.tokenizer_type != "NullTokenizer" and not (
            data.tokenizer_model or data.vocab_file):
        errors.append(f"--tokenizer-type {data.tokenizer_type} needs --tokenizer-model "
                      "(or --vocab-file/--merge-file for GPT2BPETokenizer)")
    if not (data.sft or data.dpo or data.grpo) and data.chat_template:
        errors.append("--chat-template needs --sft, --dpo or --grpo")
    if not data.sft and data.sft_overlong_conversations != "truncate":
        errors.append("--sft-overlong-conversations needs --sft")
    return errors


def context_parallel_errors(config: PretrainConfig, preset: ModelPreset,
                             transformer_engine_available: bool) -> list[str]:
    """Context parallelism over packed (THD) sequences: what Transformer Engine cannot run.

    Every batch here is THD (attention blocks as cu_seqlens). TE's THD context parallelism is
    only its p2p (ring) implementation - megatron-core's default ``cp_comm_type`` - and that
    implementation has no sliding window; FP8 attention has no THD path at all (FP8 GEMMs are
    fine: their tokens are padded to multiples of 16 per rank). The CPU attention
    (``XLDACoreAttention``) supports all of these."""
    from megatron_trillion.models.specs import TRANSFORMER_IMPLS

    cp = config.parallel.context_parallel_size
    if cp < 2:
        return []
    impl = config.model.transformer_impl
    uses_te = impl == "transformer_engine" or (impl == "auto" and transformer_engine_available)
    if impl not in TRANSFORMER_IMPLS or not uses_te:
        return []
    errors = []
    if preset.sliding_window is not None:
        errors.append(
            f"--context-parallel-size {cp} with --preset {preset.name}'s sliding-window "
            f"attention ({preset.sliding_window} tokens): Transformer Engine's context "
            "parallelism for packed (THD) sequences is its p2p ring, which has no sliding "
            "window (its all-gather and a2a variants have no THD); use "
            "--context-parallel-size 1 or --transformer-impl local")
    return errors


def _blend_errors(config: PretrainConfig, splits: Optional[DataSplits]) -> list[str]:
    """The language mixture must refer to languages that the data has."""
    from megatron_trillion.training.data import MOCK_LANGUAGES, parse_lang_beta

    data = config.data
    errors: list[str] = []
    try:
        beta = parse_lang_beta(data.lang_beta)
    except ValueError:
        return errors  # reported by _data_flag_errors
    if data.mock_data:
        languages = sorted(MOCK_LANGUAGES)
        weights = []
    elif splits is not None:
        languages = sorted({source.language for source in splits.train})
        weights = [source.weight for source in splits.train]
    else:
        return errors
    if any(w is not None and w <= 0 for w in weights):
        errors.append("--data-path weights must be > 0, got "
                      + " ".join(str(w) for w in weights if w is not None))
    if beta:
        unknown = sorted(set(beta) - set(languages))
        if unknown:
            errors.append(f"--lang-beta names languages {unknown} that no --data-path dataset "
                          f"has (languages: {languages})")
        missing = sorted(set(languages) - set(beta))
        if missing:
            errors.append(f"--lang-beta has no value for languages {missing} (give one per "
                          f"--data-path language: {languages})")
        total = sum(beta.values())
        if abs(total - 1.0) > 1e-6 or any(v < 0 for v in beta.values()):
            errors.append(f"--lang-beta values must be >= 0 and sum to 1, got {total:g}")
    # With one language there is nothing to mix: training uses document blocks (pretrain says
    # so); with several, cross-lingual sequences are built around the anchor.
    if data.attention_masking == MASKING_XLDA and data.xlda_mixing_prob > 0 and \
            len(languages) > 1 and data.anchor_language not in languages:
        errors.append(f"--anchor-language {data.anchor_language} is not among the "
                      f"--data-path languages {languages} (needed for --xlda-mixing-prob > 0)")
    return errors


def kernel_errors(config: PretrainConfig, te_available: bool) -> list[str]:
    """Kernel and precision flags whose kernel (Transformer Engine, CUDA) is missing here, or
    whose other precondition does not hold."""
    import torch

    errors: list[str] = []
    kernels, train, par = config.kernels, config.training, config.parallel
    cuda = torch.cuda.is_available()
    if kernels.attention_backend == "local" and te_available and \
            config.model.transformer_impl != "local":
        errors.append("--attention-backend local turns Transformer Engine's attention off: "
                      "add --transformer-impl local (Megatron-LM: --spec local)")
    if kernels.apply_rope_fusion and not te_available:
        errors.append("--apply-rope-fusion needs Transformer Engine's fused RoPE (GPU image); "
                      "drop it (it is on by default where TE is installed)")
    if kernels.cross_entropy_loss_fusion and kernels.cross_entropy_fusion_impl == "te" and \
            not te_available:
        errors.append("--cross-entropy-fusion-impl te needs Transformer Engine; use "
                      "--cross-entropy-fusion-impl native (megatron-core's, runs anywhere)")
    if kernels.moe_grouped_gemm and not te_available:
        errors.append("--moe-grouped-gemm needs Transformer Engine's grouped GEMM (GPU); "
                      "without it experts run one after another (SequentialMLP): drop the flag")
    if kernels.tp_comm_overlap:
        if not (te_available and cuda):
            errors.append("--tp-comm-overlap needs Transformer Engine userbuffers on CUDA GPUs; "
                          "drop the flag")
        elif not (par.sequence_parallel and par.tensor_model_parallel_size > 1):
            errors.append("--tp-comm-overlap needs --sequence-parallel and "
                          "--tensor-model-parallel-size > 1")
    if train.fp8_param_gather:
        if not train.fp8_format:
            errors.append("--fp8-param-gather needs --fp8-format")
        if not par.use_distributed_optimizer:
            errors.append("--fp8-param-gather needs --use-distributed-optimizer")
    return errors


def platform_notes(config: PretrainConfig, preset: ModelPreset, te_available: bool,
                   cuda: bool) -> list[str]:
    """Accepted flags that change nothing on this machine, each said once in the log."""
    notes: list[str] = []
    kernels, train, prof = config.kernels, config.training, config.profiling
    if kernels.attention_backend not in ("auto", "local") and not te_available:
        notes.append(f"--attention-backend {kernels.attention_backend} has no effect without "
                     "Transformer Engine: the local (XLDA) attention is the only one here")
    if not kernels.masked_softmax_fusion:
        notes.append("--no-masked-softmax-fusion has no effect: the fused masked softmax belongs "
                     "to megatron-core's DotProductAttention, which neither attention built here "
                     "(Transformer Engine's, XLDA's) uses")
    if not kernels.gradient_accumulation_fusion and not cuda:
        notes.append("--no-gradient-accumulation-fusion has no effect on CPU (the fusion is "
                     "CUDA-only)")
    if kernels.moe_grouped_gemm and not preset.is_moe:
        notes.append("--moe-grouped-gemm has no effect: the model is dense")
    if config.model.moe_token_dispatcher_type != "alltoall" and not preset.is_moe:
        notes.append("--moe-token-dispatcher-type has no effect: the model is dense")
    if train.empty_unused_memory_level and not cuda:
        notes.append("--empty-unused-memory-level has no effect on CPU (no CUDA cache)")
    if prof.record_memory_history and not cuda:
        notes.append("--record-memory-history has no effect on CPU (it records the CUDA "
                     "allocator)")
    if prof.profile and not prof.use_pytorch_profiler and not cuda:
        notes.append("--profile without CUDA has no nsys capture range to open; add "
                     "--use-pytorch-profiler for a torch.profiler trace")
    if train.grad_reduce_in_bf16 and not train.bf16:
        notes.append("--grad-reduce-in-bf16 has no effect without --bf16 (gradients are fp32)")
    if config.data.tiktoken_pattern is not None:
        notes.append("--tiktoken-pattern has no effect: no tokenizer here is a TikTokenizer")
    return notes


def _dpo_errors(config: PretrainConfig) -> list[str]:
    """--dpo and its loss flags."""
    from megatron_trillion.training.arguments import DPOArgs

    dpo, errors = config.dpo, []
    if not config.data.dpo:
        given = [f"--{name.replace('_', '-')}" for name in DPOArgs.__dataclass_fields__
                 if getattr(dpo, name) != getattr(DPOArgs(), name)]
        if given:
            errors.append(f"{', '.join(given)} need --dpo")
        return errors
    if config.data.sft:
        errors.append("--sft and --dpo are two runs: SFT first (its checkpoint is --dpo's "
                      "--load), then DPO")
    if dpo.dpo_beta <= 0:
        errors.append(f"--dpo-beta must be > 0, got {dpo.dpo_beta}")
    if dpo.dpo_max_length_ratio is not None and dpo.dpo_max_length_ratio < 1:
        errors.append(f"--dpo-max-length-ratio is longer over shorter response length, so "
                      f">= 1; got {dpo.dpo_max_length_ratio}")
    if dpo.dpo_reference_load and not os.path.isdir(dpo.dpo_reference_load):
        errors.append(f"--dpo-reference-load {dpo.dpo_reference_load}: no such directory")
    return errors


def _sft_errors(config: PretrainConfig) -> list[str]:
    """--sft / --dpo: chat JSONL data through a tokenizer with character offsets, document
    masking."""
    data = config.data
    kind = f"--{config.kind}"
    errors: list[str] = []
    if data.mock_data:
        errors.append(f"{kind} trains on chat JSONL (--data-path); --mock-data has no "
                      "conversations")
    if data.tokenizer_type not in ("HuggingFaceTokenizer", "GPT2BPETokenizer"):
        errors.append(f"{kind} needs --tokenizer-type HuggingFaceTokenizer or GPT2BPETokenizer "
                      f"(chat templates are rendered to text and tokenized with character "
                      f"offsets), got {data.tokenizer_type}")
    if data.attention_masking == MASKING_NONE:
        errors.append(f"{kind} packs conversations as separate attention blocks; "
                      "--attention-masking none would let them attend to each other")
    if config.anneal.anneal_data_path:
        errors.append("--anneal-data-path is a pretraining mixture switch; it does not apply "
                      f"to {kind}")
    if data.chat_template and not os.path.isfile(data.chat_template):
        errors.append(f"--chat-template {data.chat_template}: no such file")
    return errors


def _interval_errors(config: PretrainConfig) -> list[str]:
    """Intervals and timeouts (warmup vs run length: the LRScheduleConfig check above)."""
    errors: list[str] = []
    for flag_text, value in (("--log-interval", config.logging.log_interval),
                             ("--save-interval", config.checkpoint.save_interval),
                             ("--eval-interval", config.eval.eval_interval),
                             ("--exit-interval", config.training.exit_interval)):
        if value is not None and value < 1:
            errors.append(f"{flag_text} must be >= 1, got {value}")
    if config.eval.eval_iters < 0:
        errors.append(f"--eval-iters must be >= 0 (0 disables evaluation), got "
                      f"{config.eval.eval_iters}")
    hang = getattr(config.training, "hang_timeout_seconds", None)
    if hang is not None and hang <= 0:
        errors.append(f"--hang-timeout-seconds must be > 0, got {hang}")
    return errors


def _checkpoint_errors(config: PretrainConfig) -> list[str]:
    ckpt = config.checkpoint
    errors = [f"{flag_text} needs --save"
              for flag_text, value in (("--save-interval", ckpt.save_interval),
                                       ("--async-save", ckpt.async_save),
                                       ("--ckpt-keep-last", ckpt.ckpt_keep_last))
              if value and not ckpt.save]
    if ckpt.ckpt_keep_last is not None and ckpt.ckpt_keep_last < 1:
        errors.append(f"--ckpt-keep-last must be >= 1, got {ckpt.ckpt_keep_last}")
    errors += [f"{flag_text} needs --load"
               for flag_text, value in (("--ckpt-step", ckpt.ckpt_step is not None),
                                        ("--no-load-optim", ckpt.no_load_optim),
                                        ("--no-load-rng", ckpt.no_load_rng),
                                        ("--finetune", ckpt.finetune))
               if value and not ckpt.load]
    if ckpt.load:
        from megatron_trillion.training.checkpointing import load_dir_problem, load_may_be_absent

        problem = load_dir_problem(ckpt.load,
                                   load_may_be_absent(ckpt.load, ckpt.save, ckpt.finetune))
        if problem:
            errors.append(problem)
    return errors


def _output_dir_errors(config: PretrainConfig) -> list[str]:
    """The directories a run writes into are checked now, not at its first save."""
    from megatron_trillion.platform.output_paths import writable_dir_problem

    problems = (writable_dir_problem(path, flag_text)
                for flag_text, path in (("--save", config.checkpoint.save),
                                        ("--tensorboard-dir", config.logging.tensorboard_dir),
                                        ("--data-cache-path", config.data.data_cache_path))
                if path)
    return [problem for problem in problems if problem]


def _eval_errors(config: PretrainConfig, splits: Optional[DataSplits]) -> list[str]:
    """Evaluation needs held-out data (``splits``: None for --mock-data, which evaluates on
    its own)."""
    if config.eval.eval_interval and config.eval.eval_iters and \
            splits is not None and not (splits.valid or splits.test):
        return ["--eval-interval needs held-out data: --valid-data-path, or a validation "
                "share of --data-path with --split (e.g. 949,50,1); --eval-iters 0 "
                "turns evaluation off"]
    return []


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def transformer_engine_available() -> bool:
    from megatron_trillion.models.specs import transformer_engine_available as available

    return available()


__all__ = ["ConfigError", "RunShape", "validate", "run_shape",
           "parallel_sizes", "virtual_pipeline_stages", "data_parallel_size",
           "default_global_batch_size", "world_size_from_env", "transformer_engine_available",
           "kernel_errors", "platform_notes", "context_parallel_errors"]
