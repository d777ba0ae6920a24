"""Model-shape flags -> a :class:`ModelPreset`, as Megatron-LM reads them.

With ``--preset`` the preset defines the architecture and the shape flags override its sizes;
an architecture flag that contradicts it (``--normalization LayerNorm`` on an RMSNorm preset) is
an error. Without ``--preset`` the flags define the model entirely, with Megatron-LM's defaults
(``--ffn-hidden-size`` from the hidden size, tied embeddings unless
``--untie-embeddings-and-output-weights``, MHA unless ``--group-query-attention``, RoPE theta
10,000, softmax router). Every model here is a bias-free SwiGLU/RMSNorm/RoPE decoder
(Llama/Trillion family: the layer specs, initialisation and HF export are built for it), so
without a preset those architecture flags must be given, as a Megatron-LM Llama script does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_trillion.errors import UserError
from megatron_trillion.models.presets import ModelPreset, get_preset, preset_names
from megatron_trillion.training.arguments import ModelArgs, flag_name

FROM_FLAGS = "model-from-flags"

# The flag that sets each preset field: a ModelArgs field named like a ModelPreset field
# overrides it (``ModelArgs.preset_overrides``, ``_from_flags``). Preset problems are phrased
# through this table so they read as flag problems; fields no flag sets keep their names.
PRESET_FIELD_FLAGS = {f.name: flag_name(f) for f in dataclasses.fields(ModelArgs)
                      if f.name in {p.name for p in dataclasses.fields(ModelPreset)}}


def preset_field_flag(field_name: str) -> str:
    """How a preset problem names ``field_name``: its flag, or the field without one."""
    return PRESET_FIELD_FLAGS.get(field_name, field_name)

# What every model here is; without --preset each must be stated (Megatron-LM's defaults differ).
_ARCHITECTURE = "this project builds bias-free SwiGLU / RMSNorm / RoPE decoders (Llama family)"


def megatron_default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's --ffn-hidden-size default."""
    if swiglu:
        return int((4 * hidden_size * 2 / 3) / 64) * 64
    return 4 * hidden_size


def resolve_model(model: ModelArgs, vocab_size: Optional[int] = None,
                  check: bool = True) -> ModelPreset:
    """The model the flags describe (``vocab_size``: the tokenizer's, if known).

    ``check=False`` leaves consistency checks to :func:`model_flag_errors` (reported with
    every other configuration problem by ``validate``)."""
    if model.preset is not None:
        base = get_preset(model.preset)
        overrides = model.preset_overrides()
    else:
        missing = [name for name, value in (("--num-layers", model.num_layers),
                                            ("--hidden-size", model.hidden_size),
                                            ("--num-attention-heads", model.num_attention_heads),
                                            ("--seq-length", model.seq_length))
                   if value is None]
        if missing:
            raise UserError(
                "without --preset the flags define the model: give " + ", ".join(missing)
                + " (or --preset NAME; presets: " + ", ".join(preset_names()) + ")")
        base = _from_flags(model)
        overrides = {}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    preset = dataclasses.replace(base, **overrides)
    if check:
        errors = model_flag_errors(model, preset) + preset.errors(preset_field_flag)
        if errors:
            raise UserError("invalid model flags:\n  - " + "\n  - ".join(errors))
    return preset


def _from_flags(model: ModelArgs) -> ModelPreset:
    ffn = model.ffn_hidden_size or megatron_default_ffn_hidden_size(model.hidden_size,
                                                                    model.swiglu)
    moe = {}
    if model.num_experts is not None:
        moe = dict(num_experts=model.num_experts, moe_router_topk=model.moe_router_topk or 2,
                   moe_ffn_hidden_size=model.moe_ffn_hidden_size or ffn,
                   # Megatron-LM's router: softmax scores, no expert bias.
                   moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                   moe_aux_loss_coeff=model.moe_aux_loss_coeff or 0.0)
    return ModelPreset(
        name=FROM_FLAGS,
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=ffn,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups if model.group_query_attention else None,
        kv_channels=model.kv_channels,
        vocab_size=0,  # set from the tokenizer / --vocab-size
        seq_length=model.seq_length,
        rotary_base=model.rotary_base if model.rotary_base is not None else 10000.0,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        norm_epsilon=model.norm_epsilon if model.norm_epsilon is not None else 1e-5,
        init_method_std=model.init_method_std if model.init_method_std is not None else 0.02,
        mtp_num_layers=model.mtp_num_layers or 0,
        mtp_loss_scaling_factor=(model.mtp_loss_scaling_factor
                                 if model.mtp_loss_scaling_factor is not None else 0.1),
        **moe,
    )


