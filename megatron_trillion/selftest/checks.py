"""The self-test's checks, in the order the table prints them.

Each check is a function ``(Context) -> Result``; an exception is its FAIL. GPU-only work is
kept to the few lines that need the device; the arithmetic around it (version ranges, the
reference-curve comparison, bus bandwidth, layer FLOPs, attention error measures) is plain
functions, tested on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megatron_trillion.selftest import FAIL, PASS, SKIPPED, Check, Context, Result

SUPPORTED_MEGATRON_CORE = "0.16.1"
REFERENCE_CURVE = Path(__file__).with_name("reference_curve.json")

# --------------------------------------------------------------------------------------------
# the process group all checks share


@contextlib.contextmanager
def single_process_group():
    """One rank (NCCL on GPU, gloo on CPU) with megatron-core's parallel state, for the whole
    run; the training checks re-initialise the parallel state through ``pretrain``."""
    from megatron_trillion.platform.distributed import (
        destroy_distributed,
        initialize_single_process,
    )

    initialize_single_process()
    try:
        yield
    finally:
        destroy_distributed()


# --------------------------------------------------------------------------------------------
# 1. versions and features


def installed_version(*names: str) -> Optional[str]:
    """Version of the first installed distribution among ``names`` (None if none is)."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def transformer_engine_requirement() -> str:
    """The Transformer Engine range megatron-core's ``dev`` extra is developed against, read
    from the installed megatron-core's metadata (e.g. ``>=2.9.0a0,<2.12.0``)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    for line in metadata.requires("megatron-core") or []:
        requirement = Requirement(line)
        if requirement.name.replace("_", "-") == "transformer-engine" and \
                requirement.marker is not None and \
                requirement.marker.evaluate({"extra": "dev"}):
            return str(requirement.specifier)
    raise RuntimeError("the installed megatron-core declares no transformer-engine requirement "
                       "in its dev extra")


def version_in_range(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return SpecifierSet(specifier).contains(Version(version), prereleases=True)


def check_versions(context: Context) -> Result:
    core = installed_version("megatron-core")
    parts = [f"torch {torch.__version__}", f"megatron-core {core}"]
    if context.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
        nccl = torch.cuda.nccl.version()
        parts.append("NCCL " + (".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)))
        parts.append(f"{context.gpu_count} x {context.device_name}")
    else:
        parts.append("no CUDA device")
    if core != SUPPORTED_MEGATRON_CORE:
        return Result(FAIL, ", ".join(parts) + f"; this project is written for megatron-core "
                      f"{SUPPORTED_MEGATRON_CORE} (pip install megatron-core=="
                      f"{SUPPORTED_MEGATRON_CORE})")
    return Result(PASS, ", ".join(parts))


def check_transformer_engine(context: Context) -> Result:
    wanted = transformer_engine_requirement()
    if context.te_version is None:
        if context.cuda:
            return Result(FAIL, f"not installed; GPU training (XLDA attention, FP8) needs "
                                f"transformer-engine{wanted}")
        return Result(SKIPPED, f"not installed (needs CUDA); megatron-core {SUPPORTED_MEGATRON_CORE}"
                               f" wants transformer-engine{wanted}")
    if not version_in_range(context.te_version, wanted):
        return Result(FAIL, f"transformer-engine {context.te_version} is outside {wanted}, the "
                            f"range megatron-core {SUPPORTED_MEGATRON_CORE} is developed against "
                            "(use the Dockerfile's NGC image)")
    return Result(PASS, f"transformer-engine {context.te_version} in {wanted}; "
                        + ", ".join(_te_features()))


def _te_features() -> list[str]:
    from megatron.core.utils import is_te_min_version

    features = [f"THD attention {'yes' if is_te_min_version('1.10.0') else 'no'}",
                f"context parallel with THD {'yes' if is_te_min_version('1.10.0') else 'no'}"]
    from transformer_engine.pytorch import fp8

    available, reason = fp8.check_fp8_support()
    features.append("FP8 yes" if available else f"FP8 no ({reason})")
    return features


# --------------------------------------------------------------------------------------------
# 2. XLDA attention: the CPU reference, and TE against it

_BLOCKS = [0, 7, 30, 31, 64, 96]  # attention blocks of one packed row (lengths 7, 23, 1, 33, 32)
_HEADS, _GROUPS, _HEAD_DIM = 4, 2, 64
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max |error| / max |reference|


def attention_inputs(seed: int = 0) -> dict:
    """fp32 CPU q [T, heads, d], k/v [T, groups, d] and an output weighting for the loss."""
    generator = torch.Generator().manual_seed(seed)
    tokens = _BLOCKS[-1]

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32, device="cpu")

    return {"q": draw(tokens, _HEADS, _HEAD_DIM), "k": draw(tokens, _GROUPS, _HEAD_DIM),
            "v": draw(tokens, _GROUPS, _HEAD_DIM), "w": draw(tokens, _HEADS * _HEAD_DIM),
            "cu_seqlens": torch.tensor(_BLOCKS, dtype=torch.int32, device="cpu")}


def dense_block_causal_attention(q, k, v, cu_seqlens) -> torch.Tensor:
    """Block-causal attention written out densely (the definition): query i sees key j iff
    both are in the same block and j <= i. [T, heads, d] -> [T, heads * d]."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    block = torch.bucketize(torch.arange(q.shape[0], device=q.device),
                            cu_seqlens[1:].to(q.device), right=True)
    positions = torch.arange(q.shape[0], device=q.device)
    allowed = (block[:, None] == block[None, :]) & (positions[None, :] <= positions[:, None])
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)
    return out.reshape(q.shape[0], -1)


