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


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_reported_once_and_names_the_mistake(tmp_path):
    """What `torchrun --nproc-per-node 2` shows for a flag conflict: the error once (rank 0),
    every rank exits 2, and torchrun's own failure report (it exits 1) names the mistake as
    the root cause instead of pointing at how to enable tracebacks."""
    import os
    import subprocess
    import sys

    from multiprocess import free_port

    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), "-m", "megatron_trillion.pretrain",
         "--preset", "tiny-tri-7b", "--num-attention-heads", "3", "--num-query-groups", "1",
         "--kv-channels", "32", "--tensor-model-parallel-size", "2", "--mock-data",
         "--train-iters", "1", "--micro-batch-size", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    mistake = "--num-attention-heads (3) is not divisible by --tensor-model-parallel-size (2)"
    print(run.stderr)
    assert run.returncode == 1
    ranks, report = run.stderr.split("ChildFailedError", 1)
    # rank 0's line (unless torchrun stopped it first, when rank 1 failed sooner)
    assert ranks.count("error: invalid configuration (2 problems):\n") <= 1
    root_cause = report.split("Root Cause (first observed failure):")[1]
    assert "exitcode  : 2" in root_cause and mistake in root_cause
    assert "To enable traceback" not in report
