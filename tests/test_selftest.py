"""``python -m megatron_trillion.selftest``: its CPU checks, its table and the arithmetic of its
GPU checks (run here on CPU; only the kernels themselves need a GPU)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_trillion.selftest import (
    FAIL,
    PASS,
    SKIPPED,
    Check,
    Context,
    Result,
    format_table,
    parse_args,
    run_checks,
)
from megatron_trillion.selftest import checks

ROOT = Path(__file__).resolve().parents[1]


def _context(**changes) -> Context:
    values = dict(cuda=False, te_version=None, gpu_count=0, device_name=None)
    values.update(changes)
    return Context(**values)


def test_run_checks_turns_preconditions_into_skips_and_exceptions_into_fails():
    def broken(context):
        raise RuntimeError("kernel exploded")

    rows = run_checks([Check("fine", lambda c: Result(PASS, "ok")),
                       Check("gpu-only", lambda c: Result(PASS), ("cuda", "te")),
                       Check("two-gpus", lambda c: Result(PASS), ("2 gpus",)),
                       Check("broken", broken)], _context())
    status = {name: result for name, result, _ in rows}
    assert status["fine"] == Result(PASS, "ok")
    assert status["gpu-only"] == Result(SKIPPED, "no CUDA device")
    assert status["two-gpus"] == Result(SKIPPED, "0 GPU(s) visible, needs 2")
    assert status["broken"].status == FAIL
    assert "RuntimeError: kernel exploded (test_selftest.py:" in status["broken"].detail
    table = format_table(rows)
    assert "1 passed, 1 failed, 2 skipped" in table
    assert _context(cuda=True, gpu_count=1).missing(("cuda", "te")) == \
        "Transformer Engine not installed"


def test_transformer_engine_range_comes_from_megatron_core_metadata():
    wanted = checks.transformer_engine_requirement()
    assert checks.version_in_range("2.9.0", wanted)
    assert checks.version_in_range("2.11.0+4f2a1b3", wanted)  # NGC builds carry a local tag
    assert not checks.version_in_range("2.3.0+5de3e14", wanted)  # the 25.04 image's TE
    assert not checks.version_in_range("2.12.0", wanted)
    # TE outside the range is a FAIL naming the range; absent on CPU is a skip.
    result = checks.check_transformer_engine(_context(cuda=True, te_version="2.3.0"))
    assert result.status == FAIL and wanted in result.detail and "2.3.0" in result.detail
    assert checks.check_transformer_engine(_context()).status == SKIPPED
    assert checks.check_transformer_engine(_context(cuda=True)).status == FAIL


def test_reference_curve_comparison():
    reference = checks.read_reference_curve()
    assert len(reference) == checks.REFERENCE_STEPS
    assert checks.compare_curve(reference[:5], reference, 1e-4).status == PASS
    drifted = [x * 1.001 for x in reference]
    assert checks.compare_curve(drifted, reference, checks.CURVE_TOLERANCE["bf16"]).status == PASS
    assert checks.compare_curve(drifted, reference, checks.CURVE_TOLERANCE["fp32"]).status == FAIL
    diverged = reference[:3] + [reference[3] * 1.2]
    result = checks.compare_curve(diverged, reference, checks.CURVE_TOLERANCE["bf16"])
    assert result.status == FAIL and "at step 4" in result.detail
    assert checks.compare_curve([float("nan")], reference, 1.0).status == FAIL
    # A model that learned nothing per batch (uniform logits: ln 4096 every step) is caught.
    uniform = [math.log(4096)] * len(reference)
    assert checks.compare_curve(uniform, reference, checks.CURVE_TOLERANCE["bf16"]).status == FAIL


def test_bus_bandwidth_and_nominal_figures():
    # 8 ranks all-reducing 1 GB in 10 ms: 100 GB/s algorithm bandwidth, x 2*7/8 on the bus.
    assert checks.bus_bandwidth_gbps("all_reduce", 10**9, 0.01, 8) == pytest.approx(175.0)
    assert checks.bus_bandwidth_gbps("all_gather", 10**9, 0.01, 8) == pytest.approx(87.5)
    assert checks.nominal_link_gbps("NVIDIA H100 80GB HBM3") == 450.0
    assert checks.nominal_link_gbps("NVIDIA H200") == 450.0
    assert checks.nominal_link_gbps("NVIDIA H100 PCIe") is None
    from megatron_trillion.platform.device import device_peak_tflops

    assert device_peak_tflops("NVIDIA H200") == device_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert device_peak_tflops("NVIDIA A10G") is None


def test_layer_flops_counts_weights_and_causal_attention():
    preset = checks.layer_preset()
    assert (preset.hidden_size, preset.ffn_hidden_size, preset.num_layers) == (4096, 11008, 1)
    h, f, s = 4096, 11008, checks.LAYER_SEQ
    weights = 4 * h * h + 3 * h * f  # q, k, v, o (32 heads, no GQA) + SwiGLU
    expected = 3 * (2 * weights * s + 4 * h * s * (s + 1) // 2)
    assert checks.layer_training_flops(preset, s) == pytest.approx(expected)


def test_attention_measures():
    inputs = checks.attention_inputs()
    cpu = torch.device("cpu")
    dense = checks.run_attention(checks.dense_block_causal_attention, inputs, torch.float32, cpu)
    assert set(dense) == {"out", "dq", "dk", "dv"}
    errors = checks.relative_errors(dense, dense)
    assert max(errors.values()) == 0.0
    # The dense definition keeps blocks apart: changing block 2's keys leaves block 1 alone.
    changed = dict(inputs, k=inputs["k"].clone())
    changed["k"][7:30] += 1.0
    other = checks.run_attention(checks.dense_block_causal_attention, changed, torch.float32, cpu)
    assert torch.equal(other["out"][:7], dense["out"][:7])
    assert not torch.allclose(other["out"][7:30], dense["out"][7:30])


def test_steps_are_bounded_by_the_reference():
    assert parse_args(["--steps", "3"]).steps == 3
    with pytest.raises(SystemExit):
        parse_args(["--steps", "21"])


@pytest.mark.slow
def test_cpu_run_passes_its_checks_and_names_every_skipped_gpu_check(tmp_path):
    """The command a user runs, on this CPU machine: CPU checks pass, GPU checks are skipped
    with the reason, exit 0. (Two training steps instead of twenty keep it short.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, "-m", "megatron_trillion.selftest", "--steps", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in {c.name for c in checks.CHECKS}}
    assert rows == {
        "versions": PASS, "transformer-engine": SKIPPED, "xlda-attention-reference": PASS,
        "xlda-attention-te-bf16": SKIPPED, "probe-logits": PASS, "training-curve": PASS,
        "fp8-steps": SKIPPED, "fp8-param-init": SKIPPED, "gradient-accumulation-fusion": SKIPPED,
        "te-padding-stated": SKIPPED, "nccl-bandwidth": SKIPPED,
        "checkpoint-round-trip": PASS, "layer-throughput": SKIPPED,
    }, proc.stdout
    assert "no CUDA device" in proc.stdout and "CPU fp32: 2 steps" in proc.stdout
    assert "5 passed, 0 failed, 8 skipped" in proc.stdout


