"""The NaN/inf guard: skip a step whose loss or grad norm is not finite, stop after N in a row;
and skip a step that has nothing to learn from.

Public interface (the training loop calls these)::

    SampleRef(dataset: str, document_ids: tuple[int, ...])   # what one step trained on
    NumericsGuard(max_consecutive_bad_steps=5)
        .check(iteration, loss, grad_norm, samples=(), group=None, loss_count=None)
            -> StepDecision
            # StepDecision.proceed is False for a step to skip (.nonfinite says why); raises
            # NonFiniteTrainingError when this is the N-th non-finite step in a row
        .consecutive_bad_steps, .total_skipped_steps, .skipped_steps (list[SkippedStep]: the
            latest KEPT_SKIP_RECORDS of each kind)
        .state_dict() / .load_state_dict(state)
    guarded_optimizer_step(optimizer, guard, iteration, loss, samples=(), group=None,
                           loss_count=None)
        -> (StepDecision, update_successful, grad_norm, num_zeros_in_grad)
            # a megatron-core MegatronOptimizer step that never applies a non-finite update,
            # nor one without a loss token

Why a step without loss tokens (``loss_count`` 0 over the global batch, e.g. a GRPO rollout
whose groups all had equal rewards) is skipped too: its gradients are zero, but Adam's
momentum (and weight decay) would still move the weights and the step count would advance
its bias correction. Skipping it leaves weights and optimizer state as they were. It is
counted and logged as a skipped step, but it is not a numerical problem: it neither counts
toward nor resets the consecutive non-finite steps.

Why the decision is all-reduced: with pipeline parallelism only the last stage has the loss,
and every rank must skip the same step (a rank that steps while another skips desynchronises
the replicas). ``check`` reduces the "bad" flag with MAX over ``group`` (default: the world),
so one rank's NaN loss makes every rank skip. The grad norm megatron-core returns is already
reduced over the model-parallel group, so it agrees by construction.

Why ``guarded_optimizer_step`` asks for the grad norm before the update: megatron-core's
``step()`` clips with ``clip_coeff = max_norm / norm``, which is NaN for a NaN norm and then
compares False against 1.0, so the NaN gradients reach Adam/Muon and poison every weight. Only
fp16's dynamic loss scaler skips such steps itself. The guard therefore runs megatron-core's
step in its parts: ``prepare_grads()``, ``get_grad_norm()``, the decision, then the clipping
with that same norm and ``step_with_ready_grads()`` (``_step_with_grad_norm``), so the norm is
computed, all-reduced and read once per step, as in ``optimizer.step()`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


# Records of skipped steps a guard keeps of each kind (steps with nothing to learn; non-finite
# steps): the latest ones; ``total_skipped_steps`` counts them all.
KEPT_SKIP_RECORDS = 32


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or grad norm."""


@dataclass(frozen=True)
class SampleRef:
    """Which documents of which dataset went into a step (supplied by the data loader)."""

    dataset: str
    document_ids: tuple[int, ...]


@dataclass(frozen=True)
class SkippedStep:
    iteration: int
    loss: Optional[float]
    grad_norm: Optional[float]
    reason: str
    samples: tuple[SampleRef, ...]

    def describe(self) -> str:
        docs = "; ".join(f"{s.dataset}: docs {list(s.document_ids)}" for s in self.samples)
        return (f"skipped iteration {self.iteration}: {self.reason}"
                + (f" | samples: {docs}" if docs else ""))


@dataclass(frozen=True)
class StepDecision:
    proceed: bool
    reason: str = ""
    """Why the step is skipped ("" when it proceeds)."""
    skipped: Optional[SkippedStep] = None
    nonfinite: bool = False
    """Skipped for a non-finite loss or grad norm (False: for having no loss token)."""


NO_LOSS_TOKENS = ("no loss tokens in the global batch (nothing to learn, e.g. every GRPO "
                  "group's rewards were equal)")


def _as_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    if torch.is_tensor(value):
        return float(value.detach().float().cpu())
    return float(value)


def _nonfinite_flag(values: Sequence[Any]) -> torch.Tensor:
    """[1] (int32, on the compute device) when any of ``values`` (floats, tensors or None)
    is not finite, else [0]."""
    from megatron_trillion.platform.device import compute_device

    device = compute_device()
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    for value in values:
        if value is None:
            continue
        if torch.is_tensor(value):
            finite = torch.isfinite(value.detach().float().to(device)).all()
            flag |= (~finite).to(torch.int32)
        elif not math.isfinite(float(value)):
            flag.fill_(1)
    return flag


