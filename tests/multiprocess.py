"""Run a test body under N gloo processes and surface every rank's failure.

``run_distributed(fn, world_size, **kwargs)`` starts ``world_size`` processes, sets the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port),
calls ``fn(**kwargs)`` in each and returns the per-rank return values. A rank that raises makes
the call raise with that rank's traceback; a run that exceeds ``timeout`` (a hung collective)
is killed and reported instead of hanging CI.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ranks are forked from a server that has imported these once: megatron-core alone takes ~10 s
# to import per process on a CI core, which made imports the larger part of the multi-process
# tests' time under "spawn". The server runs no torch op before forking, so no thread pool is
# inherited half-initialised.
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.dist_checkpointing", "megatron.core.optimizer",
            "megatron.core.pipeline_parallel", "megatron_trillion.pretrain"]


class _ParentStdio:
    """The test process's stdout and stderr, handed to a rank: a forked rank would otherwise write
    to the server's, which pytest's capture of the current test (capfd) does not see."""

    def __init__(self, fds: tuple = ()) -> None:
        self.fds = fds

    def __reduce__(self):
        from multiprocessing import reduction

        return (_ParentStdio, ((reduction.DupFd(1), reduction.DupFd(2)),))

    def attach(self) -> None:
        for target, fd in zip((1, 2), self.fds):
            os.dup2(fd.detach(), target)


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, results,
            environ: dict, cwd: str, stdio: _ParentStdio) -> None:
    # The server was started by the first test that needed it: take this test's environment,
    # working directory and output streams, as a spawned process would.
    stdio.attach()
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import warnings

    import torch

    torch.set_num_threads(1)
    # megatron-core warns at import about missing TE/apex in every rank; that is expected here.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        value = fn(**kwargs)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_trillion.platform.distributed import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001 - teardown after a failure must not mask it
            pass


class DistributedTestError(AssertionError):
    pass


def run_distributed(fn: Callable, world_size: int, timeout: float = 300.0, **kwargs: Any) -> list:
    """Run ``fn(**kwargs)`` on ``world_size`` gloo ranks; return results ordered by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    results = ctx.Queue()
    port = free_port()
    environ, cwd = dict(os.environ), os.getcwd()
    procs = [
        ctx.Process(target=_worker,
                    args=(rank, world_size, port, fn, kwargs, results, environ, cwd,
                          _ParentStdio()),
                    daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs)
                        if not p.is_alive() and i not in outcomes and p.exitcode not in (0, None)]
                if dead:
                    # A rank died without reporting (segfault, os._exit): give the queue a
                    # moment, then report it.
                    time.sleep(0.5)
                    while not results.empty():
                        rank, ok, value = results.get()
                        outcomes[rank] = (ok, value)
                    for i in dead:
                        outcomes.setdefault(
                            i, (False, f"rank {i} exited with code {procs[i].exitcode}")
                        )
                continue
            outcomes[rank] = (ok, value)
            if not ok:
                # One failure usually leaves the other ranks blocked in a collective.
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for proc in procs:
            proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic() + 5.0)))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()

    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    missing = [r for r in range(world_size) if r not in outcomes]
    if failures:
        raise DistributedTestError("\n".join(failures))
    if missing:
        raise DistributedTestError(
            f"ranks {missing} did not finish within {timeout:.0f}s (hung collective?)"
        )
    return [outcomes[r][1] for r in range(world_size)]