def run_attention(attention: Callable, inputs: dict, dtype: torch.dtype,
                  device: torch.device) -> dict:
    """Output and q/k/v gradients of ``attention(q, k, v, cu_seqlens)`` (as fp32 CPU tensors)
    for the loss sum(out * w)."""
    leaves = {name: inputs[name].detach().to(device=device, dtype=dtype).clone().requires_grad_()
              for name in ("q", "k", "v")}
    out = attention(leaves["q"], leaves["k"], leaves["v"], inputs["cu_seqlens"].to(device))
    out = out.reshape(out.shape[0], -1)
    (out.float() * inputs["w"].to(device)).sum().backward()
    result = {"out": out.detach()}
    result.update({f"d{name}": leaf.grad for name, leaf in leaves.items()})
    return {name: value.float().cpu() for name, value in result.items()}


def relative_errors(measured: dict, reference: dict) -> dict:
    """max |measured - reference| / max |reference| per tensor."""
    return {name: float((measured[name] - reference[name]).abs().max()
                        / reference[name].abs().max().clamp(min=1e-30))
            for name in reference}


def _within(errors: dict, tolerance: float) -> Result:
    worst = max(errors, key=errors.get)
    detail = ", ".join(f"{name} {value:.1e}" for name, value in errors.items())
    detail += f" (relative max error; tolerance {tolerance:.2g})"
    return Result(PASS if errors[worst] <= tolerance else FAIL, detail)


def _attention_config(dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=_HEADS * _HEAD_DIM,
                             num_attention_heads=_HEADS, num_query_groups=_GROUPS,
                             kv_channels=_HEAD_DIM, attention_dropout=0.0, params_dtype=dtype,
                             bf16=dtype == torch.bfloat16)


