"""Learning-rate, weight-decay, batch-size and two-stage anneal schedules.

Every value here is a pure function of the training position (the scheduler's step count, in
the unit the caller advances it by, and the consumed samples for the batch ramp), so a
checkpoint restores a schedule by restoring one integer.

Public interface (the training loop calls these)::

    LRScheduleConfig(max_lr, min_lr, total_steps, warmup_steps=2000, init_lr=0.0,
                     style="wsd", wsd_decay_fraction=0.1,
                     wsd_decay_style="inverse-proportional", check=True)
        .errors() -> list[str]                 # every problem (check=False: build, then ask)
        .decay_start -> int                    # first step of the decay stage (anneal boundary)
        .in_samples(global_batch_size) -> LRScheduleConfig   # iteration counts -> samples
    lr_at(config, step, max_lr=None, min_lr=None) -> float

    AnnealConfig(start_step, weight_decay=(0.1, 0.033), mtp_loss_scaling=(0.2, 0.1),
                 data_mixture=None, quality_threshold=(None, None))
        .stage_at(step) -> AnnealStage        # stage 0 = main, 1 = anneal; all stage values
        .switches(previous_step, step) -> list[Switch]   # what changed crossing into `step`
    anneal_config_for(lr_config, **overrides) -> AnnealConfig   # start = the WSD boundary
    Switch.describe(iteration) -> "switched at iteration N: weight decay 0.1 -> 0.033"

    BatchSizeRampup(global_batch_size, micro_batch_size, data_parallel_size,
                    start_global_batch_size=None, batch_size_increment=None, rampup_samples=0)
    BatchSizeRampup.from_flag(rampup_batch_size: Sequence[int] | None, global_batch_size,
                              micro_batch_size, data_parallel_size)   # --rampup-batch-size
        .errors() -> list[str]      # as LRScheduleConfig (also StepBatchSizeSchedule)
        .rampup_samples             # consumed samples after which the global batch is final
        .global_batch_size_at(consumed_samples) -> int
        .num_microbatches_at(consumed_samples) -> int

    samples_for_iterations(batch_schedule, iterations) / iterations_for_samples(...)
    rampup_phase(batch_schedule) -> (iterations, samples) below the final global batch

    ParamScheduler(optimizer, lr_config, anneal=None)   # drop-in for OptimizerParamScheduler
        .step(increment)            # advance (Megatron-LM passes the iteration's global batch)
        .num_steps, .lr, .weight_decay, .mtp_loss_scaling, .stage
        .get_lr(param_group), .get_wd(param_group)
        .state_dict() / .load_state_dict(state_dict)

Units. Megatron-LM advances its scheduler by the global batch size every iteration, so warmup
and decay are measured in samples (and therefore stay right while the batch ramps up); the
config here is unit-agnostic, and ``LRScheduleConfig.in_samples`` converts iteration counts the
way Megatron-LM does (``--lr-warmup-iters * --global-batch-size``).

The inverse-proportional decay. The Trillion report decays the learning rate "inverse
proportionally" to 10% of the peak over the last 10% of training. With r in [0, 1] the
fraction of the decay stage done, we use the hyperbola whose reciprocal grows linearly::

    1/lr(r) = (1 - r)/max_lr + r/min_lr      <=>      lr(r) = max_lr / (1 + (max_lr/min_lr - 1) r)

It starts at exactly max_lr (r=0), ends at exactly min_lr (r=1), is monotone, and is the
``lr ~ 1/(t + t0)`` shape (inverse-proportional in the step counted from a shifted origin
t0 = T/(max_lr/min_lr - 1)). It needs min_lr > 0.

Why a replacement and not a subclass of megatron-core's ``OptimizerParamScheduler``: its
``get_lr`` hard-codes its list of decay styles, its constructor asserts that weight decay only
ever increases (the anneal lowers it 0.1 -> 0.033), and its ``load_state_dict`` *adds* the
checkpoint's step count to the current one. ``ParamScheduler`` keeps its public interface
(``step(increment)``, ``num_steps``, ``get_lr(param_group)``, ``get_wd(param_group)``,
``state_dict``/``load_state_dict``) and its param-group conventions (per-group ``max_lr`` /
``min_lr`` / ``wd_mult``, so megatron-core's ``get_canonical_lr_for_logging`` still works and
the Muon groups can run at their own peak learning rate), and its ``cosine`` / ``linear`` /
WSD-``linear``/``cosine`` values are tested equal to megatron-core's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

LR_STYLES = ("wsd", "cosine", "linear", "constant")
WSD_DECAY_STYLES = ("inverse-proportional", "cosine", "linear")


# --------------------------------------------------------------------------------------------
# learning rate


@dataclass(frozen=True)
class LRScheduleConfig:
    """The learning-rate schedule, in scheduler steps (samples in Megatron-LM's convention).

    ``style``:
      - ``wsd``: linear warmup to ``max_lr``, constant, then decay to ``min_lr`` over the last
        ``wsd_decay_fraction`` of ``total_steps`` (the Trillion recipe);
      - ``cosine`` / ``linear``: Megatron-style warmup then decay over [warmup, total];
      - ``constant``: warmup then ``max_lr``.
    After ``total_steps`` the learning rate stays at ``min_lr``.
    """

    max_lr: float
    """Peak learning rate (--lr)."""
    min_lr: float
    """Final learning rate (--min-lr); the Trillion report uses 10% of the peak."""
    total_steps: int
    """End of the decay (--lr-decay-samples / --train-samples)."""
    warmup_steps: int = 2000
    """Length of the linear warmup (--lr-warmup-samples)."""
    init_lr: float = 0.0
    """Learning rate at step 0 of the warmup (--lr-warmup-init)."""
    style: str = "wsd"
    """One of LR_STYLES (--lr-decay-style)."""
    wsd_decay_fraction: float = 0.1
    """Fraction of ``total_steps`` the WSD decay stage takes (the last 10% by default)."""
    wsd_decay_style: str = "inverse-proportional"
    """Shape of the WSD decay stage, one of WSD_DECAY_STYLES (--lr-wsd-decay-style)."""

    check: InitVar[bool] = True
    """False: build without raising, to list every problem with :meth:`errors` (validation
    reports them together with all other flag problems)."""

    def __post_init__(self, check: bool) -> None:
        errors = self.errors() if check else []
        if errors:
            raise ValueError("invalid learning-rate schedule:\n  - " + "\n  - ".join(errors))

    def errors(self) -> list[str]:
        """Every problem of the schedule, each naming the flags involved."""
        errors = []
        if self.style not in LR_STYLES:
            errors.append(f"--lr-decay-style must be one of {LR_STYLES}, got {self.style!r}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            errors.append(f"--lr-wsd-decay-style must be one of {WSD_DECAY_STYLES}, "
                          f"got {self.wsd_decay_style!r}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            errors.append(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.max_lr})")
        if not 0.0 <= self.init_lr <= self.max_lr:
            errors.append(f"need 0 <= --lr-warmup-init ({self.init_lr}) <= --lr ({self.max_lr})")
        if self.total_steps <= 0:
            errors.append(f"the schedule length must be positive, got {self.total_steps}")
        if self.warmup_steps < 0:
            errors.append(f"warmup must be >= 0 steps, got {self.warmup_steps}")
        if self.style == "wsd":
            if not 0.0 < self.wsd_decay_fraction <= 1.0:
                errors.append(f"the WSD decay fraction must be in (0, 1], "
                              f"got {self.wsd_decay_fraction}")
            elif self.warmup_steps > self.decay_start:
                errors.append(
                    f"warmup ({self.warmup_steps} steps) runs into the WSD decay stage, which "
                    f"starts at step {self.decay_start} (= {self.total_steps} x "
                    f"(1 - {self.wsd_decay_fraction})); shorten --lr-warmup-* or lengthen training"
                )
            if self.wsd_decay_style == "inverse-proportional" and self.min_lr <= 0.0:
                errors.append("the inverse-proportional WSD decay needs --min-lr > 0 "
                              "(1/lr interpolates between 1/max_lr and 1/min_lr)")
        elif self.warmup_steps >= self.total_steps and self.style != "constant":
            errors.append(f"warmup ({self.warmup_steps} steps) must be shorter than the "
                          f"schedule ({self.total_steps} steps)")
        return errors

    @property
    def decay_steps(self) -> int:
        """Length of the WSD decay stage (megatron-core's ``wsd_decay_steps``)."""
        return max(1, round(self.total_steps * self.wsd_decay_fraction))

    @property
    def decay_start(self) -> int:
        """Step at which the decay stage starts: the anneal boundary for ``wsd``."""
        if self.style == "wsd":
            return self.total_steps - self.decay_steps
        return self.warmup_steps

    def in_samples(self, global_batch_size: int) -> "LRScheduleConfig":
        """This config with iteration counts turned into samples, as Megatron-LM does."""
        if global_batch_size <= 0:
            raise ValueError(f"--global-batch-size must be positive, got {global_batch_size}")
        return dataclasses.replace(
            self,
            total_steps=self.total_steps * global_batch_size,
            warmup_steps=self.warmup_steps * global_batch_size,
        )


def _wsd_decay_coefficient(style: str, ratio: float, max_lr: float, min_lr: float) -> float:
    """Fraction of (max_lr - min_lr) left after ``ratio`` of the decay stage."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    # inverse-proportional: lr = max / (1 + (max/min - 1) r), written as a coefficient.
    lr = max_lr / (1.0 + (max_lr / min_lr - 1.0) * ratio)
    return (lr - min_lr) / (max_lr - min_lr) if max_lr > min_lr else 1.0


def lr_at(config: LRScheduleConfig, step: int, max_lr: Optional[float] = None,
          min_lr: Optional[float] = None) -> float:
    """Learning rate after ``step`` scheduler steps.

    ``max_lr`` / ``min_lr`` override the config's for one parameter group (e.g. Muon's peak);
    the warmup start is scaled by the same ratio so every group's curve has the same shape.
    """
    max_lr = config.max_lr if max_lr is None else max_lr
    min_lr = config.min_lr if min_lr is None else min_lr
    init_lr = config.init_lr * (max_lr / config.max_lr) if config.max_lr > 0 else 0.0
    if config.warmup_steps > 0 and step <= config.warmup_steps:
        return init_lr + (max_lr - init_lr) * step / config.warmup_steps
    if config.style == "constant":
        return max_lr
    if step > config.total_steps:
        return min_lr
    if config.style == "wsd":
        if step <= config.decay_start:
            return max_lr
        ratio = (step - config.decay_start) / config.decay_steps
        coeff = _wsd_decay_coefficient(config.wsd_decay_style, ratio, max_lr, min_lr)
        return min_lr + coeff * (max_lr - min_lr)
    ratio = (step - config.warmup_steps) / (config.total_steps - config.warmup_steps)
    if config.style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


# --------------------------------------------------------------------------------------------
# two-stage anneal


@dataclass(frozen=True)
class AnnealStage:
    """Every stage-dependent value in effect at one step."""

    index: int
    """0 = main stage, 1 = anneal stage."""
    name: str
    weight_decay: float
    mtp_loss_scaling: float
    """MTP loss weight alpha (megatron-core's ``mtp_loss_scaling_factor``)."""
    data_mixture: Optional[Mapping[str, float]]
    """Dataset/language name -> sampling weight; None keeps the data loader's mixture."""
    quality_threshold: Optional[float]
    """Minimum document quality score admitted; None = no cut."""


@dataclass(frozen=True)
class Switch:
    """One value that changed at the anneal boundary."""

    what: str
    old: Any
    new: Any

    def describe(self, iteration: int) -> str:
        return (f"switched at iteration {iteration}: "
                f"{self.what} {_fmt(self.old)} -> {_fmt(self.new)}")


def _fmt(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in value.items()) + "}"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class AnnealConfig:
    """The two-stage recipe: what changes when training enters the anneal (decay) stage.

    Each pair is (main stage value, anneal stage value). ``start_step`` is in the scheduler's
    unit; ``anneal_config_for`` sets it to the WSD decay boundary.
    """

    start_step: int
    """First step of the anneal stage (the step count at which the switch happens)."""
    weight_decay: tuple[float, float] = (0.1, 0.033)
    mtp_loss_scaling: tuple[float, float] = (0.2, 0.1)
    data_mixture: Optional[tuple[Optional[Mapping[str, float]], Mapping[str, float]]] = None
    """(main weights or None, anneal weights), e.g. the multilingual share tripled."""
    quality_threshold: tuple[Optional[float], Optional[float]] = (None, None)

    def __post_init__(self) -> None:
        errors = []
        if self.start_step < 0:
            errors.append(f"the anneal start step must be >= 0, got {self.start_step}")
        for name in ("weight_decay", "mtp_loss_scaling", "quality_threshold"):
            pair = getattr(self, name)
            if len(pair) != 2:
                errors.append(f"anneal {name} must be a (main, anneal) pair, got {pair!r}")
        if any(wd < 0 for wd in self.weight_decay):
            errors.append(f"anneal weight_decay values must be >= 0, got {self.weight_decay}")
        if self.data_mixture is not None:
            if len(self.data_mixture) != 2:
                errors.append("anneal data_mixture must be a (main, anneal) pair of weight maps")
            else:
                for label, weights in zip(("main", "anneal"), self.data_mixture):
                    if weights is None:
                        continue
                    if not weights or any(w < 0 for w in weights.values()) or \
                            sum(weights.values()) <= 0:
                        errors.append(f"anneal data_mixture ({label}) needs non-negative "
                                      f"weights with a positive sum, got {dict(weights)}")
        if errors:
            raise ValueError("invalid anneal config:\n  - " + "\n  - ".join(errors))

    def stage_at(self, step: int) -> AnnealStage:
        i = 1 if step >= self.start_step else 0
        mixture = self.data_mixture[i] if self.data_mixture is not None else None
        return AnnealStage(
            index=i,
            name=("main", "anneal")[i],
            weight_decay=self.weight_decay[i],
            mtp_loss_scaling=self.mtp_loss_scaling[i],
            data_mixture=dict(mixture) if mixture is not None else None,
            quality_threshold=self.quality_threshold[i],
        )

    def switches(self, previous_step: int, step: int) -> list[Switch]:
        """What changed between the stage at ``previous_step`` and the stage at ``step``.

        Call once per iteration with the scheduler's step count before and after the
        iteration; an empty list means nothing switched. Works across restarts: after loading
        a checkpoint past the boundary both stages are the anneal stage, so nothing re-fires.
        """
        before, after = self.stage_at(previous_step), self.stage_at(step)
        if before.index == after.index:
            return []
        changes = [Switch("stage", before.name, after.name)]
        for what, attr in (("weight decay", "weight_decay"),
                           ("MTP loss scaling", "mtp_loss_scaling"),
                           ("data mixture", "data_mixture"),
                           ("quality threshold", "quality_threshold")):
            old, new = getattr(before, attr), getattr(after, attr)
            if old != new:
                changes.append(Switch(what, old, new))
        return changes


def anneal_config_for(lr_config: LRScheduleConfig, **values: Any) -> AnnealConfig:
    """The anneal config whose stage boundary is the learning rate's decay boundary."""
    if lr_config.style != "wsd":
        raise ValueError(
            f"the two-stage anneal switches at the WSD decay boundary; --lr-decay-style is "
            f"{lr_config.style!r}. Use --lr-decay-style wsd or give the anneal an explicit start."
        )
    return AnnealConfig(start_step=lr_config.decay_start, **values)


# --------------------------------------------------------------------------------------------
# batch-size ramp-up


@dataclass(frozen=True)
class BatchSizeRampup:
    """Megatron-LM's ``--rampup-batch-size <start> <increment> <ramp samples>``.

    The global batch starts at ``start_global_batch_size`` and grows by
    ``batch_size_increment`` every ``rampup_samples / num_increments`` consumed samples until it
    reaches ``global_batch_size`` (the same arithmetic as megatron-core's
    ``RampupBatchsizeNumMicroBatchesCalculator``). Every batch size the ramp visits is checked
    up front to be a multiple of micro batch x data parallel size, so a bad ramp fails at
    start-up instead of at the iteration that reaches the bad size.
    """

    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    start_global_batch_size: Optional[int] = None
    """None = no ramp (constant global batch)."""
    batch_size_increment: Optional[int] = None
    rampup_samples: int = 0
    _increments: int = field(init=False, repr=False, compare=False, default=0)
    check: InitVar[bool] = True
    """False: build without raising, to list the problem with :meth:`errors`."""

    def __post_init__(self, check: bool) -> None:
        errors = self.errors()
        if errors and check:
            raise ValueError(errors[0] if len(errors) == 1 else
                             "invalid batch size:\n  - " + "\n  - ".join(errors))
        if self.start_global_batch_size is not None and not errors:
            object.__setattr__(self, "_increments", (
                self.global_batch_size - self.start_global_batch_size) // self.batch_size_increment)

    def errors(self) -> list[str]:
        """What is wrong with the sizes (the first problem found: each check needs the ones
        before it to hold), naming the flags involved."""
        errors = [f"{flag} must be positive, got {value}"
                  for flag, value in (("--global-batch-size", self.global_batch_size),
                                      ("--micro-batch-size", self.micro_batch_size),
                                      ("data parallel size", self.data_parallel_size))
                  if value <= 0]
        if errors:
            return errors
        unit = self.micro_batch_size * self.data_parallel_size
        where = (f"--micro-batch-size ({self.micro_batch_size}) x data parallel size "
                 f"({self.data_parallel_size}) = {unit}")
        if self.start_global_batch_size is None:
            if self.global_batch_size % unit:
                return [f"--global-batch-size ({self.global_batch_size}) is not a multiple of "
                        f"{where}"]
            return []
        start, inc = self.start_global_batch_size, self.batch_size_increment
        if start <= 0 or inc is None or inc <= 0 or self.rampup_samples < 0:
            return [f"--rampup-batch-size needs <start> > 0, <increment> > 0 and <ramp samples> "
                    f">= 0, got {start} {inc} {self.rampup_samples}"]
        if start > self.global_batch_size:
            return [f"--rampup-batch-size start ({start}) exceeds --global-batch-size "
                    f"({self.global_batch_size})"]
        if (self.global_batch_size - start) % inc:
            return [f"--rampup-batch-size: --global-batch-size ({self.global_batch_size}) minus "
                    f"the start ({start}) = {self.global_batch_size - start} is not a multiple "
                    f"of the increment ({inc})"]
        bad = [size for size in range(start, self.global_batch_size + 1, inc) if size % unit]
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            return [f"--rampup-batch-size {start} {inc} {self.rampup_samples} with "
                    f"--global-batch-size {self.global_batch_size}: global batch sizes {shown} "
                    f"are not multiples of {where}; pick a start and increment that are "
                    f"multiples of {unit}"]
        return []

    @classmethod
    def from_flag(cls, rampup_batch_size: Optional[Sequence[int]], global_batch_size: int,
                  micro_batch_size: int, data_parallel_size: int,
                  check: bool = True) -> "BatchSizeRampup":
        """Build from the three values of ``--rampup-batch-size`` (or None for no ramp)."""
        if rampup_batch_size is None:
            return cls(global_batch_size, micro_batch_size, data_parallel_size, check=check)
        if len(rampup_batch_size) != 3:
            raise ValueError("--rampup-batch-size takes three values: <start batch size> "
                             f"<batch size increment> <ramp-up samples>, got {rampup_batch_size}")
        start, inc, samples = (int(v) for v in rampup_batch_size)
        return cls(global_batch_size, micro_batch_size, data_parallel_size, start, inc, samples,
                   check=check)

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """Global batch size of the iteration that starts after ``consumed_samples``."""
        if self.start_global_batch_size is None or self._increments == 0:
            return self.global_batch_size
        if consumed_samples > self.rampup_samples:
            return self.global_batch_size
        samples_per_increment = self.rampup_samples / self._increments
        steps = int(consumed_samples / samples_per_increment)
        return min(self.global_batch_size,
                   self.start_global_batch_size + steps * self.batch_size_increment)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches per data-parallel rank for that iteration."""
        return self.global_batch_size_at(consumed_samples) // (
            self.micro_batch_size * self.data_parallel_size)


# --------------------------------------------------------------------------------------------
# the scheduler the training loop owns


class ParamScheduler:
    """Sets every param group's ``lr`` and ``weight_decay`` from the step count.

    Same interface as megatron-core's ``OptimizerParamScheduler``: call ``step(increment)``
    after each optimizer step (Megatron-LM passes the iteration's global batch size). Groups may
    carry ``max_lr``/``min_lr`` (their own peak and floor, e.g. Muon's) and ``wd_mult`` (0 for
    biases and norms) exactly as megatron-core's param groups do. Weight decay follows the
    anneal config (0.1, then 0.033 from the anneal boundary); without one it is constant
    ``weight_decay``.
    """

    def __init__(self, optimizer: Any, lr_config: LRScheduleConfig,
                 anneal: Optional[AnnealConfig] = None, weight_decay: float = 0.1) -> None:
        if weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {weight_decay}")
        self.optimizer = optimizer
        self.lr_config = lr_config
        self.anneal = anneal
        self.constant_weight_decay = weight_decay
        self.num_steps = 0
        self.step(0)

    # values at the current position -----------------------------------------------------

    @property
    def stage(self) -> Optional[AnnealStage]:
        return self.anneal.stage_at(self.num_steps) if self.anneal is not None else None

    @property
    def lr(self) -> float:
        """Learning rate of groups that use the default schedule (for logging)."""
        return lr_at(self.lr_config, self.num_steps)

    @property
    def weight_decay(self) -> float:
        stage = self.stage
        return stage.weight_decay if stage is not None else self.constant_weight_decay

    @property
    def mtp_loss_scaling(self) -> Optional[float]:
        stage = self.stage
        return stage.mtp_loss_scaling if stage is not None else None

    def get_lr(self, param_group: Mapping[str, Any]) -> float:
        return lr_at(self.lr_config, self.num_steps,
                     max_lr=param_group.get("max_lr", self.lr_config.max_lr),
                     min_lr=param_group.get("min_lr", self.lr_config.min_lr))

    def get_wd(self, param_group: Optional[Mapping[str, Any]] = None) -> float:
        return self.weight_decay

    # advancing ------------------------------------------------------------------------------

    def step(self, increment: int) -> None:
        """Advance by ``increment`` steps and write lr / weight decay into the param groups."""
        if increment < 0:
            raise ValueError(f"the scheduler only moves forward, got increment {increment}")
        self.num_steps += int(increment)
        self._apply()

    def _apply(self) -> None:
        # Empty groups too: megatron-core's get_canonical_lr_for_logging reads them.
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    # checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position plus the config it was computed with (checked on load)."""
        return {
            "num_steps": self.num_steps,
            "lr_config": dataclasses.asdict(self.lr_config),
            "anneal_start_step": self.anneal.start_step if self.anneal is not None else None,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], *, override: bool = False,
                        use_checkpoint: bool = False) -> None:
        """Restore the position, with Megatron-LM's rules for the schedule itself: the
        checkpoint's and this run's schedule must agree, unless ``override``
        (--override-opt_param-scheduler: this run's schedule applies from the restored
        position) or ``use_checkpoint`` (--use-checkpoint-opt_param-scheduler: the
        checkpoint's schedule is restored and this run's flags for it are ignored)."""
        from megatron_trillion.errors import UserError

        if "num_steps" not in state_dict:
            raise ValueError("scheduler state has no 'num_steps'; was it saved by "
                             "ParamScheduler.state_dict()?")
        saved = state_dict.get("lr_config")
        current = dataclasses.asdict(self.lr_config)
        if saved is not None and saved != current:
            if use_checkpoint:
                self.lr_config = LRScheduleConfig(**saved)
                if self.anneal is not None and state_dict.get("anneal_start_step") is not None:
                    self.anneal = dataclasses.replace(
                        self.anneal, start_step=int(state_dict["anneal_start_step"]))
            elif not override:
                diff = ", ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in current.items()
                                 if saved.get(k) != v)
                raise UserError(
                    "the learning-rate schedule differs from the checkpoint's (" + diff + "). "
                    "To extend a run keep the schedule fixed with --lr-decay-iters / "
                    "--lr-decay-samples, or pass --override-opt_param-scheduler (this run's "
                    "schedule from the restored step) or --use-checkpoint-opt_param-scheduler "
                    "(the checkpoint's)")
        self.num_steps = int(state_dict["num_steps"])
        self._apply()


# --------------------------------------------------------------------------------------------
# step-wise batch size (--step-batch-size-schedule)

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


@dataclass(frozen=True)
class StepBatchSizeSchedule:
    """Megatron-LM's ``--step-batch-size-schedule "0:16 2.4B:320 ..."``: the global batch size
    is ``sizes[i]`` once ``thresholds[i]`` tokens have been consumed. Same interface as
    :class:`BatchSizeRampup` (thresholds are kept in samples = tokens / sequence length)."""

    thresholds: tuple
    sizes: tuple
    micro_batch_size: int
    data_parallel_size: int
    check: InitVar[bool] = True
    """False: build without raising, to list every problem with :meth:`errors`."""

    def __post_init__(self, check: bool) -> None:
        errors = self.errors() if check else []
        if errors:
            raise ValueError("; ".join(errors))

    def errors(self) -> list[str]:
        """Every problem of the schedule, naming the flags involved."""
        errors = []
        if not self.thresholds or self.thresholds[0] != 0:
            errors.append("--step-batch-size-schedule must start at threshold 0 (e.g. 0:16)")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            errors.append("--step-batch-size-schedule thresholds must increase")
        unit = self.micro_batch_size * self.data_parallel_size
        bad = [s for s in self.sizes if s <= 0 or s % unit]
        if bad:
            errors.append(f"--step-batch-size-schedule batch sizes {bad} are not positive "
                          f"multiples of --micro-batch-size x data-parallel size ({unit})")
        return errors

    @classmethod
    def from_flag(cls, text: str, seq_length: int, micro_batch_size: int,
                  data_parallel_size: int, check: bool = True) -> "StepBatchSizeSchedule":
        """Parse the flag's text (a ValueError names an item that is not THRESHOLD:BS)."""
        thresholds, sizes = [], []
        for item in text.split():
            threshold, sep, size = item.partition(":")
            try:
                scale = _SUFFIXES.get(threshold[-1:].upper(), 1)
                tokens = float(threshold[:-1] if scale > 1 else threshold) * scale
                sizes.append(int(size))
            except ValueError:
                raise ValueError(f"--step-batch-size-schedule: {item!r} is not THRESHOLD:BS "
                                 "(e.g. 2.4B:320)") from None
            if not sep:
                raise ValueError(f"--step-batch-size-schedule: {item!r} is not THRESHOLD:BS")
            thresholds.append(math.ceil(tokens / seq_length))
        return cls(tuple(thresholds), tuple(sizes), micro_batch_size, data_parallel_size,
                   check=check)

    @property
    def global_batch_size(self) -> int:
        """The final (largest-threshold) batch size."""
        return self.sizes[-1]

    def global_batch_size_at(self, consumed_samples: int) -> int:
        size = self.sizes[0]
        for threshold, value in zip(self.thresholds, self.sizes):
            if consumed_samples >= threshold:
                size = value
        return size

    def num_microbatches_at(self, consumed_samples: int) -> int:
        return self.global_batch_size_at(consumed_samples) // (
            self.micro_batch_size * self.data_parallel_size)

    @property
    def rampup_samples(self) -> int:
        """Consumed samples after which the batch size is the final one (as
        ``BatchSizeRampup.rampup_samples``)."""
        return self.thresholds[-1]


BatchSizeSchedule = Union[BatchSizeRampup, StepBatchSizeSchedule]
"""The global batch size of each iteration (--rampup-batch-size or --step-batch-size-schedule;
one interface)."""


# --------------------------------------------------------------------------------------------
# run lengths under a batch schedule


def samples_for_iterations(batch_schedule: BatchSizeSchedule, iterations: int) -> int:
    """Samples consumed by the first ``iterations`` iterations."""
    consumed = 0
    for _ in range(iterations):
        consumed += batch_schedule.global_batch_size_at(consumed)
    return consumed


def iterations_for_samples(batch_schedule: BatchSizeSchedule, samples: int) -> int:
    """Iterations until at least ``samples`` samples are consumed."""
    consumed, iterations = 0, 0
    while consumed < samples:
        consumed += batch_schedule.global_batch_size_at(consumed)
        iterations += 1
    return iterations


def rampup_phase(batch_schedule: BatchSizeSchedule) -> tuple[int, int]:
    """(iterations, samples) that run below the final global batch size, counted from the
    start of the run: (0, 0) without a ramp."""
    final = batch_schedule.global_batch_size
    consumed = iterations = 0
    ramp = (0, 0)
    # After ``rampup_samples`` every iteration has the final size: nothing further to count.
    while consumed <= batch_schedule.rampup_samples:
        size = batch_schedule.global_batch_size_at(consumed)
        consumed += size
        iterations += 1
        if size != final:
            ramp = (iterations, consumed)
    return ramp
