"""The sbatch recipes submitted to a real SLURM (scripts/slurm_local.sh starts a one-node one;
CI always has it): a tiny CPU form of the recipes, unedited, through `sbatch` overrides and
EXTRA_ARGS, in the bare launch mode with this test's Python environment.

* preemption: the pre-timeout signal (``scancel --signal=USR1 --batch``, what
  ``--signal=B:USR1@<s>`` delivers) -> every training process saves at the next step and exits
  0 -> the job requeues itself -> the requeued job resumes from that checkpoint and finishes,
  with the loss curve of an uninterrupted run;
* a pretraining -> context-extension chain with ``--dependency=afterok``.

Skipped only where ``sbatch`` is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiprocess import free_port
from tiny_recipes import CONTEXT_ITERS, PRETRAIN_ITERS, tiny_args

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LANGS = ["en", "ko"]
# After the batch ramp-up (4 steps): the resumed segment starts at the full batch.
SIGNAL_AFTER = 5
JOB_TIMEOUT = 900  # seconds per job: a slow shared machine, never a tight limit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="no sbatch (bash scripts/slurm_local.sh start installs and "
                              "starts a one-node SLURM)"),
]

TINY_PRETRAIN = tiny_args("tri_7b/pretrain.sbatch")
TINY_CONTEXT = tiny_args("tri_7b/context_extension.sbatch")
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: (\S+) \|")


def _write_datasets(data_dir: Path) -> None:
    """The splits the two recipes read, per language: train/anneal/valid (pretraining) and
    long/short/valid_long (context extension); random documents over a per-language range."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, lang in enumerate(LANGS):
        tokens = 1 + n * 64 + np.arange(64)
        for split, docs, (low, high) in (
                ("train", 60, (20, 200)), ("anneal", 20, (20, 200)), ("valid", 8, (20, 200)),
                ("long", 12, (300, 600)), ("short", 40, (8, 100)),
                ("valid_long", 4, (300, 600))):
            prefix = str(data_dir / f"{split}_{lang}_text_document")
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            for _ in range(docs):
                doc = rng.choice(tokens, int(rng.integers(low, high))).tolist() + [0]
                builder.add_document(np.array(doc, dtype=np.int64), [len(doc)])
            builder.finalize(prefix + ".idx")


