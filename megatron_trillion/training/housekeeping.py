"""Per-iteration chores that Megatron-LM flags ask for, in one place.

``--manual-gc`` (+ ``--manual-gc-interval``, ``--no-manual-gc-eval``), ``--empty-unused-memory-level``,
``--profile`` (+ ``--use-pytorch-profiler``, ``--profile-step-start/-end``, ``--profile-ranks``),
``--record-memory-history`` (+ ``--memory-snapshot-path``) and ``--exit-duration-in-mins``, with
Megatron-LM's meanings. The training loop calls ``before_step`` / ``after_step`` /
``before_eval`` / ``after_eval`` / ``stop``; each is a no-op for flags that are not set.
``ExitSignal`` is ``--exit-signal-handler``.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Callable

import torch


class Housekeeping:
    def __init__(self, training, profiling, *, rank: int, trace_dir: str,
                 log: Callable[[str], None] = print) -> None:
        self.training = training
        self.profiling = profiling
        self.rank = rank
        self.trace_dir = trace_dir
        self.log = log
        self.cuda = torch.cuda.is_available()
        self.started = time.monotonic()
        self._profiler = None
        self._nsys_active = False
        self.profiling_this_rank = profiling.profile and rank in profiling.profile_ranks
        if training.manual_gc:
            # Megatron-LM: no threshold-triggered collections; collect at chosen points so every
            # rank pauses at the same step instead of at random ones.
            gc.disable()
            gc.collect()
        if profiling.record_memory_history and self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    # iterations (1-based numbers of the step about to run / just run) ----------------------

    def before_step(self, iteration: int) -> None:
        if self.profiling_this_rank and iteration - 1 == self.profiling.profile_step_start:
            self._start_profiler()

    def after_step(self, iteration: int) -> None:
        training = self.training
        if training.manual_gc and training.manual_gc_interval and \
                iteration % training.manual_gc_interval == 0:
            gc.collect()
        if training.empty_unused_memory_level >= 1 and self.cuda:
            torch.cuda.empty_cache()
        if self.profiling_this_rank and iteration == self.profiling.profile_step_end:
            self._stop_profiler()

    def before_eval(self) -> None:
        if self.training.manual_gc and self.training.manual_gc_eval:
            gc.collect()

    def after_eval(self) -> None:
        if self.training.manual_gc and self.training.manual_gc_eval:
            gc.collect()
        if self.training.empty_unused_memory_level >= 2 and self.cuda:
            torch.cuda.empty_cache()

    def duration_exceeded(self) -> bool:
        """--exit-duration-in-mins: True on every rank once any rank is past it (collective,
        so call it on every rank at the same point)."""
        limit = self.training.exit_duration_in_mins
        if limit is None:
            return False
        from megatron_trillion.platform.device import compute_device

        past = torch.tensor([1 if time.monotonic() - self.started > 60.0 * limit else 0],
                            device=compute_device())
        torch.distributed.all_reduce(past, op=torch.distributed.ReduceOp.MAX)
        return bool(past.item())

    def stop(self) -> None:
        self._stop_profiler()
        if self.profiling.record_memory_history and self.cuda:
            path = self.profiling.memory_snapshot_path
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            self.log(f" CUDA memory history written to {path}")
        if self.training.manual_gc:
            gc.enable()

    # profiler ---------------------------------------------------------------------------

    def _start_profiler(self) -> None:
        if self.profiling.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            os.makedirs(self.trace_dir, exist_ok=True)
            self._profiler = torch.profiler.profile(
                activities=activities, record_shapes=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir))
            self._profiler.__enter__()
        elif self.cuda:  # nsys: the capture range is cudaProfilerStart .. cudaProfilerStop
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_active = True

    def _stop_profiler(self) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None
            self.log(f" rank {self.rank}: PyTorch profiler trace written to {self.trace_dir}")
        if self._nsys_active:
            torch.cuda.cudart().cudaProfilerStop()
            self._nsys_active = False


class ExitSignal:
    """SIGTERM / SIGUSR1 (SLURM's pre-timeout signal) -> save at the next step, then exit 0."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = True

    def agreed(self) -> bool:
        """True on every rank once any rank received the signal (a collective)."""
        from megatron_trillion.platform.device import compute_device

        flag = torch.tensor([1 if self.received else 0], device=compute_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
