"""Parameter counts of the full presets (analytic, no weights allocated) vs published figures.

The formulas are checked against real models' ``numel`` in test_afmoe.py (tiny presets).
"""

from __future__ import annotations

import pytest

from megatron_trillion.models.param_count import count_parameters
from megatron_trillion.models.presets import PRESETS, get_preset

FULL = [name for name, p in PRESETS.items() if p.published_total_params]


@pytest.mark.parametrize("name", FULL)
def test_full_preset_within_two_percent_of_published(name):
    preset = get_preset(name)
    count = count_parameters(preset)
    total_err = count.total / preset.published_total_params - 1
    line = (f"{name}: total {count.total / 1e9:.3f}B (published "
            f"{preset.published_total_params / 1e9:.2f}B, {total_err:+.2%})")
    if preset.published_active_params:
        active_err = count.active / preset.published_active_params - 1
        line += (f", active {count.active / 1e9:.3f}B (published "
                 f"{preset.published_active_params / 1e9:.2f}B, {active_err:+.2%})")
        assert abs(active_err) <= 0.02
    print(line)
    assert abs(total_err) <= 0.02


# The shapes the publishers state (model cards / reports); a preset must equal them field by
# field, so a total that happens to land near the published count cannot hide a wrong network.
PUBLISHED_SHAPES = {
    # Trillion-7B technical report, Table 2.
    "trillion-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                        num_attention_heads=32, query_groups=32, vocab_size=128256),
    # Tri-7B model card (layers, heads, vocab; hidden and FFN are derived, see presets.py).
    "tri-7b": dict(num_layers=32, num_attention_heads=32, vocab_size=128256),
    # Tri-21B card (heads 32/8, vocab) + Tri-21B-Think card (layers, hidden, head dim, FFN).
    "tri-21b": dict(num_layers=40, hidden_size=5120, head_dim=160, ffn_hidden_size=27392,
                    num_attention_heads=32, query_groups=8, vocab_size=124416,
                    untie_embeddings_and_output_weights=True),
    # Trinity-Large-Base card: 256 experts, 4 active, 6 dense layers, 8,192 context.
    "trinity-large": dict(num_experts=256, moe_router_topk=4, num_dense_layers=6,
                          seq_length=8192),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHAPES))
def test_full_preset_has_the_published_shape(name):
    preset = get_preset(name)
    got = {field: getattr(preset, field) for field in PUBLISHED_SHAPES[name]}
    assert got == PUBLISHED_SHAPES[name]


def test_tri_21b_total_rounds_to_the_published_figure():
    # Untied 2 x 124,416 x 5,120 + 40 x (attention 65.5M + SwiGLU 420.7M) = 20.7255B.
    assert round(count_parameters(get_preset("tri-21b")).total / 1e9, 2) == 20.73


def test_every_full_preset_is_checked():
    assert set(FULL) == {"trillion-7b", "trillion-7b-32k", "tri-7b", "tri-21b", "trinity-large"}


def test_trillion_7b_matches_its_report_exactly_and_mtp_is_extra():
    p = get_preset("trillion-7b")
    assert round(count_parameters(p).total / 1e9, 2) == 7.53
    with_mtp = count_parameters(p, include_mtp=True).total
    # One MTP layer = a decoder layer (202.4M) + eh_proj 2H x H + 3 norms.
    assert with_mtp - count_parameters(p).total == 202_383_360 + 2 * 4096 * 4096 + 3 * 4096


def test_dense_active_equals_total_and_moe_active_is_smaller():
    assert count_parameters(get_preset("tri-21b")).active == count_parameters(
        get_preset("tri-21b")).total
    moe = count_parameters(get_preset("trinity-large"))
    assert moe.active < moe.total / 20
