"""Build megatron-core objects from a preset: the ONE place a ``TransformerConfig`` is made.

Interface for the training loop::

    from megatron_trillion.models.config import build_transformer_config, build_model
    from megatron_trillion.models.init import initialize_weights

    config = build_transformer_config(
        "tiny-tri-7b",                        # or a ModelPreset
        {"num_layers": 8, "seq_length": 1024, "mtp_loss_scaling_factor": 0.2},  # preset fields
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2,  # any TransformerConfig
        bf16=False, recompute_granularity="selective",                 # field, passed through
    )
    model = build_model("tiny-tri-7b", {...}, config=config, vp_stage=None,
                        attention_masking="xlda")    # GPTModel, fp32 on CPU
    initialize_weights([model], seed=1234)          # same weights at any TP/PP/EP/DP layout
    set_mtp_loss_scaling_factor([model], 0.1)       # anneal: alpha 0.2 -> 0.1, no rebuild

Parallel sizes left out of ``config_kwargs`` are taken from megatron's ``parallel_state`` when it
is initialised (so the config always agrees with the process groups); a conflicting explicit
value raises. ``transformer_impl`` ("auto" | "transformer_engine" | "local") picks the layer
spec (see ``megatron_trillion.models.specs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_trillion.data.attention_blocks import MASKING_NONE
from megatron_trillion.models.presets import ModelPreset, resolve_preset
from megatron_trillion.models import afmoe, specs
from megatron_trillion.models.no_grad_linear import use_no_grad_output_layer
from megatron_trillion.models.router_balance import configure_expert_bias_update

_PARALLEL_FIELDS = {
    "tensor_model_parallel_size": "get_tensor_model_parallel_world_size",
    "pipeline_model_parallel_size": "get_pipeline_model_parallel_world_size",
    "virtual_pipeline_model_parallel_size": "get_virtual_pipeline_model_parallel_world_size",
    "expert_model_parallel_size": "get_expert_model_parallel_world_size",
    "expert_tensor_parallel_size": "get_expert_tensor_parallel_world_size",
    "context_parallel_size": "get_context_parallel_world_size",
}


def _parallel_sizes_from_state() -> dict[str, Any]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return {}
    sizes = {}
    for field, getter in _PARALLEL_FIELDS.items():
        value = getattr(parallel_state, getter)()
        if field == "virtual_pipeline_model_parallel_size" and value is None:
            continue
        sizes[field] = value
    return sizes


# Preset fields that are TransformerConfig fields of the same name and meaning, copied as they
# are (Megatron-LM's core_transformer_config_from_args copies same-named fields the same way).
_SAME_NAME_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "init_method_std", "qk_layernorm", "attention_output_gate",
                     "mtp_loss_scaling_factor")
_SAME_NAME_MOE_FIELDS = ("moe_router_topk", "moe_ffn_hidden_size",
                         "moe_shared_expert_intermediate_size", "moe_router_score_function",
                         "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
                         "moe_router_topk_scaling_factor", "moe_aux_loss_coeff")


def _preset_to_config_kwargs(p: ModelPreset) -> dict[str, Any]:
    kwargs: dict[str, Any] = {name: getattr(p, name) for name in _SAME_NAME_FIELDS}
    kwargs.update(
        num_query_groups=p.query_groups,
        kv_channels=p.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=p.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels stay off (megatron-core's defaults; they need CUDA/TE): on GPU pass e.g.
        # apply_rope_fusion=True, bias_dropout_fusion=True, gradient_accumulation_fusion=True.
        mtp_num_layers=p.mtp_num_layers or None,
    )
    if p.sliding_window is not None:
        # transformers' sliding_window W = the query and W-1 keys before it; megatron/TE
        # window_size=(left, right) sees keys i-left..i+right.
        kwargs["window_size"] = (p.sliding_window - 1, 0)
        # Integer form: layer_number (1-based) % n == 0 is global, i.e. AFMoE's (i+1) % n == 0.
        # (An int also covers the MTP layer, whose layer_number is num_layers + 1.)
        kwargs["window_attn_skip_freq"] = p.global_attn_every_n_layers
        if not p.rope_on_global_layers and p.global_attn_every_n_layers:
            # List form (1 = skip RoPE) on exactly the global layers.
            kwargs["no_rope_freq"] = [1 - local for local in p.local_layer_pattern()]
    if p.is_moe:
        kwargs.update({name: getattr(p, name) for name in _SAME_NAME_MOE_FIELDS})
        kwargs.update(
            num_moe_experts=p.num_experts,
            moe_layer_freq=p.moe_layer_pattern(),
            moe_router_load_balancing_type="none" if not p.moe_aux_loss_coeff else "aux_loss",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            # Router logits in fp32 as AFMoE computes them.
            moe_router_dtype="fp32",
        )
    return kwargs


def build_transformer_config(
    preset: "ModelPreset | str",
    overrides: Optional[Mapping[str, Any]] = None,
    **config_kwargs: Any,
) -> TransformerConfig:
    """``TransformerConfig`` of ``preset`` (with preset-field ``overrides``).

    ``config_kwargs`` are TransformerConfig fields passed through unchanged: parallel sizes,
    ``sequence_parallel``, ``bf16``/``fp16``/``params_dtype``, ``fp8`` ("hybrid" | "e4m3"),
    ``fp8_recipe``, ``fp8_amax_history_len``, ``fp8_amax_compute_algo``,
    ``recompute_granularity``/``recompute_method``/``recompute_num_layers``/
    ``recompute_modules``, ``calculate_per_token_loss``, ... . Unknown names raise ValueError.
    """
    p = resolve_preset(preset, overrides)
    valid = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(config_kwargs) - valid)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s) {unknown} passed to "
                         "build_transformer_config")
    kwargs = _preset_to_config_kwargs(p)
    from_state = _parallel_sizes_from_state()
    for field, value in from_state.items():
        given = config_kwargs.get(field)
        if given is not None and given != value:
            raise ValueError(
                f"{field}={given} conflicts with the initialised parallel state ({value}); "
                "pass the same layout to initialize_distributed and the model config"
            )
        kwargs[field] = value
    kwargs.update(config_kwargs)
    if kwargs.get("bf16") and "params_dtype" not in config_kwargs:
        kwargs["params_dtype"] = torch.bfloat16
    if kwargs.get("fp8") not in (None, "hybrid", "e4m3"):
        raise ValueError(f"--fp8-format must be 'hybrid' or 'e4m3', got {kwargs['fp8']!r}")
    if kwargs.get("pipeline_model_parallel_size", 1) > 1 and "pipeline_dtype" not in kwargs:
        kwargs["pipeline_dtype"] = kwargs.get("params_dtype", torch.float32)
    config = TransformerConfig(**kwargs)
    if isinstance(config.no_rope_freq, list) and config.mtp_num_layers:
        # megatron-core sizes the list to the decoder layers, but the MTP layer's attention looks
        # itself up at layer_number num_layers + 1 (+ j): extend the same rule to it.
        n = p.global_attn_every_n_layers
        config.no_rope_freq = list(config.no_rope_freq) + [
            int((config.num_layers + j + 1) % n == 0) for j in range(config.mtp_num_layers)
        ]
    return config


def build_model(
    preset: "ModelPreset | str",
    overrides: Optional[Mapping[str, Any]] = None,
    *,
    config: Optional[TransformerConfig] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    transformer_impl: str = "auto",
    attention_masking: str = MASKING_NONE,
    make_vocab_size_divisible_by: int = 128,
    **config_kwargs: Any,
):
    """A megatron-core ``GPTModel`` for this pipeline stage (``vp_stage`` for interleaving).

    ``preset.vocab_size`` is the tokenizer's size; the model pads it for the current TP size
    (Megatron-LM's ``make_vocab_size_divisible_by x TP``) and masks the padded ids out of the
    logits (``models.vocab``), so the padding never changes what the model computes.

    ``config`` defaults to ``build_transformer_config(preset, overrides, **config_kwargs)``.
    ``attention_masking`` ("xlda" | "document" | "none") selects whether the CPU core attention
    requires packed-sequence block boundaries (see ``xlda_attention``). ``pre_process`` /
    ``post_process`` default to whether this is the first / last pipeline stage. The model is
    created with megatron's default initialisation; call
    ``megatron_trillion.models.init.initialize_weights`` for layout-invariant weights.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_trillion.models.vocab import mask_padded_logits, padded_vocab_size

    p = resolve_preset(preset, overrides)
    if config is None:
        config = build_transformer_config(p, **config_kwargs)
    elif config_kwargs:
        raise ValueError("pass either config= or TransformerConfig fields, not both")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    impl = specs.resolve_transformer_impl(transformer_impl)
    decoder_spec = specs.get_decoder_block_spec(
        config, transformer_impl=impl, attention_masking=attention_masking,
        sandwich_norm=p.sandwich_norm, vp_stage=vp_stage,
    )
    mtp_spec = specs.get_mtp_block_spec(
        config, decoder_spec, transformer_impl=impl, attention_masking=attention_masking,
        sandwich_norm=p.sandwich_norm, vp_stage=vp_stage,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec,
        vocab_size=padded_vocab_size(p.vocab_size, make_vocab_size_divisible_by,
                                     parallel_state.get_tensor_model_parallel_world_size()),
        max_sequence_length=p.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not p.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=p.rotary_base,
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )
    mask_padded_logits(model, p.vocab_size)
    use_no_grad_output_layer(model)
    # What megatron-core's GPTModel does not express (models.afmoe, models.router_balance).
    if p.sandwich_norm and p.sandwich_post_norm_init != "one":
        afmoe.set_post_norm_init_gain(model, p.post_norm_init_gain)
    if p.mup_enabled:
        afmoe.enable_mup_embedding_scale(model, p.hidden_size)
    if p.is_moe and p.moe_router_enable_expert_bias:
        configure_expert_bias_update(model, p.expert_bias_update())
    return model


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def set_mtp_loss_scaling_factor(model_chunks: Iterable, alpha: float) -> None:
    """Change MTP's alpha (loss = NTP + alpha * MTP) in place, e.g. at the anneal boundary.

    megatron-core reads ``config.mtp_loss_scaling_factor`` on every forward (GPTModel's
    ``_postprocess`` scales the MTP loss it attaches with ``MTPLossAutoScaler``), and all modules
    of a model share one config object, so changing it takes effect at the next step.
    """
    if alpha < 0:
        raise ValueError(f"MTP loss scaling factor must be >= 0, got {alpha}")
    for chunk in model_chunks:
        _unwrap(chunk).config.mtp_loss_scaling_factor = float(alpha)


def drop_mtp_weights(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without the MTP layer(s) (``mtp.*``): what exports keep."""
    return {k: v for k, v in state_dict.items() if not k.startswith("mtp.")}