def _scontrol(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                         text=True, timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


class Job:
    def __init__(self, recipe: str, tmp: Path, name: str, env: dict, sbatch: list[str]):
        self.log = tmp / f"{name}.out"
        command = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0",
                   "--cpus-per-task=2", "--time=30", f"--output={self.log}", *sbatch,
                   str(EXAMPLES / recipe)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (command, result.stderr)
        self.id = result.stdout.strip().split(";")[0]

    def cancel(self) -> None:
        """Ends the job if it still runs (a failed test leaves nothing behind)."""
        subprocess.run(["scancel", self.id], timeout=60)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def state(self) -> dict:
        return _scontrol(self.id)

    def wait_for(self, done, what: str, timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.state()
            if done(info):
                return info
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY") or time.monotonic() > deadline:
                self.cancel()
                pytest.fail(f"job {self.id}: waiting for {what}, found "
                            f"{info.get('JobState')} (Reason={info.get('Reason')})\n"
                            f"--- job log {self.log} ---\n{self.text()}")
            time.sleep(1.0)

    def wait_completed(self) -> dict:
        return self.wait_for(lambda info: info.get("JobState") == "COMPLETED", "COMPLETED")


def _env(tmp: Path, name: str, extra: list[str], **more) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # MAX_RESTARTS=0: a failure ends the job (and the test, with its log) at once.
    env.update(CONTAINER_IMAGE="none", VENV=sys.prefix, GPUS_PER_NODE="2", MAX_RESTARTS="0",
               OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               DATA_DIR=str(tmp / "data"), TOKENIZER=str(tmp / "no-tokenizer"),
               CKPT_DIR=str(tmp / name), LANGS=" ".join(LANGS), EXTRA_ARGS=" ".join(extra))
    env.update(more)
    return env


def _losses(text: str) -> dict[int, str]:
    """{iteration: lm loss as printed}; an iteration logged twice must log the same loss."""
    losses: dict[int, str] = {}
    for match in LOSS_LINE.finditer(text):
        iteration, loss = int(match.group(1)), match.group(3)
        assert losses.setdefault(iteration, loss) == loss, (iteration, text)
    return losses


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Pretraining, and context extension from its final checkpoint once it succeeded."""
    tmp = tmp_path_factory.mktemp("slurm")
    _write_datasets(tmp / "data")
    pretrain = Job("tri_7b/pretrain.sbatch", tmp, "pretrain",
                   _env(tmp, "pretrain", TINY_PRETRAIN), [])
    extension = Job("tri_7b/context_extension.sbatch", tmp, "context",
                    _env(tmp, "context", TINY_CONTEXT, INIT_CHECKPOINT=str(tmp / "pretrain")),
                    [f"--dependency=afterok:{pretrain.id}"])
    yield tmp, pretrain, extension
    for job in (pretrain, extension):
        job.cancel()


def test_afterok_chain_pretraining_then_context_extension(chain):
    tmp, pretrain, extension = chain
    waiting = extension.state()
    if pretrain.state().get("JobState") in ("PENDING", "RUNNING"):
        assert waiting["JobState"] == "PENDING", waiting
        assert waiting["Dependency"] == f"afterok:{pretrain.id}(unfulfilled)", waiting
    first_end = pretrain.wait_completed()["EndTime"]
    assert extension.wait_completed()["StartTime"] >= first_end  # ISO times
    first, second = pretrain.text(), extension.text()
    assert "launch mode: bare (no container)" in first, first
    assert (f"job {pretrain.id} finished: checkpoint iteration {PRETRAIN_ITERS} in "
            f"{tmp / 'pretrain'}") in first, first
    assert (f"job {extension.id} restart 0 (SLURM_RESTART_COUNT=0): starts from "
            f"{tmp / 'pretrain'} (weights only, --finetune)") in second, second
    assert max(_losses(second)) == CONTEXT_ITERS, second
    assert (tmp / "context" / "latest_checkpointed_iteration.txt").read_text().strip() == \
        str(CONTEXT_ITERS)


def _training_processes(ckpt: Path) -> list[int]:
    """The training processes (torchrun's workers, not its agent nor the node wrapper) of the
    job whose checkpoints go to ``ckpt``; the job runs on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if (b"megatron_trillion.pretrain" in argv and str(ckpt).encode() in argv
                and not any(arg.endswith(b"torchrun") for arg in argv)):
            pids.append(int(entry.name))
    return pids


def _has_usr1(pid: int, mask: str) -> bool:
    """Whether /proc/<pid>/status's signal ``mask`` (SigCgt: caught, ShdPnd: pending) has
    USR1."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(mask + ":"):
            return bool(int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1)
    return False


def _preempt(job: Job, ckpt: Path, after: int, processes: int = 2) -> None:
    """The pre-timeout signal right after iteration ``after``, whatever the machine's speed:
    the training processes (once each has its USR1 handler) are stopped (SIGSTOP) as soon as
    that iteration's line is in the log, the signal goes to the batch shell as
    `--signal=B:USR1@<s>` sends it, and they continue once it is pending in each of them."""
    deadline = time.monotonic() + JOB_TIMEOUT
    pids: list[int] = []
    polls = 0
    while time.monotonic() < deadline:
        pids = _training_processes(ckpt)
        try:
            if len(pids) == processes and all(_has_usr1(pid, "SigCgt") for pid in pids):
                break
        except OSError:  # a process that just ended
            pass
        polls += 1
        if polls % 50 == 0 and job.state().get("JobState") not in ("PENDING", "RUNNING"):
            pytest.fail(f"job {job.id} ended before training started\n{job.text()}")
        time.sleep(0.02)
    else:
        pytest.fail(f"job {job.id}: no training processes with a USR1 handler\n{job.text()}")
    # Several iterations remain after this one: stopping the processes within a few
    # milliseconds of the line leaves the run unfinished on any machine.
    line = f"iteration {after:8d}/"
    while line not in job.text():
        assert time.monotonic() < deadline, job.text()
        time.sleep(0.005)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True,
                       timeout=60)
        while not all(_has_usr1(pid, "ShdPnd") for pid in pids):
            assert time.monotonic() < deadline, job.text()
            time.sleep(0.05)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_preempted_job_requeues_and_resumes_bitwise(chain):
    tmp, uninterrupted, _ = chain
    job = Job("tri_7b/pretrain.sbatch", tmp, "preempted",
              _env(tmp, "preempted", TINY_PRETRAIN),
              ["--signal=B:USR1@60"])
    try:
        _preempt(job, tmp / "preempted", after=SIGNAL_AFTER)

        def requeued(info):
            if int(info.get("Restarts", 0)) < 1:
                return False
            # The requeued job starts by itself once the old segment's credential expired
            # (scripts/slurm_local.sh: cred_expire=20); forcing StartTime=now races it.
            return info.get("JobState") == "COMPLETED"

        info = job.wait_for(requeued, "the requeued job to complete")
    finally:
        job.cancel()
    assert info["Restarts"] == "1", info
    text = job.text()
    saved = re.findall(r"pre-timeout signal: checkpoint iteration (\d+) saved; requeueing", text)
    assert len(saved) == 1, text
    at_signal = int(saved[0])
    assert SIGNAL_AFTER <= at_signal <= SIGNAL_AFTER + 1, text  # the next step
    assert f"saved checkpoint at iteration {at_signal:7d}" in text, text
    segments = re.findall(r"job \d+ restart (\d+) \(SLURM_RESTART_COUNT=\d+\): (.*)", text)
    assert [n for n, _ in segments] == ["0", "1"], text
    assert segments[1][1].startswith(f"resumes from checkpoint iteration {at_signal} in "), text
    assert f"job {job.id} finished: checkpoint iteration {PRETRAIN_ITERS}" in text, text
    # Both segments' lines are in the log (--open-mode=append), the second starting after the
    # checkpoint; together they are the uninterrupted run's curve, bit for bit.
    uninterrupted.wait_completed()
    expected = _losses(uninterrupted.text())
    assert sorted(expected) == list(range(1, PRETRAIN_ITERS + 1)), uninterrupted.text()
    assert _losses(text) == expected
