"""Each redirect of the CPU layer, its version guard, and that it stays off when CUDA exists."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from megatron_trillion.platform import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is for CPU hosts")


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True  # idempotent
    assert cpu_compat.is_applied()


def test_current_device_is_the_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)
    assert rope.inv_freq.device.type == "cpu"


def test_tensor_cuda_is_identity():
    t = torch.ones(3)
    assert t.cuda() is t


def test_hard_coded_cuda_factories_land_on_cpu():
    from megatron.core.optimizer import grad_scaler, optimizer
    from megatron.core.transformer.utils import get_default_causal_mask

    scaler = grad_scaler.ConstantGradScaler(1.0)
    assert scaler.scale.device.type == "cpu"
    assert get_default_causal_mask(4).device.type == "cpu"
    # Only the listed megatron-core modules see the mapped torch; torch itself is untouched.
    assert isinstance(optimizer.torch, cpu_compat._CpuTorch)
    assert torch.zeros is not optimizer.torch.zeros
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_grad_norm_and_clipping_run_on_cpu_tensors():
    from megatron.core.optimizer.clip_grads import (
        clip_grad_by_total_norm_fp32,
        get_grad_norm_fp32,
    )

    torch.distributed.is_initialized() or _single_process_group()
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2, 2))]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    norm = get_grad_norm_fp32([p.grad for p in params])
    assert norm == pytest.approx(float(np.sqrt(8 * 9)), rel=1e-6)
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    assert float(torch.cat([p.grad.flatten() for p in params]).norm()) == pytest.approx(1.0, 1e-4)
    # Outside the wrapped functions a CPU tensor still reports its true type.
    assert params[0].grad.type() == "torch.FloatTensor"


def _single_process_group():
    import os

    from multiprocess import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(7)
    with tracker.fork():
        a = torch.rand(3)
    after_fork = torch.rand(3)
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    # The fork draws from its own seeded stream and leaves the default stream where it was.
    np.testing.assert_array_equal(after_fork.numpy(), expected_default.numpy())
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    with tracker.fork():
        b = torch.rand(3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_streams_and_events_are_no_ops():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.ones(2) * 2
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.current_stream().record_event(torch.cuda.Event())
    torch.cuda.synchronize()
    assert float(x.sum()) == 4.0


def test_moe_split_sizes_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [1, 2]
    t = torch.tensor([3])
    assert moe_utils.maybe_move_tensor_to_cpu(t) is t
    assert moe_utils.te_general_gemm is None


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_not_applied_when_cuda_is_present():
    result = _run("""
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from megatron_trillion.platform import cpu_compat
        assert cpu_compat.apply() is False
        assert not cpu_compat.is_applied()
        assert torch.cuda.current_device is original
        from megatron.core.optimizer import optimizer
        assert optimizer.torch is torch
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_missing_target_is_a_clear_error():
    result = _run("""
        import megatron.core.tensor_parallel.random as r
        del r._get_cuda_rng_state
        from megatron_trillion.platform import cpu_compat
        try:
            cpu_compat.apply()
        except RuntimeError as e:
            print(e)
        else:
            raise SystemExit("no error")
        assert not cpu_compat.is_applied()
    """)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "_get_cuda_rng_state not found in megatron-core 0.16.1" in result.stdout