def model_flag_errors(model: ModelArgs, preset: ModelPreset) -> list[str]:
    """Architecture flags that contradict the preset, or that no model here can honour."""
    errors: list[str] = []
    where = f"--preset {model.preset}" if model.preset else _ARCHITECTURE
    if model.preset is None:
        for given, flag_text in ((model.swiglu, "--swiglu"),
                                 (model.normalization == "RMSNorm", "--normalization RMSNorm"),
                                 (model.disable_bias_linear, "--disable-bias-linear")):
            if not given:
                errors.append(f"without --preset, pass {flag_text}: {_ARCHITECTURE} "
                              "(Megatron-LM's default differs)")
        if model.num_query_groups is not None and not model.group_query_attention:
            errors.append("--num-query-groups needs --group-query-attention (Megatron-LM "
                          "ignores it otherwise)")
        if preset.vocab_size <= 0:
            errors.append("without --preset the vocabulary comes from the tokenizer: give "
                          "--tokenizer-model, or --vocab-size with --mock-data/NullTokenizer")
    elif model.normalization not in (None, "RMSNorm"):
        errors.append(f"--normalization {model.normalization} contradicts {where} (RMSNorm)")
    if model.position_embedding_type not in (None, "rope"):
        errors.append(f"--position-embedding-type {model.position_embedding_type}: only rope "
                      f"is supported ({_ARCHITECTURE})")
    if model.rotary_percent != 1.0:
        errors.append(f"--rotary-percent {model.rotary_percent}: only 1.0 (full-head RoPE, as "
                      "in the Llama/Trillion architectures and their HF export)")
    if model.group_query_attention and preset.query_groups == preset.num_attention_heads:
        errors.append(f"--group-query-attention, but {where} has as many KV heads as query "
                      f"heads ({preset.num_attention_heads}); give --num-query-groups")
    if model.max_position_embeddings is not None and \
            model.max_position_embeddings < (model.seq_length or preset.seq_length):
        errors.append(f"--max-position-embeddings ({model.max_position_embeddings}) is smaller "
                      f"than --seq-length ({model.seq_length or preset.seq_length})")
    if preset.num_experts is None:
        for value, flag_text in ((model.moe_ffn_hidden_size, "--moe-ffn-hidden-size"),
                                 (model.moe_aux_loss_coeff, "--moe-aux-loss-coeff"),
                                 (model.moe_router_load_balancing_type,
                                  "--moe-router-load-balancing-type"),
                                 (model.moe_router_bias_update_style,
                                  "--moe-router-bias-update-style"),
                                 (model.moe_router_bias_update_rate,
                                  "--moe-router-bias-update-rate"),
                                 (model.moe_router_bias_update_momentum,
                                  "--moe-router-bias-update-momentum"),
                                 (model.moe_router_bias_update_clamp_scale,
                                  "--moe-router-bias-update-clamp-scale")):
            if value is not None:
                errors.append(f"{flag_text} is set but the model is dense (give --num-experts "
                              "or a MoE preset)")
    elif preset.moe_router_bias_update_style == "sign":
        # SMEBU's constants mean nothing to the sign rule.
        for value, flag_text in ((model.moe_router_bias_update_momentum,
                                  "--moe-router-bias-update-momentum"),
                                 (model.moe_router_bias_update_clamp_scale,
                                  "--moe-router-bias-update-clamp-scale")):
            if value is not None:
                errors.append(f"{flag_text} only applies to --moe-router-bias-update-style "
                              f"smebu ({where} uses sign)")
    elif model.moe_router_load_balancing_type not in (None, "none", "sinkhorn") and \
            not (model.moe_aux_loss_coeff or preset.moe_aux_loss_coeff):
        errors.append(f"--moe-router-load-balancing-type {model.moe_router_load_balancing_type} "
                      "needs --moe-aux-loss-coeff > 0 (its loss would have weight 0)")
    return errors