def xlda_reference_attention() -> Callable:
    """This project's CPU XLDA core attention as ``(q, k, v, cu_seqlens) -> out``."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks
    from megatron_trillion.models.xlda_attention import XLDACoreAttention

    module = XLDACoreAttention(_attention_config(torch.float32), layer_number=1,
                               attn_mask_type=AttnMaskType.causal, attention_type="self",
                               require_packed_seq_params=True)
    return lambda q, k, v, cu: module(q, k, v, None,
                                      packed_seq_params=packed_seq_params_from_blocks(cu))


def check_xlda_reference(context: Context) -> Result:
    inputs = attention_inputs()
    cpu = torch.device("cpu")
    measured = run_attention(xlda_reference_attention(), inputs, torch.float32, cpu)
    definition = run_attention(dense_block_causal_attention, inputs, torch.float32, cpu)
    return _within(relative_errors(measured, definition), 1e-5)


def _check_te_attention(dtype: torch.dtype) -> Result:
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks
    from megatron_trillion.platform.device import compute_device, to_device

    module = TEDotProductAttention(_attention_config(dtype), layer_number=1,
                                   attn_mask_type=AttnMaskType.causal, attention_type="self")

    def te_attention(q, k, v, cu):
        params = to_device({"packed_seq_params": packed_seq_params_from_blocks(cu.cpu())})
        return module(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                      packed_seq_params=params["packed_seq_params"])

    inputs = attention_inputs()
    reference = run_attention(xlda_reference_attention(), inputs, torch.float32,
                              torch.device("cpu"))
    measured = run_attention(te_attention, inputs, dtype, compute_device())
    return _within(relative_errors(measured, reference), _TOLERANCE[dtype])


# TE 2.9 has no fp32 kernel for THD attention, so only BF16 is checked against the reference.
def check_te_attention_bf16(context: Context) -> Result:
    return _check_te_attention(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# 3. the model against its CPU fp32 reference (step-0 logits), a tiny preset against the
#    committed CPU fp32 loss curve, FP8 steps

PROBE_PRESET = "tiny-tri-7b"
PROBE_SEED = 1234
# A larger initialisation than the preset's 0.02 makes attention scores, and so the block mask
# and the RoPE positions, visible in the logits of an untrained model (measured on CPU at 0.1:
# a wrong block mask moves some token's logits by 150%, RoPE restarting inside blocks by 94%,
# MTP's roll ignoring block ends by 114%; BF16 rounding by 3.5%).
PROBE_INIT_STD = 0.1
# max over tokens of |logits - reference| / |reference|: 4x the CPU BF16 measurement above.
PROBE_TOLERANCE = {"fp32": 1e-4, "bf16": 0.15}
# XLDA attention blocks of one packed 128-token row (lengths 7, 23, 1, 33, 32, 32)
PROBE_BLOCKS = (0, 7, 30, 31, 64, 96, 128)


def probe_batch(vocab_size: int, seed: int = 0) -> dict:
    """A fixed XLDA micro-batch (host tensors): random tokens, positions restarting at every
    block, the block boundaries as THD packed-sequence parameters."""
    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks

    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor(PROBE_BLOCKS, dtype=torch.int32)
    length = PROBE_BLOCKS[-1]
    ids = torch.randint(0, vocab_size, (1, length + 1), generator=generator)
    starts = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
    return {"tokens": ids[:, :length], "labels": ids[:, 1:],
            "loss_mask": torch.ones(1, length),
            "position_ids": (torch.arange(length) - starts).unsqueeze(0),
            "packed_seq_params": packed_seq_params_from_blocks(cu)}


def probe_model(transformer_impl: str, bf16: bool, device: torch.device):
    """The probe model (``PROBE_PRESET``, dropout off, ``PROBE_INIT_STD``) with the
    layout-invariant initialisation of ``PROBE_SEED``: the same weights on every backend and
    device."""
    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.models.init import initialize_weights
    from megatron_trillion.models.presets import get_preset

    preset = get_preset(PROBE_PRESET)
    # TE's fused RoPE, as training uses it by default with TE (its THD positions are checked)
    config = build_transformer_config(preset, None, bf16=bf16, hidden_dropout=0.0,
                                      attention_dropout=0.0, init_method_std=PROBE_INIT_STD,
                                      apply_rope_fusion=transformer_impl == "transformer_engine")
    model = build_model(preset, config=config, transformer_impl=transformer_impl,
                        attention_masking="xlda")
    initialize_weights(model, seed=PROBE_SEED)
    return model.to(device)


def probe_logits(model, batch: dict) -> dict:
    """fp32 CPU copies of the logits of the next-token head and of every MTP head for the
    probe batch (one training-mode forward with labels, so the MTP heads run)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from megatron_trillion.platform.device import to_device

    device = next(model.parameters()).device
    outputs = []
    hook = model.output_layer.register_forward_hook(
        lambda module, args, output: outputs.append(output[0].detach().float().cpu().clone()))
    batch = to_device(batch, device)
    model.train()
    try:
        with torch.no_grad():
            model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                  loss_mask=batch["loss_mask"], packed_seq_params=batch["packed_seq_params"])
    finally:
        hook.remove()
        MTPLossLoggingHelper.clean_loss_in_tracker()
    # (copies: the loss overwrites the logits in place) GPTModel runs the MTP heads first.
    names = [f"mtp-{i + 1}" for i in range(len(outputs) - 1)] + ["next-token"]
    return {name: out.reshape(-1, out.shape[-1]) for name, out in zip(names, outputs)}


def logit_errors(measured: dict, reference: dict) -> dict:
    """Per head, the worst token's ``|logits - reference| / |reference|`` (L2 norms)."""
    errors = {}
    for name, ref in reference.items():
        per_token = (measured[name] - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)
        errors[name] = float(per_token.max())
    return errors


def probe_errors(candidate: Callable[[dict], dict]) -> dict:
    """``logit_errors`` of ``candidate`` (probe batch -> ``probe_logits``) against this
    machine's CPU fp32 run of the local (XLDA) model."""
    from megatron_trillion.models.presets import get_preset

    batch = probe_batch(get_preset(PROBE_PRESET).vocab_size)
    reference = probe_logits(probe_model("local", False, torch.device("cpu")), batch)
    return logit_errors(candidate(batch), reference)


def check_probe_logits(context: Context) -> Result:
    """Step-0 logits of the model this machine trains with (TE, BF16 on GPU; the local spec in
    BF16 on CPU) on a fixed XLDA batch against the CPU fp32 reference: the next-token head
    sees the block mask and the RoPE positions, the MTP head also MTP's roll."""
    from megatron_trillion.platform.device import compute_device

    impl = "transformer_engine" if context.cuda else "local"
    model = probe_model(impl, True, compute_device())
    result = _within(probe_errors(lambda batch: probe_logits(model, batch)),
                     PROBE_TOLERANCE["bf16"])
    where = "GPU TE BF16" if context.cuda else "CPU local BF16"
    return Result(result.status, f"{where} vs CPU fp32, {PROBE_BLOCKS[-1]} tokens in "
                                 f"{len(PROBE_BLOCKS) - 1} XLDA blocks: {result.detail}")


