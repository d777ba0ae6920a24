"""Hang watchdog: a rank whose training iteration makes no progress for too long dumps every
thread's Python stack and ends the process, instead of waiting out a collective timeout.

Interface (the training loop calls these)::

    dog = HangWatchdog(timeout_seconds, rank)   # --hang-timeout-seconds
    dog.start(iteration)       # before the first step; `iteration` = the one about to run
    dog.step_done(iteration)   # after each finished iteration (its eval and save included)
    dog.stop()                 # at the end of training (also on exceptions)

The clock covers one whole iteration including its evaluation and checkpoint save, so the
timeout must exceed the slowest of those (setup and the initial checkpoint load are not
watched).

Why every rank fires on its own: a stalled rank (a deadlocked data worker, a wedged kernel)
blocks its peers inside the next collective, so they stop making progress too. Each rank's
own timer therefore expires within about one timeout, and every rank reports its stack: the
stalled one shows where it is stuck, the others show the collective they are waiting in.

The exit is ``os._exit`` from the watchdog thread: the main thread is blocked (possibly in C
code), so raising an exception there is impossible; the launcher (torchrun, SLURM) sees the
non-zero exit code and tears the job down.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Callable, Optional, TextIO

HANG_EXIT_CODE = 124
"""Process exit code of a watchdog abort (as timeout(1) uses)."""


class HangWatchdog:
    """One background thread per rank; ``timeout_seconds=None`` disables it (no thread)."""

    def __init__(self, timeout_seconds: Optional[float], rank: int,
                 stream: Optional[TextIO] = None,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError(f"--hang-timeout-seconds must be > 0, got {timeout_seconds}")
        self.timeout_seconds = timeout_seconds
        self.rank = rank
        self._stream = stream
        self._exit = exit_fn
        self._lock = threading.Lock()
        self._iteration = 0
        self._last_progress = time.monotonic()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_seconds is not None

    def start(self, iteration: int) -> None:
        """Begin watching; ``iteration`` is the (1-based) iteration about to run."""
        if not self.enabled or self._thread is not None:
            return
        self._mark(iteration)
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def step_done(self, iteration: int) -> None:
        """Iteration ``iteration`` finished: the clock restarts for ``iteration + 1``."""
        if self.enabled:
            self._mark(iteration + 1)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _mark(self, iteration: int) -> None:
        with self._lock:
            self._iteration = iteration
            self._last_progress = time.monotonic()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_seconds / 4)
        while not self._stopped.wait(poll):
            with self._lock:
                idle = time.monotonic() - self._last_progress
                iteration = self._iteration
            if idle >= self.timeout_seconds:
                self._abort(iteration, idle)
                return

    def _abort(self, iteration: int, idle: float) -> None:
        report = (
            f"hang watchdog: rank {self.rank} made no progress in iteration {iteration} for "
            f"{idle:.0f} s (--hang-timeout-seconds {self.timeout_seconds:g}); Python stacks of "
            f"all threads of rank {self.rank} follow, then exit code {HANG_EXIT_CODE}\n"
            + thread_stacks(self.rank))
        write_whole(self._stream or sys.stderr, report)
        # Linger before exiting: the peers blocked in a collective with this rank reach their
        # own timeout meanwhile and dump where they wait, instead of failing first with a
        # "connection closed" error that hides it.
        self._stopped.wait(min(self.timeout_seconds / 2, 60.0))
        self._exit(HANG_EXIT_CODE)


def thread_stacks(rank: int) -> str:
    """Every thread's Python stack, innermost call last, each line tagged with the rank."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"[rank {rank}] thread {names.get(ident, '?')} ({ident}), most recent "
                     "call last:\n")
        parts.extend(f"[rank {rank}] {line}\n" for entry in traceback.format_stack(frame)
                     for line in entry.rstrip("\n").split("\n"))
    return "".join(parts)


def write_whole(stream: TextIO, text: str) -> None:
    """Write ``text`` with as few system calls as the OS allows.

    Every rank of a job usually shares one stderr (a pipe or a log file); a line-buffered
    text stream would issue one write per line, and two ranks dumping at the same moment
    would interleave line by line. One ``os.write`` on a shared file is placed whole.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. io.StringIO
        stream.write(text)
        stream.flush()
        return
    stream.flush()
    data = text.encode("utf-8", "replace")
    while data:
        written = os.write(fd, data)
        data = data[written:]