def test_layer_timing_and_mfu_verdict_on_a_small_cpu_layer():
    """The layer-throughput check's code, run on CPU with the local spec at a small width."""
    import dataclasses

    from megatron_trillion.models.xlda_attention import XLDACoreAttention

    seen = []
    original = XLDACoreAttention.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("packed_seq_params"))
        return original(self, *args, **kwargs)

    with checks.single_process_group():
        small = dataclasses.replace(checks.layer_preset(), hidden_size=128, ffn_hidden_size=256,
                                    num_attention_heads=4)
        seconds = checks.time_layer(small, 64, "local", iterations=1, warmup=1)
        # The timed layer is the one training runs: THD blocks reach the attention.
        with mock.patch.object(XLDACoreAttention, "forward", spy):
            assert checks.time_layer(small, 64, "local", iterations=1, warmup=0,
                                     blocks=(0, 16, 40, 64)) > 0
    assert seen and all(p.cu_seqlens_q.tolist() == [0, 16, 40, 64] for p in seen)
    assert checks.layer_training_flops(small, 64, (0, 16, 40, 64)) < \
        checks.layer_training_flops(small, 64)
    assert seconds > 0
    flops = checks.layer_training_flops(small, 64)
    # The verdict follows the MFU: 50% of the peak passes, 5% fails; an unknown peak passes
    # and says so.
    achieved = flops / seconds / 1e12
    assert checks.layer_result(small, 64, seconds, achieved / 0.5).status == PASS
    failing = checks.layer_result(small, 64, seconds, achieved / 0.05)
    assert failing.status == FAIL and "below 20%" in failing.detail
    assert "MFU unknown" in checks.layer_result(small, 64, seconds, None).detail