REFERENCE_STEPS = 20
# Same flags on every machine; --transformer-impl auto is TE on GPU and local on CPU.
REFERENCE_ARGV = (
    "--preset", "tiny-tri-7b", "--mock-data", "--seq-length", "128", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", str(REFERENCE_STEPS), "--lr", "1e-3",
    "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--seed", "1234",
    "--no-progress-bar", "--log-interval", str(REFERENCE_STEPS),
)
# fp32 on CPU repeats the reference up to summation order; BF16 with TE kernels drifts by
# rounding (8 bits of mantissa) but must follow the same per-batch losses. The mock data's
# token marginal is uniform, so 20 steps stay near ln(vocab) = 8.32 and the curve is set by each
# batch's content: a model with uniform logits (8.318 everywhere) is > 1% off at step 8.
CURVE_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}  # max |loss - reference| / reference per step


def train_tiny(workdir: str, steps: int, *extra: str) -> tuple[list[float], object, object]:
    """``steps`` iterations of the reference run (the schedule of the full 20) through the
    run's own setup (``training.run.pretrain``); returns (losses, final TrainState, Run)."""
    from megatron.core import parallel_state as ps

    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.run import pretrain

    argv = [*REFERENCE_ARGV, "--data-cache-path", os.path.join(workdir, "data"), *extra]
    if steps < REFERENCE_STEPS:
        argv += ["--exit-interval", str(steps)]
    losses: list[float] = []
    ps.destroy_model_parallel()  # pretrain lays out its own parallel state
    final, run = pretrain(parse_args(argv), log=lambda line: None,
                          on_step=lambda state, result: losses.append(result["lm loss"]))
    return losses, final, run


def compare_curve(measured: Sequence[float], reference: Sequence[float],
                  tolerance: float) -> Result:
    if len(measured) > len(reference):
        raise ValueError(f"{len(measured)} losses for a reference of {len(reference)} steps")
    if not all(math.isfinite(x) for x in measured):
        return Result(FAIL, f"non-finite loss: {list(measured)}")
    errors = [abs(m - r) / abs(r) for m, r in zip(measured, reference)]
    step = max(range(len(errors)), key=errors.__getitem__)
    detail = (f"{len(measured)} steps, loss {measured[0]:.4f} -> {measured[-1]:.4f} "
              f"(reference {reference[0]:.4f} -> {reference[len(measured) - 1]:.4f}); "
              f"max relative deviation {errors[step]:.1e} at step {step + 1} "
              f"(tolerance {tolerance:.0e})")
    return Result(PASS if errors[step] <= tolerance else FAIL, detail)


def read_reference_curve(path: Path = REFERENCE_CURVE) -> list[float]:
    data = json.loads(Path(path).read_text())
    if tuple(data["argv"]) != REFERENCE_ARGV:
        raise ValueError(f"{path}: written for other flags than REFERENCE_ARGV; regenerate it "
                         "with --write-reference-curve on a CPU machine")
    return [float(x) for x in data["losses"]]


def write_reference_curve(path: str, workdir: str) -> None:
    """Train the reference run on CPU in fp32 and write its loss curve (atomically)."""
    if torch.cuda.is_available():
        raise SystemExit("error: generate the reference curve on a CPU machine (fp32, the "
                         "local layer spec); this one has CUDA")
    with single_process_group():
        losses, _, _ = train_tiny(workdir, REFERENCE_STEPS)
    payload = {"argv": list(REFERENCE_ARGV), "losses": losses,
               "generated_with": {"torch": torch.__version__,
                                  "megatron-core": installed_version("megatron-core"),
                                  "device": "cpu", "precision": "fp32",
                                  "command": "python -m megatron_trillion.selftest "
                                             "--write-reference-curve PATH"}}
    temporary = f"{path}.tmp"
    Path(temporary).write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, path)


def check_training_curve(context: Context) -> Result:
    reference = read_reference_curve()
    precision = "bf16" if context.cuda else "fp32"
    extra = ("--bf16",) if context.cuda else ()
    losses, _, _ = train_tiny(context.workdir, context.steps, *extra)
    result = compare_curve(losses, reference, CURVE_TOLERANCE[precision])
    where = "GPU BF16" if context.cuda else "CPU fp32"
    return Result(result.status, f"{where}: {result.detail}")


