"""Preset registry: lookup, overrides, validation, and the layer patterns the builder reads."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_trillion.models.presets import (
    PRESETS,
    ModelPreset,
    apply_overrides,
    get_preset,
    resolve_preset,
)

FULL = ["trillion-7b", "trillion-7b-32k", "tri-7b", "tri-21b", "trinity-large"]
TINY = {"tiny-trillion-7b": "trillion-7b", "tiny-tri-7b": "tri-7b", "tiny-tri-21b": "tri-21b",
        "tiny-trinity": "trinity-large"}


def test_registry_holds_every_preset_and_each_validates():
    assert set(FULL) | set(TINY) <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name
        preset.validate()
        with pytest.raises(dataclasses.FrozenInstanceError):
            preset.num_layers = 1  # type: ignore[misc]


def test_unknown_name_lists_known_presets():
    with pytest.raises(ValueError, match="tri-21b") as err:
        get_preset("tri-70b")
    assert "--preset" in str(err.value)


def test_published_architecture_numbers():
    t = get_preset("trillion-7b")
    assert (t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads,
            t.query_groups, t.vocab_size, t.seq_length, t.rotary_base) == (
        32, 4096, 11008, 32, 32, 128256, 4096, 100_000)
    assert t.untie_embeddings_and_output_weights and t.mtp_num_layers == 1
    long = get_preset("trillion-7b-32k")
    assert (long.seq_length, long.rotary_base) == (32768, 1_000_000)
    t21 = get_preset("tri-21b")
    assert (t21.num_layers, t21.hidden_size, t21.head_dim, t21.ffn_hidden_size,
            t21.num_attention_heads, t21.query_groups, t21.vocab_size, t21.seq_length) == (
        40, 5120, 160, 27392, 32, 8, 124416, 8192)
    tl = get_preset("trinity-large")
    assert (tl.num_experts, tl.moe_router_topk, tl.num_dense_layers, tl.seq_length) == (
        256, 4, 6, 8192)
    assert tl.qk_layernorm and tl.attention_output_gate and tl.sandwich_norm
    assert tl.moe_router_score_function == "sigmoid" and tl.moe_router_enable_expert_bias
    assert tl.moe_shared_expert_intermediate_size


@pytest.mark.parametrize("tiny,full", sorted(TINY.items()))
def test_tiny_variants_keep_the_code_paths_of_their_parent(tiny, full):
    small, big = get_preset(tiny), get_preset(full)
    for flag in ("qk_layernorm", "attention_output_gate", "sandwich_norm", "is_moe",
                 "rope_on_global_layers", "moe_router_score_function",
                 "moe_router_enable_expert_bias", "untie_embeddings_and_output_weights"):
        assert getattr(small, flag) == getattr(big, flag), flag
    assert (small.query_groups < small.num_attention_heads) == (
        big.query_groups < big.num_attention_heads)
    assert (small.sliding_window is None) == (big.sliding_window is None)
    assert (small.num_dense_layers > 0) == (big.num_dense_layers > 0)
    assert small.mtp_num_layers >= 1  # MTP code path (Trinity itself does not use MTP)
    # Divisible for TP2 / PP2 / EP2.
    assert small.num_attention_heads % 2 == 0 and small.query_groups % 2 == 0
    assert small.num_layers % 2 == 0 and small.vocab_size % 2 == 0
    assert small.num_experts is None or small.num_experts % 2 == 0


def test_trinity_layer_patterns_follow_afmoe():
    p = get_preset("trinity-large")
    # transformers: sliding iff (i + 1) % global_attn_every_n_layers != 0; dense iff i < 6.
    assert p.local_layer_pattern() == [int((i + 1) % 4 != 0) for i in range(60)]
    assert p.moe_layer_pattern() == [0] * 6 + [1] * 54
    assert get_preset("tri-7b").local_layer_pattern() == [0] * 32


def test_overrides_replace_fields_and_reject_unknown_ones():
    base = get_preset("tiny-tri-7b")
    changed = apply_overrides(base, {"num_layers": 8, "seq_length": 512, "rotary_base": 5e5,
                                     "mtp_loss_scaling_factor": 0.1})
    assert (changed.num_layers, changed.seq_length, changed.mtp_loss_scaling_factor) == (
        8, 512, 0.1)
    assert base.num_layers == 4  # the registry entry is untouched
    assert resolve_preset("tiny-tri-7b", {"num_layers": 8}) == dataclasses.replace(
        base, num_layers=8)
    with pytest.raises(ValueError, match="overridable fields") as err:
        apply_overrides(base, {"num_layer": 8})
    assert "num_layers" in str(err.value)


def test_preset_errors_name_fields_as_the_caller_spells_them():
    broken = dataclasses.replace(get_preset("tiny-trinity"), moe_router_topk=9,
                                 moe_router_bias_update_momentum=1.0)
    assert broken.errors() == [
        "moe_router_topk 9 must be in 1..num_experts (8)",
        "moe_router_bias_update_momentum must be in [0, 1), got 1.0"]
    flags = {"moe_router_topk": "--moe-router-topk", "num_experts": "--num-experts"}
    assert broken.errors(lambda field: flags.get(field, field))[0] == (
        "--moe-router-topk 9 must be in 1..--num-experts (8)")
    assert get_preset("tiny-trinity").errors() == []


def test_invalid_override_names_the_field():
    with pytest.raises(ValueError, match="num_query_groups"):
        resolve_preset("tiny-tri-21b", {"num_query_groups": 3})
    with pytest.raises(ValueError, match="moe_router_topk"):
        resolve_preset("tiny-trinity", {"moe_router_topk": 9})
    assert isinstance(get_preset("tri-7b"), ModelPreset)
