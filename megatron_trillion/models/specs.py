"""The one place where the submodules of a Trillion-family model are chosen.

``get_decoder_block_spec(config, ...)`` returns megatron-core block submodules (one
layer spec per layer of this pipeline stage) and ``get_mtp_block_spec(...)`` the MTP block spec:

* **Transformer Engine** (``transformer_impl="transformer_engine"``, or ``"auto"`` when TE is
  importable): megatron-core's TE layer spec (fused norm+linear, ``TEDotProductAttention``, which
  runs XLDA as varlen attention over the packed-sequence cu_seqlens). BF16 / FP8 are
  ``TransformerConfig`` fields (``bf16``, ``fp8``, ``fp8_recipe``, ``fp8_amax_history_len``,
  ``fp8_amax_compute_algo``) that TE modules read; they pass through ``build_transformer_config``.
* **local** (``"local"``, or ``"auto"`` without TE, e.g. on CPU): megatron-core's local spec with
  core attention = :class:`megatron_trillion.models.xlda_attention.XLDACoreAttention`
  (block-causal over ``PackedSeqParams`` THD cu_seqlens; GQA, TP, sliding window) and norms =
  :class:`megatron_trillion.models.norms.TorchNorm` (megatron's torch norm refuses sequence
  parallelism, which megatron-core requires for MoE with TP). ``attention_masking``
  ("xlda" | "document" | "none") makes the CPU attention refuse to run without packed-sequence
  block boundaries in the masked modes; so does TE's (wrapped by
  ``te_attention_guard.require_packed_thd``).
* MoE layers (per ``config.moe_layer_freq``): megatron-core's MoE spec; on the local backend
  experts are ``SequentialMLP`` (``GroupedMLP`` with ``moe_grouped_gemm``), tokens move with the
  dispatcher in ``config.moe_token_dispatcher_type`` (``alltoall`` for EP).
* Sandwich norm (AFMoE): every layer becomes a
  :class:`megatron_trillion.models.afmoe.SandwichTransformerLayer`.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
    get_gpt_mtp_block_spec_for_backend,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_trillion.data.attention_blocks import MASKING_NONE
from megatron_trillion.models.afmoe import sandwich_layer_spec
from megatron_trillion.models.mtp_recompute import use_packed_recompute_mtp_layers
from megatron_trillion.models.mtp_roll import use_vectorised_packed_roll
from megatron_trillion.models.no_grad_linear import (
    NoGradColumnParallelLinear,
    NoGradRowParallelLinear,
)
from megatron_trillion.models.norms import TorchNorm
from megatron_trillion.models.rotated_cache_attention import RotatedCacheSelfAttention
from megatron_trillion.models.te_attention_guard import pass_pad_between_seqs, require_packed_thd
from megatron_trillion.models.xlda_attention import xlda_core_attention_spec

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(transformer_impl: str = "auto") -> str:
    """``"auto"`` -> TE when importable, else local. Raises if TE is requested but absent."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}"
        )
    if transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError(
            "--transformer-impl transformer_engine was requested but Transformer Engine is not "
            "importable (it needs CUDA; `pip install transformer_engine[pytorch]` on a GPU "
            "machine), or use --transformer-impl local."
        )
    return transformer_impl


