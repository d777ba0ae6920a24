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
