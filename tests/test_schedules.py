"""WSD / cosine learning rates, weight-decay + MTP anneal switch, batch-size ramp-up."""

import math
import types

import pytest

from megatron_trillion.training.schedules import (
    AnnealConfig,
    BatchSizeRampup,
    LRScheduleConfig,
    ParamScheduler,
    StepBatchSizeSchedule,
    anneal_config_for,
    iterations_for_samples,
    lr_at,
    rampup_phase,
    samples_for_iterations,
)


def _optimizer(*groups):
    return types.SimpleNamespace(param_groups=[dict(g) for g in groups])


# ---------------------------------------------------------------------------- learning rate

def test_wsd_inverse_proportional_known_values():
    cfg = LRScheduleConfig(max_lr=3e-4, min_lr=3e-5, total_steps=100_000, warmup_steps=2000)
    assert cfg.decay_start == 90_000 and cfg.decay_steps == 10_000
    assert lr_at(cfg, 0) == 0.0
    assert lr_at(cfg, 1000) == pytest.approx(1.5e-4, rel=1e-12)
    assert lr_at(cfg, 2000) == pytest.approx(3e-4, rel=1e-12)
    assert lr_at(cfg, 50_000) == 3e-4
    assert lr_at(cfg, 90_000) == 3e-4
    # halfway through the decay: 1/lr = (1/3e-4 + 1/3e-5) / 2  ->  lr = 2/(11/3e-4) = 5.4545e-5
    assert lr_at(cfg, 95_000) == pytest.approx(3e-4 / (1 + 9 * 0.5), rel=1e-12)
    assert lr_at(cfg, 95_000) == pytest.approx(2 / (1 / 3e-4 + 1 / 3e-5), rel=1e-12)
    assert lr_at(cfg, 100_000) == pytest.approx(3e-5, rel=1e-12)
    assert lr_at(cfg, 150_000) == 3e-5
    values = [lr_at(cfg, s) for s in range(90_000, 100_001, 500)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing
    # inverse-proportional: 1/lr is linear in the step
    inv = [1 / v for v in values]
    diffs = [b - a for a, b in zip(inv, inv[1:])]
    assert max(diffs) == pytest.approx(min(diffs), rel=1e-9)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_wsd_comparison_styles(style):
    cfg = LRScheduleConfig(max_lr=1.0, min_lr=0.1, total_steps=1000, warmup_steps=10,
                           wsd_decay_style=style)
    assert lr_at(cfg, 900) == 1.0
    assert lr_at(cfg, 950) == pytest.approx(0.55, rel=1e-12)  # both are halfway at the midpoint
    assert lr_at(cfg, 1000) == pytest.approx(0.1, rel=1e-12)
    if style == "cosine":
        assert lr_at(cfg, 925) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_megatron_cosine_known_values():
    cfg = LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1100, warmup_steps=100,
                           style="cosine")
    assert lr_at(cfg, 50) == pytest.approx(5e-4)
    assert lr_at(cfg, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 600) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 1100) == pytest.approx(1e-4)


@pytest.mark.parametrize("style,wsd_style", [("cosine", "linear"), ("linear", "linear"),
                                             ("wsd", "linear"), ("wsd", "cosine"),
                                             ("constant", "linear")])
