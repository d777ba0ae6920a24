"""The distributed bootstrap validates layouts with errors that name the flags involved."""

from __future__ import annotations

import pytest

from megatron_trillion.platform.distributed import (
    ParallelConfigError,
    ParallelSizes,
    validate_parallel_sizes,
)
from multiprocess import run_distributed


def test_valid_layouts_have_no_errors():
    assert validate_parallel_sizes(ParallelSizes(tensor=2, pipeline=2), 8, num_layers=4,
                                   num_attention_heads=4, num_query_groups=2) == []
    assert validate_parallel_sizes(ParallelSizes(expert=2), 2, num_moe_experts=4) == []
    assert validate_parallel_sizes(ParallelSizes(pipeline=2, virtual_pipeline=2), 2,
                                   num_layers=8) == []


@pytest.mark.parametrize(
    "sizes, world, dims, expected",
    [
        (ParallelSizes(tensor=2, pipeline=2), 6, {}, "world size 6 is not divisible"),
        (ParallelSizes(tensor=4), 4, {"num_attention_heads": 6},
         "--num-attention-heads (6) is not divisible by --tensor-model-parallel-size (4)"),
        (ParallelSizes(tensor=4), 4, {"num_attention_heads": 8, "num_query_groups": 2},
         "--num-query-groups (2) is not divisible by --tensor-model-parallel-size (4)"),
        (ParallelSizes(pipeline=2, virtual_pipeline=3), 2, {"num_layers": 8},
         "--num-layers (8) is not divisible by --pipeline-model-parallel-size (2) x virtual"),
        (ParallelSizes(expert=4), 4, {"num_moe_experts": 6},
         "--num-experts (6) is not divisible by --expert-model-parallel-size (4)"),
        (ParallelSizes(expert=2), 2, {}, "needs a MoE model"),
        (ParallelSizes(tensor=0), 2, {}, "--tensor-model-parallel-size must be >= 1"),
    ],
)
def test_bad_layouts_name_the_flags(sizes, world, dims, expected):
    errors = validate_parallel_sizes(sizes, world, **dims)
    assert any(expected in e for e in errors), errors


def test_every_conflict_is_reported_at_once():
    errors = validate_parallel_sizes(ParallelSizes(tensor=4, pipeline=3), 8, num_layers=8,
                                     num_attention_heads=6)
    assert len(errors) == 3
    message = str(ParallelConfigError(errors))
    assert "world size 8" in message and "--num-layers (8)" in message
    assert "--num-attention-heads (6)" in message


def _init_and_report(tp: int, pp: int):
    from megatron.core import parallel_state as ps

    from megatron_trillion.platform.distributed import initialize_distributed

    initialize_distributed(ParallelSizes(tensor=tp, pipeline=pp), num_layers=4)
    import torch

    return {
        "backend": torch.distributed.get_backend(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _init_bad():
    from megatron_trillion.platform.distributed import initialize_distributed

    initialize_distributed(ParallelSizes(tensor=2), num_attention_heads=3)


@pytest.mark.slow
def test_initialize_builds_groups_and_rejects_bad_sizes_before_any_group():
    ranks = run_distributed(_init_and_report, 4, tp=2, pp=1)
    assert all(r == {"backend": "gloo", "tp": 2, "pp": 1, "dp": 2} for r in ranks)
    with pytest.raises(AssertionError, match=r"--num-attention-heads \(3\)"):
        run_distributed(_init_bad, 2)
