"""Preset -> TransformerConfig mapping and the spec backend choice (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from megatron_trillion.models.config import build_transformer_config, drop_mtp_weights
from megatron_trillion.models.presets import PRESETS
from megatron_trillion.models.specs import (
    resolve_transformer_impl,
    transformer_engine_available,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_transformer_config(name):
    preset = PRESETS[name]
    config = build_transformer_config(name)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads,
            config.num_query_groups, config.kv_channels) == (
        preset.num_layers, preset.hidden_size, preset.num_attention_heads,
        preset.query_groups, preset.head_dim)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert not config.add_bias_linear
    assert config.mtp_num_layers == (preset.mtp_num_layers or None)


def test_trinity_maps_onto_megatron_afmoe_features():
    config = build_transformer_config("trinity-large")
    assert config.window_size == (4095, 0)  # HF sliding_window 4096 = query + 4095 before
    assert config.window_attn_skip_freq == 4  # layer_number % 4 == 0 -> global
    assert config.no_rope_freq == [int((i + 1) % 4 == 0) for i in range(60)]
    assert config.moe_layer_freq == [0] * 6 + [1] * 54
    assert config.qk_layernorm and config.attention_output_gate
    assert config.moe_router_score_function == "sigmoid"
    assert config.moe_router_enable_expert_bias
    assert config.moe_shared_expert_intermediate_size == 3072
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (
        256, 4, 3072)


def test_no_rope_pattern_covers_the_mtp_layer():
    # The MTP layer looks up layer_number num_layers + 1 (5 here: 5 % 2 != 0 -> RoPE on).
    config = build_transformer_config("tiny-trinity")
    assert config.no_rope_freq == [0, 1, 0, 1, 0]


def test_overrides_and_passthrough():
    config = build_transformer_config(
        "tiny-tri-7b", {"num_layers": 2, "mtp_loss_scaling_factor": 0.1},
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
        bf16=True,
    )
    assert config.num_layers == 2 and config.mtp_loss_scaling_factor == 0.1
    assert config.recompute_granularity == "full"
    assert config.bf16 and config.params_dtype == torch.bfloat16


def test_config_errors_name_what_to_fix():
    with pytest.raises(ValueError, match="tensor_model_paralel_size"):
        build_transformer_config("tiny-tri-7b", tensor_model_paralel_size=2)
    with pytest.raises(ValueError, match="--fp8-format"):
        build_transformer_config("tiny-tri-7b", fp8="e5m2")
    with pytest.raises(ValueError, match="overridable fields"):
        build_transformer_config("tiny-tri-7b", {"layers": 2})


def test_transformer_impl_choice():
    expected = "transformer_engine" if transformer_engine_available() else "local"
    assert resolve_transformer_impl("auto") == expected
    assert resolve_transformer_impl("local") == "local"
    with pytest.raises(ValueError, match="--transformer-impl"):
        resolve_transformer_impl("apex")
    if not transformer_engine_available():
        with pytest.raises(ValueError, match="Transformer Engine is not importable"):
            resolve_transformer_impl("transformer_engine")


def test_drop_mtp_weights():
    state = {"mtp.layers.0.enorm.weight": 1, "decoder.final_layernorm.weight": 2,
             "embedding.word_embeddings.weight": 3}
    assert drop_mtp_weights(state) == {"decoder.final_layernorm.weight": 2,
                                       "embedding.word_embeddings.weight": 3}


def test_initialisation_reaches_the_high_precision_copy_of_fp8_weights():
    """--fp8-param-gather: TE keeps each FP8 weight's value before quantisation, and the
    distributed optimizer builds its fp32 main weights from it; the layout-invariant
    initialisation must land there too (a stand-in copy here: FP8 weights need a GPU)."""
    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.init import initialize_weights
    from megatron_trillion.selftest.checks import single_process_group

    with single_process_group():
        model = build_model("tiny-tri-7b")
        weight = model.decoder.layers[0].self_attention.linear_qkv.weight
        kept = torch.zeros_like(weight)  # what TE kept: megatron-core's default init
        weight.get_high_precision_init_val = lambda: kept
        initialize_weights(model, seed=3)
    assert kept.abs().sum() > 0 and torch.equal(kept, weight.detach())