def _layer_spec(config: TransformerConfig, num_experts: Optional[int], impl: str,
                attention_masking: str, sandwich_norm: bool) -> ModuleSpec:
    """One layer's spec (dense when ``num_experts`` is None)."""
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )
        # Masked modes: TE's attention would silently attend across documents without THD block
        # boundaries, so it raises instead.
        attention = spec.submodules.self_attention.submodules
        attention.core_attention = pass_pad_between_seqs(
            require_packed_thd(attention.core_attention, attention_masking))
        norm = TENorm
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
            normalization=config.normalization,
        )
        attention = spec.submodules.self_attention.submodules
        attention.core_attention = xlda_core_attention_spec(attention_masking)
        # megatron's WrappedTorchNorm refuses sequence parallelism; TorchNorm is the same
        # torch norm with megatron's SP gradient marker.
        for owner, field in ((spec.submodules, "input_layernorm"),
                             (spec.submodules, "pre_mlp_layernorm"),
                             (attention, "q_layernorm"), (attention, "k_layernorm")):
            if getattr(owner, field) is WrappedTorchNorm:
                setattr(owner, field, TorchNorm)
        # Generation (no autograd, TP1) skips megatron-core's per-call autograd wrappers.
        for owner in (attention, getattr(spec.submodules.mlp, "submodules", None)):
            for field in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
                if getattr(owner, field, None) is ColumnParallelLinear:
                    setattr(owner, field, NoGradColumnParallelLinear)
                elif getattr(owner, field, None) is RowParallelLinear:
                    setattr(owner, field, NoGradRowParallelLinear)
        norm = TorchNorm
    # Generation's static KV cache then holds rotated keys: a decode step rotates only its own.
    if spec.submodules.self_attention.module is SelfAttention:
        spec.submodules.self_attention.module = RotatedCacheSelfAttention
    if sandwich_norm:
        spec = sandwich_layer_spec(spec, norm)
    return spec


def get_layer_specs(config: TransformerConfig, *, transformer_impl: str = "auto",
                    attention_masking: str = MASKING_NONE,
                    sandwich_norm: bool = False) -> list[ModuleSpec]:
    """Specs of all ``config.num_layers`` decoder layers (dense or MoE per moe_layer_freq)."""
    impl = resolve_transformer_impl(transformer_impl)
    pattern = config.moe_layer_freq
    if config.num_moe_experts is None:
        pattern = [0] * config.num_layers
    elif isinstance(pattern, int):
        pattern = [1 if i % pattern == 0 else 0 for i in range(config.num_layers)]
    if len(pattern) != config.num_layers:
        raise ValueError(
            f"moe_layer_freq has {len(pattern)} entries for {config.num_layers} layers"
        )
    dense = _layer_spec(config, None, impl, attention_masking, sandwich_norm)
    moe = (_layer_spec(config, config.num_moe_experts, impl, attention_masking, sandwich_norm)
           if config.num_moe_experts else None)
    return [moe if is_moe else dense for is_moe in pattern]


def get_decoder_block_spec(config: TransformerConfig, *, transformer_impl: str = "auto",
                           attention_masking: str = MASKING_NONE, sandwich_norm: bool = False,
                           vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage (and virtual stage ``vp_stage``)."""
    impl = resolve_transformer_impl(transformer_impl)
    layer_specs = get_layer_specs(config, transformer_impl=impl,
                                  attention_masking=attention_masking,
                                  sandwich_norm=sandwich_norm)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = TorchNorm
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset:offset + count],
                                      layer_norm=final_norm)


def get_mtp_block_spec(config: TransformerConfig, decoder_spec: TransformerBlockSubmodules, *,
                       transformer_impl: str = "auto", attention_masking: str = MASKING_NONE,
                       sandwich_norm: bool = False, vp_stage: Optional[int] = None):
    """MTP block spec for this stage (None when no MTP layer lives here).

    The MTP layer's transformer layer is built like the model's last decoder layer (megatron's
    convention), with the same core attention and sandwich norms."""
    if not config.mtp_num_layers:
        return None
    impl = resolve_transformer_impl(transformer_impl)
    last_layer = get_layer_specs(config, transformer_impl=impl,
                                 attention_masking=attention_masking,
                                 sandwich_norm=sandwich_norm)[-1]
    block = TransformerBlockSubmodules(layer_specs=[last_layer])
    if impl == "transformer_engine":
        spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine=True,
                                      vp_stage=vp_stage)
    else:
        spec = get_gpt_mtp_block_spec_for_backend(config, block, backend=_LocalBackend(),
                                                  vp_stage=vp_stage)
    # MTP's shift of packed sequences without a host sync per block (models.mtp_roll)
    use_vectorised_packed_roll()
    # full recompute + packed sequences: megatron-core 0.16.1's MTP layer crashes without this
    return use_packed_recompute_mtp_layers(spec)


class _LocalBackend(LocalSpecProvider):
    """megatron's local backend with the sequence-parallel-capable TorchNorm (MTP norms)."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return TorchNorm