def test_matches_megatron_core_scheduler(style, wsd_style):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = LRScheduleConfig(max_lr=2e-4, min_lr=2e-5, total_steps=5000, warmup_steps=300,
                           init_lr=1e-6, style=style, wsd_decay_style=wsd_style,
                           wsd_decay_fraction=0.2)
    groups = ({"max_lr": 2e-4, "min_lr": 2e-5}, {"max_lr": 8e-4, "min_lr": 8e-5, "wd_mult": 0.0})
    theirs_opt, ours_opt = _optimizer(*groups), _optimizer(*groups)
    theirs = OptimizerParamScheduler(
        theirs_opt, init_lr=1e-6, max_lr=2e-4, min_lr=2e-5, lr_warmup_steps=300,
        lr_decay_steps=5000, lr_decay_style={"wsd": "WSD"}.get(style, style), start_wd=0.1,
        end_wd=0.1, wd_incr_steps=5000, wd_incr_style="constant", wsd_decay_steps=1000,
        lr_wsd_decay_style=wsd_style)
    ours = ParamScheduler(ours_opt, cfg, weight_decay=0.1)
    for _ in range(60):
        for a, b in zip(theirs_opt.param_groups, ours_opt.param_groups):
            # megatron-core scales init_lr per group differently (it keeps one init_lr); compare
            # only the default group during warmup.
            if ours.num_steps > 300 or a is theirs_opt.param_groups[0]:
                assert b["lr"] == pytest.approx(a["lr"], rel=1e-12, abs=1e-15), ours.num_steps
            assert b["weight_decay"] == pytest.approx(a["weight_decay"], rel=1e-12)
        theirs.step(97)
        ours.step(97)


def test_invalid_schedules_name_flags():
    with pytest.raises(ValueError, match="--min-lr > 0"):
        LRScheduleConfig(max_lr=1e-3, min_lr=0.0, total_steps=100, warmup_steps=1)
    with pytest.raises(ValueError, match="runs into the WSD decay stage"):
        LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1000, warmup_steps=950)
    with pytest.raises(ValueError, match="--lr-decay-style"):
        LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1000, style="poly")


def test_in_samples_converts_like_megatron_lm():
    cfg = LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1000, warmup_steps=20)
    samples = cfg.in_samples(global_batch_size=64)
    assert (samples.total_steps, samples.warmup_steps) == (64_000, 1280)
    assert samples.decay_start == 64 * cfg.decay_start
    assert lr_at(samples, 64 * 955) == pytest.approx(lr_at(cfg, 955), rel=1e-12)


# ---------------------------------------------------------------------------- anneal

def test_anneal_switches_at_decay_boundary_once():
    lr_cfg = LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1000, warmup_steps=10)
    mixture_main = {"en": 0.9, "ko": 0.05, "ja": 0.05}
    mixture_anneal = {"en": 0.7, "ko": 0.15, "ja": 0.15}
    anneal = anneal_config_for(lr_cfg, data_mixture=(mixture_main, mixture_anneal),
                               quality_threshold=(None, 0.8))
    assert anneal.start_step == 900
    assert anneal.stage_at(899).weight_decay == 0.1
    assert anneal.stage_at(899).mtp_loss_scaling == 0.2
    assert anneal.stage_at(900).weight_decay == 0.033
    assert anneal.stage_at(900).mtp_loss_scaling == 0.1
    assert anneal.stage_at(900).data_mixture == mixture_anneal
    assert anneal.stage_at(900).quality_threshold == 0.8

    opt = _optimizer({"wd_mult": 1.0}, {"wd_mult": 0.0})
    sched = ParamScheduler(opt, lr_cfg, anneal)
    fired = []
    for iteration in range(1, 121):
        before = sched.num_steps
        sched.step(8)  # 8 samples per iteration
        switches = anneal.switches(before, sched.num_steps)
        fired += [(iteration, s.describe(iteration)) for s in switches]
    assert [i for i, _ in fired] == [113] * 5  # 113 * 8 = 904 >= 900 > 112 * 8
    messages = [m for _, m in fired]
    assert messages[0] == "switched at iteration 113: stage main -> anneal"
    assert messages[1] == "switched at iteration 113: weight decay 0.1 -> 0.033"
    assert messages[2] == "switched at iteration 113: MTP loss scaling 0.2 -> 0.1"
    assert ("data mixture {en: 0.9, ko: 0.05, ja: 0.05} -> {en: 0.7, ko: 0.15, ja: 0.15}"
            in messages[3])
    assert messages[4] == "switched at iteration 113: quality threshold none -> 0.8"
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.033)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert sched.mtp_loss_scaling == 0.1
    assert anneal.switches(904, 912) == []


