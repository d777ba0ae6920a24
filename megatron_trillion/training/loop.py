"""The training loop: ``train()`` reads top to bottom, one ``train_step()`` per iteration.

A step is megatron-core's pipeline schedule (``get_forward_backward_func``: no pipelining,
1F1B, or interleaved 1F1B with virtual stages) over this rank's micro-batches, then
``finalize_model_grads`` (inside the schedule: DP all-reduce or reduce-scatter, embedding and
MoE expert-bias updates), then the optimizer step behind the NaN/inf guard. What a step computes
is the run's ``Objective`` (training.objective: pretraining, SFT, DPO); its loss function returns
sums and counts (``calculate_per_token_loss``) so that any DP size and micro-batch split gives
the loss and gradients of one process on the whole global batch.

Device discipline (``platform.device``): batches arrive in host memory and ``forward_step``
moves them to the compute device once; every tensor this module hands to a collective is
created there. The step reads one value on the host (the NaN guard's agreed skip decision);
losses, token counts and FLOPs are summed on the device and read once per log line.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from megatron_trillion.platform.device import compute_device
from megatron_trillion.training.objective import Objective, language_model_objective
from megatron_trillion.training.reporting import (
    MetricWriters,
    ProgressBar,
    Stopwatch,
    format_iteration_line,
    format_validation_line,
)

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

    from megatron_trillion.training.data import StepBatches
    from megatron_trillion.training.housekeeping import Housekeeping
    from megatron_trillion.training.numerics import NumericsGuard, SkippedStep
    from megatron_trillion.training.schedules import (
        AnnealConfig,
        BatchSizeSchedule,
        ParamScheduler,
        Switch,
    )


# --------------------------------------------------------------------------------------------
# state and context


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    floating_point_operations: float = 0.0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Run:
    """Everything the loop needs, built once by ``training.run.pretrain``.

    The hooks (``save``, ``exit_requested``, ``on_anneal_switch``) are handed the run itself at
    the step boundary that calls them."""

    model: list[DistributedDataParallel]  # one chunk per virtual pipeline stage
    optimizer: MegatronOptimizer
    scheduler: ParamScheduler  # steps counted in samples
    rampup: BatchSizeSchedule
    guard: NumericsGuard
    train_batches: StepBatches
    train_iters: int
    tokens_per_microbatch: int
    step_flops: Callable[[list], float]  # this rank's micro-batches -> their model FLOPs
    world_size: int
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_batches: dict = field(default_factory=dict)  # language -> list of micro-batches
    # Called after a step that crossed into a new anneal stage; returns the batches to train
    # on from the next step (None: keep the current ones).
    on_anneal_switch: Optional[Callable[[Run, list[Switch]], Optional[StepBatches]]] = None
    anneal: Optional[AnnealConfig] = None
    save: Optional[Callable[[Run], None]] = None  # a checkpoint of the run's current state
    save_interval: Optional[int] = None
    exit_requested: Callable[[Run], bool] = lambda run: False  # save (if saving) and stop here
    device_peak_tflops: Optional[float] = None
    writers: Optional[MetricWriters] = None
    progress: bool = True
    log: Callable[[str], None] = print
    # e.g. tests record losses; gets StepResult.host_values()
    on_step: Optional[Callable[[TrainState, dict], None]] = None
    state: TrainState = field(default_factory=TrainState)
    hang_timeout_seconds: Optional[float] = None  # --hang-timeout-seconds (training.watchdog)
    housekeeping: Optional[Housekeeping] = None  # gc, profiler, memory, --exit-duration-in-mins
    empty_expert_warning_steps: Optional[int] = 100  # --moe-empty-expert-warning-steps
    # what the steps compute (the loss function and its log fields; the batches are
    # train_batches / eval_batches above)
    objective: Objective = field(default_factory=lambda: language_model_objective("pretraining"))


# --------------------------------------------------------------------------------------------
# one step


@dataclass
class StepResult:
    """What one ``train_step`` did. The loss stays on the device (read once per log line)."""

    loss: torch.Tensor  # the objective's loss ("lm loss": the step's per-token mean), 0-d
    loss_report: torch.Tensor  # the objective's report summed over the global batch
    grad_norm: Optional[float]
    skipped: bool  # the NaN guard skipped the optimizer step
    skipped_step: Optional[SkippedStep]  # the skipped step's record (which samples), if any
    updated: bool
    objective: Optional[Objective] = None
    nonfinite: bool = False  # skipped for a non-finite loss or grad norm (else: no loss token)

    def host_values(self) -> dict:
        """For ``Run.on_step``: the objective's logged values under their names (Megatron-LM's
        "lm loss"; "dpo loss", "rewards/accuracy", ...), read on the host."""
        objective = self.objective or language_model_objective("pretraining")
        report = self.loss_report.tolist()
        return {**objective.values(report), "loss report": self.loss_report,
                "grad_norm": self.grad_norm, "skipped": self.skipped,
                "skipped_step": self.skipped_step, "updated": self.updated,
                "tokens": float(report[2])}


def _reduce_report(outputs: list, objective: Objective) -> torch.Tensor:
    """The objective's report ([loss sum, count, tokens, ...]) of this step summed over all
    micro-batches and DP ranks, on every rank."""
    from megatron.core import parallel_state as ps

    key = objective.loss_name
    total = torch.zeros(objective.report_size, device=compute_device())
    for out in outputs:
        total += out[key].float()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(
            with_context_parallel=True))
    # Only the last pipeline stage holds the loss; share it so rank 0 can log it.
    torch.distributed.broadcast(total, ps.get_pipeline_model_parallel_last_rank(),
                                group=ps.get_pipeline_model_parallel_group())
    return total


def train_step(run: Run, batches: list) -> StepResult:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_trillion.training.expert_bias import (
        restore_expert_bias,
        snapshot_expert_bias,
    )
    from megatron_trillion.training.numerics import guarded_optimizer_step

    # finalize_model_grads moves the MoE expert bias; a skipped step must leave the model as it
    # was, so the bias is restored then.
    expert_bias = snapshot_expert_bias(run.model)
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    iterators = [iter(batches) for _ in run.model]
    outputs = get_forward_backward_func()(
        forward_step_func=run.objective.forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=run.model,
        num_microbatches=len(batches),
        seq_length=run.tokens_per_microbatch,  # THD: a micro-batch is one row of B*S tokens
        micro_batch_size=1,
        forward_only=False,
    )
    report = _reduce_report(outputs, run.objective)  # on the device, not read here
    loss = report[0] / report[1].clamp(min=1.0)
    decision, updated, grad_norm, _ = guarded_optimizer_step(
        run.optimizer, run.guard, run.state.iteration + 1, loss,
        # Gathered only for a step to skip (a collective that every rank reaches then).
        samples=functools.partial(_step_sample_refs, batches, run.train_batches.dataset),
        loss_count=report[1],  # 0 (no loss token): nothing to learn, the step is skipped
    )
    if not decision.proceed:
        restore_expert_bias(expert_bias)
    grad_norm = float(grad_norm) if grad_norm is not None else None  # megatron-core's float
    return StepResult(loss=loss, loss_report=report, grad_norm=grad_norm,
                      skipped=not decision.proceed, skipped_step=decision.skipped,
                      updated=bool(updated), objective=run.objective,
                      nonfinite=decision.nonfinite)


def _sample_refs(batches: list, dataset: Any = None) -> tuple:
    """(dataset, document ids) of every sample of this rank's micro-batches.

    ``batch["document_ids"]`` holds one ``[docs, 2]`` tensor of (source, document) per sample;
    the source index names the dataset through ``dataset.mixture.sources`` when available."""
    from megatron_trillion.training.numerics import SampleRef

    sources = getattr(getattr(dataset, "mixture", None), "sources", None)
    refs = []
    for batch in batches:
        for index, docs in zip(batch["indices"], batch["document_ids"]):
            by_source: dict = {}
            for source, document in docs.reshape(-1, 2).tolist():
                by_source.setdefault(int(source), []).append(int(document))
            for source, documents in by_source.items():
                name = (f"{sources[source].language}:{sources[source].path_prefix}"
                        if sources is not None else f"source {source}")
                refs.append(SampleRef(dataset=f"{name} (sample {index})",
                                      document_ids=tuple(documents)))
    return tuple(refs)


def _step_sample_refs(batches: list, dataset: Any) -> tuple:
    """The samples of the whole global batch: every data-parallel rank's share."""
    from megatron.core import parallel_state as ps

    local = _sample_refs(batches, dataset)
    # Context-parallel peers hold shares of the same samples: gather over data parallel only.
    group = ps.get_data_parallel_group(with_context_parallel=False)
    gathered: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, local, group=group)
    return tuple(ref for part in gathered for ref in part)


