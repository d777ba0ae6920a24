"""Device discipline, checked on CPU: a real training run under ``device_harness``.

On a GPU node a batch left in host memory, or a collective on a tensor created without
``device=`` (a CPU tensor on an NCCL group), fails at the first step. On CPU both run, so the
harness makes them fail here: batches come out of the data pipeline as host-only tensors,
tensors created without a device inside the loop are ``meta``, and every collective and model
forward checks its tensors against ``platform.device.compute_device()``.

The run covers what a step reaches: micro-batches through forward_step, the loss reduction,
the NaN guard (a poisoned step is skipped, its samples gathered), evaluation, a checkpoint
save, MTP loss logging (tiny-trinity has an MTP layer and MoE) and the exit signal
(``--exit-signal-handler``: a SIGUSR1 makes the run save and stop; ``--exit-duration-in-mins``
agrees on the elapsed time every step).
"""

from __future__ import annotations

import os
import signal

import pytest

from multiprocess import run_distributed


def _disciplined_run(cache: str, save: str) -> dict:
    import device_harness

    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training import objective
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    counts = device_harness.install()

    # The harness must be able to fail: each kind of misplaced tensor is refused.
    refused = []
    import torch

    from megatron_trillion.platform.distributed import initialize_single_process

    initialize_single_process()
    for probe in (
        lambda: torch.distributed.all_reduce(torch.zeros(2, device="meta")),
        lambda: torch.distributed.all_reduce(torch.zeros(2).as_subclass(
            device_harness.HostTensor)),
        lambda: torch.zeros(2).as_subclass(device_harness.HostTensor) + 1,
    ):
        try:
            probe()
        except device_harness.Misplaced as exc:
            refused.append(str(exc))
    from megatron_trillion.platform.distributed import destroy_distributed

    destroy_distributed()

    progress = {"done": 0}
    real_forward = objective.lm_forward_step

    def poisoning_forward(data_iterator, model):
        output, loss = real_forward(data_iterator, model)
        if progress["done"] + 1 == 2:  # iteration 2: NaN loss -> the guard skips the step
            output = output * float("nan")
        return output, loss

    objective.lm_forward_step = poisoning_forward
    losses, lines = [], []

    def on_step(state, result):
        progress["done"] = state.iteration
        losses.append(result["lm loss"])
        if state.iteration == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's pre-timeout signal

    argv = ["--preset", "tiny-trinity", "--mock-data", "--data-cache-path", cache,
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "6", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1",
            "--seed", "7", "--no-progress-bar", "--eval-interval", "2", "--eval-iters", "1",
            "--save", save, "--save-interval", "2", "--exit-signal-handler",
            "--exit-duration-in-mins", "1000"]  # (a per-step collective too)
    final, _ = pretrain(parse_args(argv), log=lines.append, on_step=on_step)
    return {"counts": counts, "refused": refused, "losses": losses, "lines": lines,
            "iteration": final.iteration, "skipped": final.skipped_iterations,
            "flops": final.floating_point_operations}


@pytest.mark.slow
def test_training_step_keeps_every_tensor_on_the_compute_device(tmp_path):
    (result,) = run_distributed(_disciplined_run, 1, timeout=600,
                                cache=str(tmp_path / "cache"), save=str(tmp_path / "ckpt"))
    assert len(result["refused"]) == 3, result["refused"]
    counts = result["counts"]
    assert counts["forwards"] > 0 and counts["collectives"] > 0 and counts["host batches"] > 0
    lines = "\n".join(result["lines"])
    assert result["iteration"] == 3 and "exiting at iteration 3" in lines  # the signal
    assert result["skipped"] == 1 and "skipped iteration 2" in lines       # the NaN guard
    assert "validation loss at iteration 2" in lines                       # evaluation
    assert "mtp_1 loss" in lines                                           # MTP logging
    assert sorted(os.listdir(tmp_path / "ckpt"))[:2] == ["iter_0000002", "iter_0000003"]
    assert result["flops"] > 0