def check_fp8_steps(context: Context) -> Result:
    from transformer_engine.pytorch import fp8

    available, reason = fp8.check_fp8_support()
    if not available:
        return Result(SKIPPED, f"this GPU has no FP8: {reason}")
    losses, _, _ = train_tiny(context.workdir, 5, "--bf16", "--fp8-format", "hybrid")
    if not all(math.isfinite(x) for x in losses):
        return Result(FAIL, f"non-finite FP8 losses {losses}")
    return Result(PASS, "5 FP8 (hybrid) steps, losses " + " ".join(f"{x:.3f}" for x in losses))


def check_fp8_param_init(context: Context) -> Result:
    """--fp8-param-gather: TE keeps each FP8 weight's high-precision initial value, from which
    the distributed optimizer builds its main weights; it must hold the layout-invariant
    initialisation (the BF16 model's weights), not megatron-core's default."""
    from transformer_engine.pytorch import fp8

    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.models.init import initialize_weights
    from megatron_trillion.models.presets import get_preset

    available, reason = fp8.check_fp8_support()
    if not available:
        return Result(SKIPPED, f"this GPU has no FP8: {reason}")
    preset = get_preset(PROBE_PRESET)
    models = {}
    for name, fp8_flags in (("bf16", {}), ("fp8", {"fp8": "hybrid", "fp8_param": True})):
        config = build_transformer_config(preset, None, bf16=True, **fp8_flags)
        model = build_model(preset, config=config, transformer_impl="transformer_engine",
                            attention_masking="xlda")
        initialize_weights(model, seed=PROBE_SEED)
        models[name] = dict(model.named_parameters())
    kept = {name: param.get_high_precision_init_val() for name, param in models["fp8"].items()
            if callable(getattr(param, "get_high_precision_init_val", None))}
    kept = {name: value for name, value in kept.items() if value is not None}
    if not kept:
        return Result(FAIL, "no FP8 weight keeps a high-precision initial value (megatron-core "
                            "builds them with preserve_high_precision_init_val)")
    differing = [name for name, value in kept.items()
                 if not torch.equal(value.float().cpu(), models["bf16"][name].float().cpu())]
    if differing:
        return Result(FAIL, f"{len(differing)} of {len(kept)} FP8 weights keep another "
                            f"initial value than the BF16 model's, e.g. {differing[:3]}")
    return Result(PASS, f"{len(kept)} FP8 weights: TE's high-precision copies (the distributed "
                        "optimizer's starting main weights) equal the layout-invariant init")


