"""The central test: the real training entry point gives the single-process loss curve under
every parallel layout, from independent runs with the same seed (fp32, no dropout).

The vocabulary has 8,000 tokens, not a multiple of 256: one process pads it to 8,064 rows, TP2
to 8,192, and the curves must still agree (the padding is masked out of the model)."""

from __future__ import annotations

import numpy as np
import pytest

from multiprocess import run_distributed

STEPS = 5
MBS = "2"


def train_losses(argv: list[str]) -> list[float]:
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    losses: list[float] = []
    pretrain(parse_args(argv), log=lambda line: None,
             on_step=lambda state, result: losses.append(result["lm loss"]))
    return losses


def _argv(preset: str, cache: str, *layout: str) -> list[str]:
    return [
        "--preset", preset, "--mock-data", "--data-cache-path", cache, "--seq-length", "64",
        "--micro-batch-size", MBS, "--global-batch-size", "8", "--train-iters", str(STEPS),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "2",
        "--lr-wsd-decay-fraction", "0.4", "--attention-masking", "xlda", "--seed", "7",
        "--vocab-size", "8000", "--no-progress-bar", *layout,
    ]


def _assert_same_curve(parallel: list, serial: list) -> None:
    assert len(serial) == STEPS and serial[0] > serial[-1]  # it trains
    print(f"max |parallel - serial| loss: "
          f"{max(abs(a - b) for losses in parallel for a, b in zip(losses, serial)):.2e}")
    for rank_losses in parallel:
        np.testing.assert_allclose(rank_losses, serial, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def dense_serial(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("dense"))
    (losses,) = run_distributed(train_losses, 1, argv=_argv("tiny-tri-7b", cache))
    return cache, losses


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    (2, ["--use-distributed-optimizer"]),
], ids=["tp2-sp", "pp2-1f1b", "pp2-interleaved", "dp2-distopt"])
def test_dense_layouts_match_serial(dense_serial, world, layout):
    cache, serial = dense_serial
    parallel = run_distributed(train_losses, world, timeout=600,
                               argv=_argv("tiny-tri-7b", cache, *layout))
    _assert_same_curve(parallel, serial)


@pytest.mark.slow
def test_tp2_pp2_dp2_matches_serial(dense_serial):
    cache, serial = dense_serial
    parallel = run_distributed(
        train_losses, 8, timeout=900,
        argv=_argv("tiny-tri-7b", cache, "--tensor-model-parallel-size", "2",
                   "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"))
    _assert_same_curve(parallel, serial)


@pytest.mark.slow
def test_moe_ep2_matches_serial(tmp_path):
    cache = str(tmp_path)
    (serial,) = run_distributed(train_losses, 1, argv=_argv("tiny-trinity", cache))
    parallel = run_distributed(train_losses, 2, timeout=600,
                               argv=_argv("tiny-trinity", cache,
                                          "--expert-model-parallel-size", "2"))
    _assert_same_curve(parallel, serial)