def test_anneal_rejects_bad_values():
    with pytest.raises(ValueError, match="data_mixture"):
        AnnealConfig(start_step=10, data_mixture=(None, {"en": -1.0}))
    lr_cfg = LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1000, warmup_steps=10,
                              style="cosine")
    with pytest.raises(ValueError, match="--lr-decay-style"):
        anneal_config_for(lr_cfg)


# ---------------------------------------------------------------------------- state

def test_scheduler_state_round_trip():
    lr_cfg = LRScheduleConfig(max_lr=2e-4, min_lr=2e-5, total_steps=10_000, warmup_steps=100)
    anneal = anneal_config_for(lr_cfg)
    groups = ({"max_lr": 2e-4, "min_lr": 2e-5}, {"max_lr": 8e-4, "min_lr": 8e-5})
    a = ParamScheduler(_optimizer(*groups), lr_cfg, anneal)
    for _ in range(37):
        a.step(250)
    state = a.state_dict()
    b = ParamScheduler(_optimizer(*groups), lr_cfg, anneal)
    b.load_state_dict(state)
    b.load_state_dict(state)  # loading twice must not advance (megatron-core's would)
    assert b.num_steps == a.num_steps == 9250
    assert b.optimizer.param_groups == a.optimizer.param_groups
    assert b.optimizer.param_groups[1]["lr"] == pytest.approx(4 * a.optimizer.param_groups[0]["lr"])
    for _ in range(5):
        a.step(250)
        b.step(250)
        assert b.optimizer.param_groups == a.optimizer.param_groups

    other = ParamScheduler(_optimizer(*groups), LRScheduleConfig(
        max_lr=2e-4, min_lr=2e-5, total_steps=20_000, warmup_steps=100), anneal)
    with pytest.raises(ValueError, match="total_steps") as info:
        other.load_state_dict(state)
    # The error names flags that exist (Megatron-LM's spelling).
    for flag in ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler",
                 "--lr-decay-iters"):
        assert flag in str(info.value)
    other.load_state_dict(state, override=True)  # --override-opt_param-scheduler
    assert other.num_steps == 9250 and other.lr_config.total_steps == 20_000
    checkpoint_schedule = ParamScheduler(_optimizer(*groups), LRScheduleConfig(
        max_lr=2e-4, min_lr=2e-5, total_steps=20_000, warmup_steps=100), anneal)
    checkpoint_schedule.load_state_dict(state, use_checkpoint=True)
    assert checkpoint_schedule.lr_config == lr_cfg and checkpoint_schedule.num_steps == 9250


# ---------------------------------------------------------------------------- batch ramp

def test_rampup_batch_sizes_known_values():
    # 1M -> 2M tokens at seq 4096: 256 -> 512 sequences, +64 every ramp/4 samples.
    ramp = BatchSizeRampup.from_flag([256, 64, 1_000_000], global_batch_size=512,
                                     micro_batch_size=2, data_parallel_size=16)
    assert ramp.global_batch_size_at(0) == 256
    assert ramp.global_batch_size_at(249_999) == 256
    assert ramp.global_batch_size_at(250_000) == 320
    assert ramp.global_batch_size_at(500_000) == 384
    assert ramp.global_batch_size_at(999_999) == 448
    assert ramp.global_batch_size_at(1_000_000) == 512
    assert ramp.global_batch_size_at(5_000_000) == 512
    assert ramp.num_microbatches_at(0) == 8
    assert ramp.num_microbatches_at(2_000_000) == 16
    no_ramp = BatchSizeRampup.from_flag(None, 512, 2, 16)
    assert no_ramp.global_batch_size_at(0) == 512


def test_rampup_matches_megatron_core_calculator():
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    ramp = BatchSizeRampup.from_flag([8, 4, 1000], global_batch_size=32,
                                     micro_batch_size=1, data_parallel_size=4)
    calc = RampupBatchsizeNumMicroBatchesCalculator(32, 1, 4, False, 1, 8, 4, 1000)
    consumed = 0
    while consumed < 1500:
        calc.update(consumed, consistency_check=True)
        assert ramp.global_batch_size_at(consumed) == calc.get_current_global_batch_size()
        assert ramp.num_microbatches_at(consumed) == calc.get()
        consumed += ramp.global_batch_size_at(consumed)