def evaluate(run: Run) -> dict:
    """The objective's validation values per language (and overall), forward only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    objective = run.objective
    for chunk in run.model:
        chunk.eval()
    losses, total = {}, torch.zeros(objective.report_size, device=compute_device())
    try:
        with torch.no_grad():
            for language, batches in run.eval_batches.items():
                iterators = [iter(batches) for _ in run.model]
                outputs = get_forward_backward_func()(
                    forward_step_func=objective.forward_step,
                    data_iterator=iterators if len(iterators) > 1 else iterators[0],
                    model=run.model, num_microbatches=len(batches),
                    seq_length=run.tokens_per_microbatch, micro_batch_size=1,
                    forward_only=True,
                )
                reduced = _reduce_report(outputs, objective)
                total += reduced
                for name, value in objective.values(reduced.tolist()).items():
                    losses[f"{name} [{language}]"] = value
    finally:
        for chunk in run.model:
            chunk.train()
    return {**objective.values(total.tolist()), **losses}


# --------------------------------------------------------------------------------------------
# the loop


def train(run: Run) -> TrainState:
    from megatron_trillion.training.expert_bias import RoutingHealth
    from megatron_trillion.training.watchdog import HangWatchdog

    state = run.state
    routing = RoutingHealth(run.model, run.empty_expert_warning_steps)
    is_logging_rank = torch.distributed.get_rank() == 0
    bar = ProgressBar(run.train_iters, state.iteration, enabled=run.progress and is_logging_rank)
    # Without the bar, lines go to run.log (pretrain's `log`), so callers see every line.
    say = (bar.write if run.progress else run.log) if is_logging_rank else (lambda line: None)
    watch = Stopwatch()
    window = _new_window(run.objective)
    totals = _DeviceTotals(run.objective.report_size)
    shown = {"loss": None, "tokens_per_second": None}  # the bar shows the last log line's
    # A stuck collective would hang every rank silently; the watchdog reports where (a no-op
    # unless --hang-timeout-seconds is given).
    watchdog = HangWatchdog(run.hang_timeout_seconds, torch.distributed.get_rank())
    watchdog.start(state.iteration + 1)
    try:
        while state.iteration < run.train_iters:
            if run.housekeeping is not None:
                run.housekeeping.before_step(state.iteration + 1)
            global_batch = run.rampup.global_batch_size_at(state.consumed_samples)
            batches = run.train_batches.for_step(state.consumed_samples, global_batch)
            totals.add_local_flops(run.step_flops(batches))  # host arithmetic on host data
            result = train_step(run, batches)
            # Megatron-LM: a non-finite step's loss is not averaged in. A step without loss
            # tokens adds none, but its report's other sums count (e.g. GRPO's rewards and
            # dropped groups).
            if not result.nonfinite:
                totals.add_loss(result.loss_report)

            previous = run.scheduler.num_steps
            state.iteration += 1
            state.consumed_samples += global_batch
            routing.record()  # MoE load per layer, on the device (collective over PP)
            if result.skipped:
                state.skipped_iterations += 1
                state.nan_iterations += int(result.nonfinite)
                if result.skipped_step is not None:  # which batch, so it can be found
                    say(f" {result.skipped_step.describe()}")
            run.scheduler.step(global_batch)
            if run.anneal is not None:
                switches = run.anneal.switches(previous, run.scheduler.num_steps)
                if switches:
                    for switch in switches:
                        say(f" anneal: {switch.describe(state.iteration)}")
                    if run.on_anneal_switch is not None:
                        _switch_batches(run, run.on_anneal_switch(run, switches))

            window["time"] += watch.lap()
            window["iters"] += 1
            bar.update(shown["loss"], run.scheduler.lr, shown["tokens_per_second"])
            if run.on_step is not None:
                # A callback (tests, tools) gets host values: one read per step, only for it.
                run.on_step(state, result.host_values())

            if state.iteration % run.log_interval == 0 or state.iteration == run.train_iters:
                totals.read_into(window, state)
                _log_iteration(run, state, result, window, global_batch, say, routing)
                for line in routing.warnings(state.iteration):
                    say(line)
                shown["loss"] = _window_values(run, window)[run.objective.loss_name]
                shown["tokens_per_second"] = window["tokens"] / max(window["time"], 1e-9)
                window = _new_window(run.objective)
            if run.eval_interval and run.eval_batches and (
                    state.iteration % run.eval_interval == 0
                    or state.iteration == run.train_iters):
                if run.housekeeping is not None:
                    run.housekeeping.before_eval()
                say(format_validation_line(state.iteration, evaluate(run)))
                if run.housekeeping is not None:
                    run.housekeeping.after_eval()
            if run.housekeeping is not None:
                run.housekeeping.after_step(state.iteration)
            if run.save is not None and run.save_interval and \
                    state.iteration % run.save_interval == 0:
                totals.read_into(window, state)  # the checkpoint holds the FLOPs so far
                run.save(run)
            if run.exit_requested(run):
                totals.read_into(window, state)
                say(f" exiting at iteration {state.iteration} on request "
                    "(signal, --exit-interval or --exit-duration-in-mins)")
                if run.save is not None and not (run.save_interval and
                                                 state.iteration % run.save_interval == 0):
                    run.save(run)
                break
            watchdog.step_done(state.iteration)  # eval and save count as the step
        totals.read_into(window, state)
    finally:
        watchdog.stop()
        bar.close()
        if run.housekeeping is not None:
            run.housekeeping.stop()
    return state


def _switch_batches(run: Run, batches: Optional[StepBatches]) -> None:
    """Train on ``batches`` from the next step (None: no change); the old reader stops."""
    if batches is not None:
        previous, run.train_batches = run.train_batches, batches
        previous.close()


def _new_window(objective: Objective) -> dict:
    return {"time": 0.0, "iters": 0, "flops": 0.0, "tokens": 0.0,
            "report": [0.0] * objective.report_size}


def _window_values(run: Run, window: dict) -> dict:
    """Megatron-LM's logged loss (and the objective's other values): the mean over the
    iterations since the last line that were not skipped (NaN when all were)."""
    return run.objective.values(window["report"])


class _DeviceTotals:
    """What the steps since the last read add up to, kept where it is produced: the objective's
    report sums on the device (already reduced over DP by ``_reduce_report``), this
    rank's model FLOPs on the host. ``read_into`` is one DP all-reduce of the FLOPs and one
    device-to-host read for all of it; every rank calls it at the same iterations (log lines,
    saves, exit), so the collective matches."""

    def __init__(self, report_size: int) -> None:
        self._loss = torch.zeros(report_size, dtype=torch.float64, device=compute_device())
        self._local_flops = 0.0

    def add_loss(self, report: torch.Tensor) -> None:
        self._loss += report

    def add_local_flops(self, flops: float) -> None:
        self._local_flops += flops

    def read_into(self, window: dict, state: "TrainState") -> None:
        from megatron.core import parallel_state as ps

        flops = torch.tensor([self._local_flops], dtype=torch.float64, device=compute_device())
        torch.distributed.all_reduce(flops, group=ps.get_data_parallel_group(
            with_context_parallel=True))
        *report, global_flops = torch.cat([self._loss, flops]).tolist()
        self._loss.zero_()
        self._local_flops = 0.0
        window["report"] = [a + b for a, b in zip(window["report"], report)]
        window["tokens"] += report[2]
        window["flops"] += global_flops
        state.floating_point_operations += global_flops


def _log_iteration(run: Run, state: TrainState, result: StepResult, window: dict,
                   global_batch: int, say: Callable[[str], None], routing=None) -> None:
    iters = max(window["iters"], 1)
    seconds = max(window["time"], 1e-9)
    tflops = window["flops"] / seconds / run.world_size / 1e12
    mfu = tflops / run.device_peak_tflops if run.device_peak_tflops else None
    losses = _window_values(run, window)
    losses.update(_mtp_and_moe_losses(run))
    line = format_iteration_line(
        iteration=state.iteration, train_iters=run.train_iters,
        consumed_samples=state.consumed_samples, elapsed_ms=1000 * seconds / iters,
        learning_rate=run.scheduler.lr, global_batch_size=global_batch, losses=losses,
        grad_norm=result.grad_norm, skipped_iterations=state.skipped_iterations,
        nan_iterations=state.nan_iterations, tflops_per_device=tflops, mfu=mfu,
        tokens_per_second=window["tokens"] / seconds,
        extra=routing.summary() if routing is not None else None,
    )
    say(line)
    if run.writers is not None and torch.distributed.get_rank() == 0:
        scalars = {k: v for k, v in losses.items() if math.isfinite(v)}
        scalars.update({"learning-rate": run.scheduler.lr, "batch-size": global_batch,
                        "throughput/tflops-per-device": tflops,
                        "throughput/tokens-per-second": window["tokens"] / seconds})
        if result.grad_norm is not None and math.isfinite(result.grad_norm):
            scalars["grad-norm"] = result.grad_norm
        if routing is not None:
            scalars.update(routing.per_layer())
        run.writers.scalars(scalars, state.iteration)


def _mtp_and_moe_losses(run: Run) -> dict:
    """MTP losses tracked by megatron-core since the last log line (a collective: all ranks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    config = _unwrap(run.model[0]).config
    num_mtp = config.mtp_num_layers or 0
    if not num_mtp or not run.objective.trains_mtp:
        return {}
    totals: dict = {}
    if "values" in MTPLossLoggingHelper.tracker:  # only the last stage holds the MTP block
        MTPLossLoggingHelper.track_mtp_metrics(1.0, run.state.iteration, None,
                                               total_loss_dict=totals)
    # Other stages send zeros, built the same way (one path, on the device, for every rank).
    values = torch.stack([torch.as_tensor(totals.get(f"mtp_{i + 1} loss", 0.0),
                                          device=compute_device()).float().reshape(())
                          for i in range(num_mtp)])
    torch.distributed.broadcast(values, ps.get_pipeline_model_parallel_last_rank(),
                                group=ps.get_pipeline_model_parallel_group())
    # megatron-core sums one per-token mean per micro-batch: report their mean.
    micro = max(1, run.rampup.num_microbatches_at(run.state.consumed_samples) *
                run.log_interval)
    return {f"mtp_{i + 1} loss": v / micro for i, v in enumerate(values.tolist())}


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
