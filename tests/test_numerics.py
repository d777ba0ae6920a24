"""The NaN/inf guard: skip decisions, the consecutive limit, sample records, optimizer step."""

import math

import pytest
import torch

from megatron_trillion.training import numerics
from megatron_trillion.training.numerics import (
    NO_LOSS_TOKENS,
    NonFiniteTrainingError,
    NumericsGuard,
    SampleRef,
    guarded_optimizer_step,
)


def test_finite_steps_proceed_and_reset_count():
    guard = NumericsGuard(max_consecutive_bad_steps=3)
    assert guard.check(1, 2.5, 1.0).proceed
    bad = guard.check(2, float("nan"), 1.0, samples=[SampleRef("ko", (17, 42))])
    assert not bad.proceed and bad.reason == "loss is nan"
    assert guard.consecutive_bad_steps == 1
    assert guard.check(3, torch.tensor(2.4), torch.tensor(0.9)).proceed
    assert guard.consecutive_bad_steps == 0
    assert guard.total_skipped_steps == 1
    assert guard.skipped_steps[0].samples == (SampleRef("ko", (17, 42)),)
    assert guard.skipped_steps[0].describe() == (
        "skipped iteration 2: loss is nan | samples: ko: docs [17, 42]")


def test_grad_norm_inf_and_missing_loss_on_other_stages():
    guard = NumericsGuard()
    decision = guard.check(7, None, float("inf"))  # a pipeline stage without the loss
    assert not decision.proceed and decision.reason == "grad norm is inf"
    assert guard.check(8, None, 3.0).proceed


def test_raises_after_n_consecutive_bad_steps_naming_iteration_and_limit():
    guard = NumericsGuard(max_consecutive_bad_steps=3)
    assert not guard.check(10, math.inf, 1.0, [SampleRef("en", (1,))]).proceed
    assert not guard.check(11, 1.0, math.nan, [SampleRef("en", (2,))]).proceed
    with pytest.raises(NonFiniteTrainingError) as err:
        guard.check(12, math.nan, math.nan, [SampleRef("ja", (3, 4)), SampleRef("en", (5,))])
    message = str(err.value)
    assert "stopping at iteration 12" in message
    assert "3 consecutive steps" in message
    assert "--max-consecutive-nonfinite-steps=3" in message
    assert "skipped iteration 10: loss is inf | samples: en: docs [1]" in message
    assert "ja: docs [3, 4]; en: docs [5]" in message


def test_a_step_without_loss_tokens_is_skipped_but_is_no_numerical_problem():
    guard = NumericsGuard(max_consecutive_bad_steps=2)
    assert guard.check(1, 0.7, 1.0, loss_count=torch.tensor(12.0)).proceed
    assert not guard.check(2, math.nan, 1.0).proceed
    empty = guard.check(3, 0.0, 0.0, [SampleRef("en", (4,))], loss_count=torch.tensor(0.0))
    assert not empty.proceed and not empty.nonfinite
    assert "no loss tokens" in empty.reason
    # counted as skipped, neither resetting nor extending the run of non-finite steps
    assert guard.total_skipped_steps == 2 and guard.consecutive_bad_steps == 1
    with pytest.raises(NonFiniteTrainingError) as err:
        guard.check(4, math.nan, 1.0, loss_count=0)
    assert "skipped iteration 3" not in str(err.value)


def test_state_round_trip():
    guard = NumericsGuard(max_consecutive_bad_steps=4)
    guard.check(1, math.nan, 1.0, [SampleRef("en", (9,))])
    guard.check(2, math.nan, 1.0)
    restored = NumericsGuard(max_consecutive_bad_steps=4)
    restored.load_state_dict(guard.state_dict())
    assert restored == guard
    restored.check(3, math.nan, 1.0)
    with pytest.raises(NonFiniteTrainingError, match="iteration 4"):
        restored.check(4, math.nan, 1.0)