def test_rampup_rejects_sizes_invalid_for_data_parallel():
    expected = (r"global batch sizes 12, 20, 28 are not multiples of "
                r"--micro-batch-size \(2\) x data parallel size \(4\) = 8")
    with pytest.raises(ValueError, match=expected):
        BatchSizeRampup.from_flag([8, 4, 1000], 32, 2, 4)
    with pytest.raises(ValueError, match="not a multiple of the increment"):
        BatchSizeRampup.from_flag([8, 16, 1000], 32, 1, 8)
    with pytest.raises(ValueError, match="three values"):
        BatchSizeRampup.from_flag([8, 16], 32, 1, 8)
    with pytest.raises(ValueError, match="--global-batch-size \\(30\\) is not a multiple"):
        BatchSizeRampup.from_flag(None, 30, 2, 4)


def test_unchecked_configs_list_every_problem_instead_of_raising():
    lr = LRScheduleConfig(max_lr=1e-4, min_lr=1e-3, total_steps=10, warmup_steps=20,
                          style="cosine", init_lr=1.0, check=False)
    assert lr.errors() == ["need 0 <= --min-lr (0.001) <= --lr (0.0001)",
                           "need 0 <= --lr-warmup-init (1.0) <= --lr (0.0001)",
                           "warmup (20 steps) must be shorter than the schedule (10 steps)"]
    with pytest.raises(ValueError, match="invalid learning-rate schedule") as info:
        LRScheduleConfig(max_lr=1e-4, min_lr=1e-3, total_steps=10, warmup_steps=20,
                         style="cosine", init_lr=1.0)
    assert all(problem in str(info.value) for problem in lr.errors())
    assert LRScheduleConfig(max_lr=1e-3, min_lr=1e-4, total_steps=1000,
                            warmup_steps=10).errors() == []
    ramp = BatchSizeRampup.from_flag([3, 2, 20], 8, 1, 1, check=False)
    assert ramp.errors() == ["--rampup-batch-size: --global-batch-size (8) minus the start (3) "
                             "= 5 is not a multiple of the increment (2)"]
    step = StepBatchSizeSchedule.from_flag("1K:3 500:4", 100, 2, 1, check=False)
    assert step.errors() == [
        "--step-batch-size-schedule must start at threshold 0 (e.g. 0:16)",
        "--step-batch-size-schedule thresholds must increase",
        "--step-batch-size-schedule batch sizes [3] are not positive multiples of "
        "--micro-batch-size x data-parallel size (2)"]
    with pytest.raises(ValueError, match="thresholds must increase"):
        StepBatchSizeSchedule.from_flag("1K:3 500:4", 100, 2, 1)


def test_run_length_and_rampup_phase_under_a_batch_schedule():
    ramp = BatchSizeRampup.from_flag([8, 4, 1000], global_batch_size=32,
                                     micro_batch_size=1, data_parallel_size=4)
    # 8 until 1000/6 samples, then 12, ... (megatron-core's arithmetic): simulate by hand.
    consumed, sizes = 0, []
    while consumed <= 1000:
        sizes.append(ramp.global_batch_size_at(consumed))
        consumed += sizes[-1]
    below = [size for size in sizes if size < 32]
    assert sizes[0] == 8 and below == sizes[:len(below)]
    assert rampup_phase(ramp) == (len(below), sum(below))
    assert samples_for_iterations(ramp, len(below) + 2) == sum(below) + 64
    assert iterations_for_samples(ramp, sum(below) + 1) == len(below) + 1
    assert rampup_phase(BatchSizeRampup.from_flag(None, 32, 1, 4)) == (0, 0)
    step = StepBatchSizeSchedule.from_flag("0:2 1K:4", 100, 1, 1)  # 2 until 10 samples
    assert rampup_phase(step) == (5, 10)