def check_gradient_accumulation_fusion(context: Context) -> Result:
    """TE layers fuse the weight-gradient accumulation into ``main_grad`` whether or not apex
    (which only megatron-core's own output layer needs) is installed."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    from megatron_trillion.training.build import _gradient_accumulation_fusion_available
    from megatron_trillion.training.checkpointing import unwrap

    losses, _, run = train_tiny(context.workdir, 1, "--bf16")
    layers = [module for chunk in run.model for module in unwrap(chunk).modules()
              if isinstance(module, TransformerEngineBaseModule)
              and hasattr(module, "fuse_wgrad_accumulation")]
    fused = sum(bool(module.fuse_wgrad_accumulation) for module in layers)
    apex = _gradient_accumulation_fusion_available()
    detail = (f"{fused} of {len(layers)} TE linear layers fuse it (apex "
              f"{'installed: every layer' if apex else 'absent: the output layer does not'}); "
              f"one BF16 step, loss {losses[0]:.4f}")
    ok = layers and fused == len(layers) and all(math.isfinite(x) for x in losses)
    return Result(PASS if ok else FAIL, detail)


def check_te_padding_stated(context: Context) -> Result:
    """Context parallelism pads every block; TE's attention is told ``pad_between_seqs`` by
    the batch (the layer spec's class) instead of deriving it with two ``torch.equal`` host
    syncs per call. One GPU: the same padded THD layout without the CP split."""
    from unittest import mock

    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.data.context_parallel import (
        ContextParallelPackedSeqParams,
        pad_blocks_for_context_parallel,
        pad_between_seqs,
    )
    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks
    from megatron_trillion.models.te_attention_guard import pass_pad_between_seqs
    from megatron_trillion.platform.device import compute_device, to_device

    cu = torch.tensor(_BLOCKS, dtype=torch.int32)
    row = {key: torch.zeros(1, _BLOCKS[-1], dtype=torch.long)
           for key in ("tokens", "labels", "loss_mask", "position_ids")}
    _, cu, padded = pad_blocks_for_context_parallel(
        dict(row, packed_seq_params=packed_seq_params_from_blocks(cu)), cp_size=2)
    fields = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                  cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                  max_seqlen_q=int((padded[1:] - padded[:-1]).max()),
                  max_seqlen_kv=int((padded[1:] - padded[:-1]).max()))
    stated = ContextParallelPackedSeqParams(**fields, pad_between_seqs=pad_between_seqs(cu, padded))
    derived = PackedSeqParams(**fields)
    module = pass_pad_between_seqs(TEDotProductAttention)(
        _attention_config(torch.bfloat16), layer_number=1, attn_mask_type=AttnMaskType.causal,
        attention_type="self")
    device = compute_device()
    generator = torch.Generator().manual_seed(0)
    tokens = int(padded[-1])
    q, k, v = (torch.randn(tokens, heads, _HEAD_DIM, generator=generator).to(
        device, torch.bfloat16) for heads in (_HEADS, _GROUPS, _GROUPS))
    outputs, syncs = {}, {}
    for name, params in (("stated", stated), ("derived", derived)):
        params = to_device({"packed_seq_params": params}, device)["packed_seq_params"]
        counting = mock.Mock(wraps=torch.equal)
        with mock.patch.object(torch, "equal", counting), torch.no_grad():
            outputs[name] = module(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                                   packed_seq_params=params).float().cpu()
        syncs[name] = counting.call_count
    same = torch.equal(outputs["stated"], outputs["derived"])
    detail = (f"padded THD blocks {padded.tolist()}: pad_between_seqs={stated.pad_between_seqs} "
              f"passed, {syncs['stated']} torch.equal calls (TE's own derivation: "
              f"{syncs['derived']}); outputs {'equal' if same else 'DIFFER'}")
    # TE's rule makes one or two torch.equal calls (its `or` stops at the first padding found)
    return Result(PASS if same and syncs["stated"] < syncs["derived"] else FAIL, detail)


# --------------------------------------------------------------------------------------------
# 4. NCCL bus bandwidth

# NVLink bandwidth per direction of one GPU (GB/s), by name; PCIe boards have no NVLink figure.
_NVLINK_GBPS = (("H200", 450.0), ("H100", 450.0))
# Below this fraction of the nominal figure the node is misconfigured (NCCL over PCIe or
# sockets, a degraded link), not merely slower.
MIN_BANDWIDTH_FRACTION = 0.25
_BANDWIDTH_BYTES = 256 << 20
_BANDWIDTH_ITERS = 20


def nominal_link_gbps(device_name: Optional[str]) -> Optional[float]:
    if not device_name or "PCIe" in device_name:
        return None
    for key, value in _NVLINK_GBPS:
        if key in device_name:
            return value
    return None


def bus_bandwidth_gbps(op: str, total_bytes: int, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth: the algorithm bandwidth (bytes / time) times the share of the
    data each link carries - 2(n-1)/n for all-reduce, (n-1)/n for all-gather (``total_bytes``
    is the gathered size)."""
    factor = {"all_reduce": 2 * (ranks - 1) / ranks, "all_gather": (ranks - 1) / ranks}[op]
    return total_bytes / seconds * factor / 1e9


def _bandwidth_worker(rank: int, ranks: int, port: int, results) -> None:
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=ranks)
    try:
        data = torch.ones(_BANDWIDTH_BYTES // 4, dtype=torch.float32, device="cuda")
        gathered = torch.empty(ranks * data.numel(), dtype=torch.float32, device="cuda")
        ops = {"all_reduce": (lambda: torch.distributed.all_reduce(data), data.nbytes),
               "all_gather": (lambda: torch.distributed.all_gather_into_tensor(gathered, data),
                              gathered.nbytes)}
        timings = {}
        for name, (op, nbytes) in ops.items():
            for _ in range(3):
                op()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(_BANDWIDTH_ITERS):
                op()
            torch.cuda.synchronize()
            timings[name] = (nbytes, (time.perf_counter() - started) / _BANDWIDTH_ITERS)
        if rank == 0:
            results.put(timings)
    finally:
        torch.distributed.destroy_process_group()


def check_nccl_bandwidth(context: Context) -> Result:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = context.gpu_count
    spawn = mp.get_context("spawn")
    results = spawn.SimpleQueue()
    workers = [spawn.Process(target=_bandwidth_worker, args=(rank, ranks, port, results))
               for rank in range(ranks)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    if any(worker.exitcode != 0 for worker in workers) or results.empty():
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        return Result(FAIL, f"NCCL workers exited with {[w.exitcode for w in workers]}")
    timings = results.get()
    nominal = nominal_link_gbps(context.device_name)
    parts, worst = [], math.inf
    for op, (nbytes, seconds) in timings.items():
        bandwidth = bus_bandwidth_gbps(op, nbytes, seconds, ranks)
        worst = min(worst, bandwidth)
        parts.append(f"{op} {bandwidth:.0f} GB/s")
    detail = f"{ranks} GPUs, 256 MiB: " + ", ".join(parts)
    if nominal is None:
        return Result(PASS, detail + " (no nominal figure for this device)")
    detail += f"; nominal NVLink {nominal:.0f} GB/s per direction"
    ok = worst >= MIN_BANDWIDTH_FRACTION * nominal
    return Result(PASS if ok else FAIL,
                  detail + ("" if ok else f" - below {MIN_BANDWIDTH_FRACTION:.0%} of nominal"))


# --------------------------------------------------------------------------------------------
# 5. distributed checkpoint round trip


# The resumed step's update may differ from the uninterrupted one's by this fraction of the
# update itself: 0 in fp32 on CPU (bit-exact); on GPU TE's attention backward is not
# bit-deterministic. Adam state lost in the round trip changes the update by its own size.
ROUND_TRIP_TOLERANCE = {"fp32": 0.0, "bf16": 0.1}


def _weights(run) -> dict:
    from megatron_trillion.training.checkpointing import unwrap

    return {name: p.detach().float().cpu().clone() for chunk in run.model
            for name, p in unwrap(chunk).named_parameters()}


def round_trip_result(saved: dict, resumed: dict, uninterrupted: dict,
                      tolerance: float) -> Result:
    """``saved``: the weights at the save (step 2); ``resumed`` / ``uninterrupted``: after one
    more step from the loaded checkpoint / without the round trip. Compared per tensor as
    max |resumed - uninterrupted| / max |uninterrupted - saved| (the step's update)."""
    worst, where = 0.0, None
    for name, after in uninterrupted.items():
        update = float((after - saved[name]).abs().max())
        error = float((resumed[name] - after).abs().max())
        ratio = error / update if update > 0 else (0.0 if error == 0 else math.inf)
        if ratio > worst or where is None:
            worst, where = ratio, name
    detail = (f"{len(saved)} tensors; one step after the reload vs without it: max deviation "
              f"{worst:.1e} of the step's update ({where}; tolerance {tolerance:.0e})")
    return Result(PASS if worst <= tolerance else FAIL, detail)


def check_checkpoint_round_trip(context: Context) -> Result:
    """Distributed optimizer (TE's FusedAdam on GPU) and torch_dist checkpoint: save at step 2,
    load it in a new run and take step 3; the weights equal an uninterrupted run's step 3
    (which needs the weights and every optimizer state restored)."""
    save = os.path.join(context.workdir, "checkpoint")
    extra = ("--bf16",) if context.cuda else ()
    # (after REFERENCE_ARGV's flags: argparse keeps the last value)
    short = ("--train-iters", "3", "--lr-warmup-iters", "1", "--use-distributed-optimizer",
             *extra)
    _, _, first = train_tiny(context.workdir, 2, *short, "--save", save)
    saved = _weights(first)
    _, final, resumed = train_tiny(context.workdir, 3, *short, "--load", save)
    if final.iteration != 3:
        return Result(FAIL, f"the resumed run ended at iteration {final.iteration}, not 3")
    _, _, uninterrupted = train_tiny(context.workdir, 3, *short)
    result = round_trip_result(saved, _weights(resumed), _weights(uninterrupted),
                               ROUND_TRIP_TOLERANCE["bf16" if context.cuda else "fp32"])
    return Result(result.status, "distributed optimizer, torch_dist: " + result.detail)


# --------------------------------------------------------------------------------------------
# 6. one Tri-7B-width layer: TFLOP/s and MFU

LAYER_SEQ = 4096
# The XLDA attention blocks of the timed row (lengths 1024, 512, 1408, 1152): the layer as
# training runs it, THD with RoPE restarting per block.
LAYER_BLOCKS = (0, 1024, 1536, 2944, 4096)
# Far below this, the layer is not running the kernels it should (e.g. TE fell back to
# unfused attention, or the clocks are throttled).
MIN_LAYER_MFU = 0.2


def layer_preset():
    """Trillion/Tri-7B width: hidden 4096, FFN 11008, 32 heads; one layer."""
    import dataclasses

    from megatron_trillion.models.presets import get_preset

    return dataclasses.replace(get_preset("trillion-7b"), num_layers=1, mtp_num_layers=0)


def _block_lengths(seq: int, blocks: Optional[Sequence[int]]) -> list[int]:
    return [seq] if blocks is None else [b - a for a, b in zip(blocks, blocks[1:])]


def layer_training_flops(preset, seq: int, blocks: Optional[Sequence[int]] = None) -> float:
    """Forward + backward FLOPs of one dense decoder layer over ``seq`` tokens, causal inside
    each block (one block without ``blocks``): the matmul weights (2 FLOPs per weight and
    token) and the attention scores and values (4 x heads x head_dim per allowed query-key
    pair), times 3 for the backward."""
    from megatron_trillion.training.flops import _matmul_params_per_token, causal_pairs

    weights, _ = _matmul_params_per_token(preset)
    attention = 4 * preset.num_attention_heads * preset.head_dim * \
        causal_pairs(_block_lengths(seq, blocks))
    return 3.0 * (2 * weights * seq + attention)


def time_layer(preset, seq: int, transformer_impl: str, iterations: int = 10,
               warmup: int = 3, blocks: Optional[Sequence[int]] = None) -> float:
    """Seconds per forward + backward of one BF16 decoder layer of ``preset`` over ``seq``
    tokens on the compute device (the selftest runs it with TE on GPU; tests run it small on
    CPU with the local spec). With ``blocks`` (cumulative boundaries) the row is one packed THD
    micro-batch with XLDA masking and RoPE restarting per block, as in training; without,
    plain causal attention and no RoPE."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from megatron_trillion.data.attention_blocks import MASKING_NONE, MASKING_XLDA
    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks
    from megatron_trillion.models.config import build_transformer_config
    from megatron_trillion.models.specs import get_layer_specs
    from megatron_trillion.platform.device import compute_device, to_device

    config = build_transformer_config(preset, None, bf16=True)
    spec = get_layer_specs(config, transformer_impl=transformer_impl,
                           attention_masking=MASKING_XLDA if blocks else MASKING_NONE)[0]
    device = compute_device()
    layer = build_module(spec, config=config, layer_number=1).to(device)
    hidden = torch.randn(seq, 1, preset.hidden_size, device=device, dtype=torch.bfloat16,
                         requires_grad=True)
    grad = torch.randn_like(hidden)
    inputs = {"attention_mask": None}
    if blocks is not None:
        params = packed_seq_params_from_blocks(torch.tensor(blocks, dtype=torch.int32))
        rotary = RotaryEmbedding(kv_channels=preset.head_dim, rotary_percent=1.0,
                                 rotary_base=preset.rotary_base)
        inputs.update(packed_seq_params=to_device({"packed_seq_params": params},
                                                  device)["packed_seq_params"],
                      rotary_pos_emb=rotary(params.max_seqlen_q, packed_seq=True).to(device))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        output, _ = layer(hidden, **inputs)
        output.backward(grad)

    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize()
    return (time.perf_counter() - started) / iterations


def layer_result(preset, seq: int, seconds: float, peak: Optional[float],
                 blocks: Optional[Sequence[int]] = None) -> Result:
    tflops = layer_training_flops(preset, seq, blocks) / seconds / 1e12
    detail = (f"hidden {preset.hidden_size}, FFN {preset.ffn_hidden_size}, S {seq}, BF16: "
              f"{1000 * seconds:.1f} ms fwd+bwd, {tflops:.0f} TFLOP/s")
    if peak is None:
        return Result(PASS, detail + "; MFU unknown for this device (--device-peak-tflops)")
    mfu = tflops / peak
    detail += f", MFU {mfu:.1%} of {peak:.0f}"
    if mfu < MIN_LAYER_MFU:
        return Result(FAIL, detail + f" - below {MIN_LAYER_MFU:.0%}")
    return Result(PASS, detail)


def check_layer_throughput(context: Context) -> Result:
    """The verdict is the layer as training runs it (XLDA blocks, RoPE); plain causal
    attention without RoPE is reported beside it."""
    from megatron_trillion.platform.device import device_peak_tflops

    preset = layer_preset()
    peak = context.device_peak_tflops or device_peak_tflops(context.device_name)
    xlda = time_layer(preset, LAYER_SEQ, "transformer_engine", blocks=LAYER_BLOCKS)
    dense = time_layer(preset, LAYER_SEQ, "transformer_engine")
    result = layer_result(preset, LAYER_SEQ, xlda, peak, LAYER_BLOCKS)
    dense_tflops = layer_training_flops(preset, LAYER_SEQ) / dense / 1e12
    return Result(result.status,
                  f"XLDA ({len(LAYER_BLOCKS) - 1} blocks, RoPE): {result.detail}; plain causal "
                  f"without RoPE: {1000 * dense:.1f} ms, {dense_tflops:.0f} TFLOP/s")


# --------------------------------------------------------------------------------------------

CHECKS = (
    Check("versions", check_versions),
    Check("transformer-engine", check_transformer_engine),
    Check("xlda-attention-reference", check_xlda_reference),
    Check("xlda-attention-te-bf16", check_te_attention_bf16, ("cuda", "te")),
    Check("probe-logits", check_probe_logits),
    Check("training-curve", check_training_curve),
    Check("fp8-steps", check_fp8_steps, ("cuda", "te")),
    Check("fp8-param-init", check_fp8_param_init, ("cuda", "te")),
    Check("gradient-accumulation-fusion", check_gradient_accumulation_fusion, ("cuda", "te")),
    Check("te-padding-stated", check_te_padding_stated, ("cuda", "te")),
    Check("nccl-bandwidth", check_nccl_bandwidth, ("cuda", "2 gpus")),
    Check("checkpoint-round-trip", check_checkpoint_round_trip),
    Check("layer-throughput", check_layer_throughput, ("cuda", "te")),
)