def test_only_the_latest_skip_records_are_kept_and_every_skip_is_counted():
    """A long GRPO run skips many steps with nothing to learn: the guard (and so every
    checkpoint) keeps the latest KEPT_SKIP_RECORDS of them, and still the non-finite steps a
    stop lists, however many empty steps lie between them."""
    limit = numerics.KEPT_SKIP_RECORDS
    guard = NumericsGuard(max_consecutive_bad_steps=limit + 8)
    iteration = 0
    for _ in range(3 * limit):
        iteration += 1
        guard.check(iteration, 0.0, 0.0, [SampleRef("rl", (iteration,))], loss_count=0)
    for _ in range(limit + 7):  # non-finite, each followed by an empty step
        iteration += 1
        guard.check(iteration, math.nan, 1.0)
        iteration += 1
        guard.check(iteration, 0.0, 0.0, loss_count=0)
    assert guard.total_skipped_steps == 3 * limit + 2 * (limit + 7)
    empty = [s.iteration for s in guard.skipped_steps if s.reason == NO_LOSS_TOKENS]
    nonfinite = [s.iteration for s in guard.skipped_steps if s.reason != NO_LOSS_TOKENS]
    assert empty == list(range(iteration - 2 * limit + 2, iteration + 1, 2))
    assert len(nonfinite) == limit + 7  # all of them: the limit is the stop's run
    restored = NumericsGuard(max_consecutive_bad_steps=limit + 8)
    restored.load_state_dict(guard.state_dict())
    assert restored == guard and len(guard.state_dict()["skipped_steps"]) == 2 * limit + 7
    with pytest.raises(NonFiniteTrainingError) as err:
        restored.check(iteration + 1, math.nan, 1.0)
    listed = str(err.value)
    assert all(f"skipped iteration {i}:" in listed for i in nonfinite), listed
    assert f"skipped iteration {iteration + 1}:" in listed


def test_invalid_limit():
    with pytest.raises(ValueError, match="--max-consecutive-nonfinite-steps"):
        NumericsGuard(max_consecutive_bad_steps=0)


def _guarded_megatron_steps():
    """One rank: a megatron-core FP32Optimizer skips a NaN-gradient step, weights untouched."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(), seed=1)
    layer = torch.nn.Linear(4, 3)
    config = OptimizerConfig(optimizer="adam", lr=0.1, clip_grad=1.0)
    optimizer = FP32Optimizer(torch.optim.AdamW(layer.parameters(), lr=0.1), config, None)
    optimizer.grad_stats_parallel_group = None
    guard = NumericsGuard(max_consecutive_bad_steps=2)
    x = torch.ones(2, 4)

    layer(x).sum().backward()
    ok = guarded_optimizer_step(optimizer, guard, 1, loss=1.0)
    after_good = layer.weight.detach().clone()

    optimizer.zero_grad()
    (layer(x).sum() * float("nan")).backward()
    skipped = guarded_optimizer_step(optimizer, guard, 2, loss=1.0,
                                     samples=[SampleRef("en", (3,))])
    weights_untouched = torch.equal(layer.weight, after_good)
    raised = ""
    optimizer.zero_grad()
    (layer(x).sum() * float("nan")).backward()
    try:
        guarded_optimizer_step(optimizer, guard, 3, loss=float("nan"))
    except NonFiniteTrainingError as exc:
        raised = str(exc)
    return {
        **_one_norm_per_step(x),
        "first_proceeds": ok[0].proceed and ok[1],
        "first_norm_finite": math.isfinite(ok[2]),
        "second_skipped": not skipped[0].proceed,
        "second_reason": skipped[0].reason,
        "weights_untouched": weights_untouched,
        "weights_finite": bool(torch.isfinite(layer.weight).all()),
        "raised": raised,
    }


def _one_norm_per_step(x: torch.Tensor) -> dict:
    """A guarded step against megatron-core's own ``step()`` on a copy: the same clipped update
    (the clip binds: clip_grad 0.01), with the gradient norm computed once instead of twice."""
    from unittest import mock

    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer

    layers, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(3)
        layer = torch.nn.Linear(4, 3)
        config = OptimizerConfig(optimizer="adam", lr=0.1, clip_grad=0.01)
        optimizer = FP32Optimizer(torch.optim.AdamW(layer.parameters(), lr=0.1), config, None)
        optimizer.grad_stats_parallel_group = None
        layer(x).sum().backward()
        layers.append(layer)
        optimizers.append(optimizer)
    _, expected_norm, _ = optimizers[0].step()
    counting = mock.Mock(wraps=megatron_optimizer.get_grad_norm_fp32)
    with mock.patch.object(megatron_optimizer, "get_grad_norm_fp32", counting):
        _, updated, norm, _ = guarded_optimizer_step(optimizers[1], NumericsGuard(), 1, loss=1.0)
    return {"same_update": updated and torch.equal(layers[0].weight, layers[1].weight)
            and torch.equal(layers[0].bias, layers[1].bias),
            "same_norm": norm == expected_norm, "norm_passes": counting.call_count}


@pytest.mark.slow
def test_guarded_optimizer_step_skips_nan_update():
    from multiprocess import run_distributed

    (result,) = run_distributed(_guarded_megatron_steps, 1, timeout=120)
    # The guard's norm is the one the update clips with: one norm pass (and all-reduce) a step.
    assert result["same_update"] and result["same_norm"] and result["norm_passes"] == 1
    assert result["first_proceeds"] and result["first_norm_finite"]
    assert result["second_skipped"] and result["second_reason"] == "grad norm is nan"
    assert result["weights_untouched"] and result["weights_finite"]
    assert "stopping at iteration 3" in result["raised"]