def _empty_flag(loss_count: Any) -> torch.Tensor:
    """[1] (int32, on the compute device) when ``loss_count`` is known and 0, else [0]."""
    from megatron_trillion.platform.device import compute_device

    device = compute_device()
    if loss_count is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    if torch.is_tensor(loss_count):
        count = loss_count.detach().float().to(device).reshape(1)
    else:  # a host number: created on the device (as_tensor would take the default device)
        count = torch.tensor([float(loss_count)], device=device)
    return (count == 0).to(torch.int32)


@dataclass
class NumericsGuard:
    """Counts non-finite steps; see the module docstring.

    ``max_consecutive_bad_steps`` (--max-consecutive-nonfinite-steps): the run stops with
    ``NonFiniteTrainingError`` at the N-th bad step in a row; any good step resets the count.
    """

    max_consecutive_bad_steps: int = 5
    consecutive_bad_steps: int = 0
    total_skipped_steps: int = 0
    skipped_steps: list[SkippedStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_consecutive_bad_steps < 1:
            raise ValueError("--max-consecutive-nonfinite-steps must be >= 1, got "
                             f"{self.max_consecutive_bad_steps}")

    def check(self, iteration: int, loss: Any, grad_norm: Any,
              samples: Any = (), group: Any = None, loss_count: Any = None) -> StepDecision:
        """Decide whether step ``iteration`` may update the weights.

        ``samples`` is a sequence of :class:`SampleRef` or a callable returning one, called
        only when the step is skipped (on every rank of ``group``).

        ``loss`` / ``grad_norm`` may be floats, 0-d tensors or None (a pipeline stage without
        the loss); ``loss_count`` likewise: the global batch's loss tokens (None: not known),
        0 skips the step. With torch.distributed initialised the decision is agreed over
        ``group`` (a collective: every rank of the group must call ``check`` for the same
        iteration).
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        nonfinite = empty = False
        if distributed:
            # Decided on the device: the loss is not copied to the host for a good step; the
            # agreed flags are the one value read (every rank must know now whether to step).
            flags = torch.cat([_nonfinite_flag((loss, grad_norm)), _empty_flag(loss_count)])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
            nonfinite, empty = (bool(v) for v in flags.tolist())
            if not nonfinite and not empty:
                self.consecutive_bad_steps = 0
                return StepDecision(proceed=True)
        loss_f, norm_f = _as_float(loss), _as_float(grad_norm)
        reasons = []
        if loss_f is not None and not math.isfinite(loss_f):
            reasons.append(f"loss is {loss_f}")
        if norm_f is not None and not math.isfinite(norm_f):
            reasons.append(f"grad norm is {norm_f}")
        if nonfinite and not reasons:
            reasons.append("another rank saw a non-finite loss or grad norm")
        if not distributed:
            empty = bool(_empty_flag(loss_count).item())
        if not reasons and not empty:
            self.consecutive_bad_steps = 0
            return StepDecision(proceed=True)

        if callable(samples):
            # Lazily built (e.g. gathered over DP: a collective, reached by every rank here
            # because the decision above is agreed) only for a step that is skipped.
            samples = samples()
        if not reasons:  # nothing to learn: not a numerical problem (see the module docstring)
            skipped = SkippedStep(iteration, loss_f, norm_f, NO_LOSS_TOKENS, tuple(samples))
            self._record(skipped)
            return StepDecision(proceed=False, reason=NO_LOSS_TOKENS, skipped=skipped)
        reason = ", ".join(reasons)
        skipped = SkippedStep(iteration, loss_f, norm_f, reason, tuple(samples))
        self.consecutive_bad_steps += 1
        self._record(skipped)
        if self.consecutive_bad_steps >= self.max_consecutive_bad_steps:
            nonfinite_steps = [s for s in self.skipped_steps if s.reason != NO_LOSS_TOKENS]
            recent = "\n  ".join(s.describe() for s in
                                 nonfinite_steps[-self.consecutive_bad_steps:])
            raise NonFiniteTrainingError(
                f"stopping at iteration {iteration}: {self.consecutive_bad_steps} consecutive "
                f"steps had a non-finite loss or grad norm (limit "
                f"--max-consecutive-nonfinite-steps={self.max_consecutive_bad_steps}).\n  "
                f"{recent}\nLower --lr, check the data of the listed documents, or resume from "
                "an earlier checkpoint."
            )
        return StepDecision(proceed=False, reason=reason, skipped=skipped, nonfinite=True)

    def _record(self, skipped: SkippedStep) -> None:
        """Counts a skipped step and keeps its record, and only the latest records of its kind
        (a long GRPO run can skip many steps with nothing to learn; every record would
        otherwise stay in memory and in every checkpoint). The non-finite ones kept always
        cover the consecutive run the stop message lists."""
        self.total_skipped_steps += 1
        self.skipped_steps.append(skipped)
        self._keep_latest()

    def _keep_latest(self) -> None:
        dropped = set()
        for empty in (True, False):
            limit = KEPT_SKIP_RECORDS if empty else max(KEPT_SKIP_RECORDS,
                                                        self.max_consecutive_bad_steps)
            same = [i for i, s in enumerate(self.skipped_steps)
                    if (s.reason == NO_LOSS_TOKENS) == empty]
            dropped.update(same[:max(0, len(same) - limit)])
        if dropped:
            self.skipped_steps = [s for i, s in enumerate(self.skipped_steps)
                                  if i not in dropped]

    def state_dict(self) -> dict:
        return {
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "total_skipped_steps": self.total_skipped_steps,
            "skipped_steps": [
                {"iteration": s.iteration, "loss": s.loss, "grad_norm": s.grad_norm,
                 "reason": s.reason,
                 "samples": [(r.dataset, list(r.document_ids)) for r in s.samples]}
                for s in self.skipped_steps
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.consecutive_bad_steps = int(state["consecutive_bad_steps"])
        self.total_skipped_steps = int(state["total_skipped_steps"])
        self.skipped_steps = [
            SkippedStep(s["iteration"], s["loss"], s["grad_norm"], s["reason"],
                        tuple(SampleRef(d, tuple(ids)) for d, ids in s["samples"]))
            for s in state.get("skipped_steps", [])
        ]
        self._keep_latest()  # a checkpoint of a version that kept every record


def guarded_optimizer_step(optimizer: Any, guard: NumericsGuard, iteration: int, loss: Any,
                           samples: Any = (), group: Any = None, loss_count: Any = None):
    """Step a megatron-core optimizer unless the loss or grad norm is non-finite or the global
    batch has no loss token (``loss_count`` 0).

    Returns ``(decision, update_successful, grad_norm, num_zeros_in_grad)``; on a skipped
    step the gradients are zeroed, nothing is updated and the last three are
    ``(False, grad_norm, None)``. Call it on every rank (it holds collectives).
    """
    if getattr(optimizer, "get_loss_scale", None) is not None:
        scale = optimizer.get_loss_scale()
        if float(scale) != 1.0:
            raise ValueError(
                "guarded_optimizer_step needs an optimizer without loss scaling (bf16/fp32): "
                "with --fp16 megatron-core's dynamic loss scaler already skips non-finite steps"
            )
    optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    decision = guard.check(iteration, loss, grad_norm, samples, group=group,
                           loss_count=loss_count)
    if not decision.proceed:
        optimizer.zero_grad()
        return decision, False, grad_norm, None
    update_successful, num_zeros = _step_with_grad_norm(optimizer, grad_norm)
    return decision, update_successful, grad_norm, num_zeros


def _step_with_grad_norm(optimizer: Any, grad_norm: float) -> tuple[bool, Any]:
    """The rest of megatron-core 0.16.1's ``step()`` after ``prepare_grads()``, clipping with
    the ``grad_norm`` already computed (the global norm over every chained optimizer, as
    ``ChainedOptimizer.step`` clips each part): ``(update_successful, num_zeros_in_grad)``."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for leaf in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if getattr(leaf, "is_stub_optimizer", False) or leaf.config.clip_grad <= 0.0:
            continue
        parameters = leaf.get_parameters()
        if parameters:
            clip_grad_by_total_norm_fp32(
                parameters, max_norm=leaf.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
    update_successful = optimizer.step_with_ready_grads()
    # megatron-core's layer-wise optimizer (Muon) gathers the updated weights in its step()
    if hasattr(optimizer, "allgather_params"):
        optimizer.allgather_params()
    return update_successful, num_zeros