def test_probe_logits_row_passes_bf16_and_fails_on_a_wrong_mask_rope_or_mtp_roll():
    """The step-0 logits row on CPU (local spec, BF16 against fp32) passes; a wrong block mask,
    RoPE positions restarting inside blocks, or MTP's roll ignoring block ends each move some
    token's logits far beyond its tolerance."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import multi_token_prediction

    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks

    tolerance = checks.PROBE_TOLERANCE["bf16"]
    with checks.single_process_group():
        row = checks.check_probe_logits(_context())
        model = checks.probe_model("local", False, torch.device("cpu"))
        batch = checks.probe_batch(4096)
        reference = checks.probe_logits(model, batch)

        def broken(probe=batch, **patches):
            with mock.patch.multiple(**patches) if patches else contextlib.nullcontext():
                measured = checks.probe_logits(model, probe)
            return checks._within(checks.logit_errors(measured, reference), tolerance)

        one_block = dict(batch, packed_seq_params=packed_seq_params_from_blocks(
            torch.tensor([0, checks.PROBE_BLOCKS[-1]], dtype=torch.int32)))
        thd_rope = rope_utils._apply_rotary_pos_emb_thd
        inner = torch.tensor([0, 7, 16, 30, 31, 48, 64, 80, 96, 112, 128], dtype=torch.int32)

        def plain_roll(tensor, shifts, dims, params, group=None):
            rolled = tensor.roll(-1, -1)
            return rolled, rolled.sum()

        rows = {
            "mask": broken(one_block),
            "rope": broken(target=rope_utils, _apply_rotary_pos_emb_thd=(
                lambda t, cu_seqlens, freqs, **kw: thd_rope(t, inner, freqs, **kw))),
            "roll": broken(target=multi_token_prediction, _roll_tensor_packed_seq=plain_roll),
        }
    uniform = {name: torch.zeros_like(logits) for name, logits in reference.items()}
    assert checks._within(checks.logit_errors(uniform, reference), tolerance).status == FAIL
    assert row.status == PASS and "CPU local BF16" in row.detail, row.detail
    assert {name: result.status for name, result in rows.items()} == \
        {"mask": FAIL, "rope": FAIL, "roll": FAIL}
    assert "mtp-1" in rows["roll"].detail


def test_checkpoint_round_trip_row_fails_when_the_optimizer_state_is_dropped(tmp_path):
    """The row resumes a distributed-optimizer checkpoint and takes one more step; a reload
    that keeps the weights but loses the Adam state (a dropped state) takes another step."""
    from megatron_trillion.training import checkpointing

    original = checkpointing.load_checkpoint_dir

    def weights_only(*args, **kwargs):
        return original(*args, **dict(kwargs, load_optimizer=False))

    with checks.single_process_group(), \
            mock.patch.object(checkpointing, "load_checkpoint_dir", weights_only):
        result = checks.check_checkpoint_round_trip(_context(workdir=str(tmp_path)))
    assert result.status == FAIL and "distributed optimizer" in result.detail, result.detail
    # the verdict's arithmetic: a deviation of 10% of the step's update is the GPU limit
    saved, after = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    tolerance = checks.ROUND_TRIP_TOLERANCE["bf16"]
    assert checks.round_trip_result(saved, {"w": torch.ones(3)}, after, 0.0).status == PASS
    assert checks.round_trip_result(saved, {"w": torch.full((3,), 1.05)}, after,
                                    tolerance).status == PASS
    assert checks.round_trip_result(saved, {"w": torch.full((3,), 1.5)}, after,
                                    tolerance).status == FAIL
