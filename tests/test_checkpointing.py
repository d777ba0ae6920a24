"""Checkpoints: exact resume, resharding on load, atomic saves, signals, bad input.

The multi-process runs are shared between tests (module fixtures): one dense TP2 x PP2 run
trains 4 steps saving at 2 and 4; its iteration-2 checkpoint is resumed for the exactness test
and its iteration-4 checkpoint is loaded at other layouts for the resharding tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from multiprocess import free_port, run_distributed

STEPS, SAVE_AT = 4, 2
VOCAB = 8000  # not a multiple of 128 x TP
TOKENS = [[5, 17, 300, 41, 2048, 7, 7, 1000, 3, 99, 512, 4000, 12, 64, 8, 1]]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(preset: str, cache: str, *extra: str) -> list[str]:
    return [
        "--preset", preset, "--mock-data", "--data-cache-path", cache, "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1",
        "--lr-wsd-decay-fraction", "0.4", "--seed", "7", "--no-progress-bar", *extra,
    ]


def train_losses(argv: list[str]) -> dict:
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    losses, lines = [], []
    pretrain(parse_args(argv), log=lines.append,
             on_step=lambda state, result: losses.append(result["lm loss"]))
    return {"losses": losses, "log": lines}


def _train_and_resume(preset: str, tmp, world: int, layout: list[str]):
    cache, ckpt = str(tmp / "cache"), str(tmp / "ckpt")
    full = run_distributed(train_losses, world, timeout=900,
                           argv=_argv(preset, cache, "--save", ckpt,
                                      "--save-interval", str(SAVE_AT), *layout))
    resumed = run_distributed(train_losses, world, timeout=900,
                              argv=_argv(preset, cache, "--load", ckpt, "--ckpt-step",
                                         str(SAVE_AT), *layout))
    return ckpt, full, resumed


def _assert_exact_resume(full: list, resumed: list) -> None:
    assert any("loaded checkpoint" in line and f"(iteration {SAVE_AT})" in line
               for line in resumed[0]["log"])  # rank 0 logs
    for rank_full, rank_resumed in zip(full, resumed):
        assert len(rank_full["losses"]) == STEPS
        # bitwise: the resumed run continues exactly where the saved one was
        assert rank_resumed["losses"] == rank_full["losses"][SAVE_AT:]


@pytest.fixture(scope="module")
def dense_tp2_pp2(tmp_path_factory):
    return _train_and_resume("tiny-tri-7b", tmp_path_factory.mktemp("dense"), 4,
                             ["--tensor-model-parallel-size", "2",
                              "--pipeline-model-parallel-size", "2",
                              "--use-distributed-optimizer",
                              # dropout: the resumed run must also continue the RNG streams
                              "--hidden-dropout", "0.1",
                              # padded to 8,192 rows at TP2/TP4 and 8,064 at TP1: the
                              # checkpoint must move between the two paddings
                              "--vocab-size", str(VOCAB)])


@pytest.mark.slow
def test_exact_resume_tp2_pp2(dense_tp2_pp2):
    _, full, resumed = dense_tp2_pp2
    _assert_exact_resume(full, resumed)


@pytest.mark.slow
def test_exact_resume_moe_ep2_dp2_distributed_optimizer(tmp_path):
    _, full, resumed = _train_and_resume("tiny-trinity", tmp_path, 2,
                                         ["--expert-model-parallel-size", "2",
                                          "--use-distributed-optimizer"])
    _assert_exact_resume(full, resumed)


# The Trinity-Large recipe's optimizer flags (examples/trinity_large/pretrain.sbatch) on the
# tiny MoE preset; fp32 Newton-Schulz so that DP1 and DP2 take the same update.
TRINITY_MUON = ["--optimizer", "muon", "--muon-lr", "8e-3", "--muon-momentum", "0.95",
                "--weight-decay", "0.1", "--anneal-weight-decay", "0.033", "--adam-beta1", "0.9",
                "--adam-beta2", "0.95", "--clip-grad", "1.0", "--lr-decay-style", "wsd",
                "--use-distributed-optimizer", "--overlap-grad-reduce",
                "--attention-masking", "xlda", "--xlda-mixing-prob", "0.5",
                "--anchor-language", "en", "--muon-fp32-matmul-prec", "high"]


@pytest.mark.slow
def test_muon_distributed_optimizer_resumes_exactly_and_at_another_dp_size(tmp_path):
    ckpt, full, resumed = _train_and_resume("tiny-trinity", tmp_path, 2, TRINITY_MUON)
    _assert_exact_resume(full, resumed)
    # The layer-wise optimizer state saved by two DP ranks (each owning half the parameters)
    # loads into one rank that owns them all.
    (single,) = run_distributed(train_losses, 1, timeout=900,
                                argv=_argv("tiny-trinity", str(tmp_path / "cache"), "--load",
                                           ckpt, "--ckpt-step", str(SAVE_AT), *TRINITY_MUON))
    assert any("loaded checkpoint" in line for line in single["log"])
    np.testing.assert_allclose(single["losses"], full[0]["losses"][SAVE_AT:], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# resharding


def layout_logits(root: str, tensor_sizes: list[int]) -> dict:
    """Logits on TOKENS of the newest checkpoint in ``root``, loaded at each TP size in turn
    (DP = the remaining ranks) in the same processes."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed
    from megatron_trillion.training.checkpointing import load_model

    out = {}
    for tp in tensor_sizes:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        initialize_distributed(ParallelSizes(tensor=tp), seed=1)
        model, _ = load_model(root, log=lambda line: None)
        ids = torch.tensor(TOKENS)
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
            out[tp] = gather_from_tensor_model_parallel_region(logits).numpy()
    return out


@pytest.fixture(scope="module")
def resharded_logits(dense_tp2_pp2):
    # saved at TP2 x PP2 x DP1; loaded at TP4 x PP1 x DP1, then TP1 x PP1 x DP4
    return run_distributed(layout_logits, 4, root=dense_tp2_pp2[0], tensor_sizes=[4, 1])


@pytest.mark.slow
def test_reshard_tp2_pp2_to_tp4_and_to_tp1_dp4(resharded_logits):
    reference = resharded_logits[0][1]
    assert reference.shape == (1, len(TOKENS[0]), 8064)  # TP1 pads 8,000 to 8,064
    real = reference[..., :VOCAB]
    assert np.isfinite(real).all() and real.std() > 0
    assert (reference[..., VOCAB:] == -np.inf).all()  # padded ids can never be produced
    for rank in resharded_logits:
        np.testing.assert_array_equal(rank[1], reference)  # every DP replica the same
        assert rank[4].shape[-1] == 8192 and (rank[4][..., VOCAB:] == -np.inf).all()
        np.testing.assert_allclose(rank[4][..., :VOCAB], real, rtol=0, atol=1e-5)


def single_process_checks(root: str, corrupt_root: str) -> dict:
    """One rank: TP1 reference via load_for_inference, and the bad-input errors."""
    import torch

    from megatron_trillion.inference.generate import load_for_inference
    from megatron_trillion.models.presets import model_signature
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed
    from megatron_trillion.training import checkpointing
    from megatron_trillion.training.checkpointing import CheckpointError, load_checkpoint
    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.presets import resolve_preset

    initialize_distributed(ParallelSizes(), seed=1)
    model, _, _ = load_for_inference(root)
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        reference = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).numpy()

    errors = {}
    # a model of another shape: hidden 64 instead of tiny-tri-7b's 128
    other = resolve_preset("tiny-tri-7b", {"hidden_size": 64})
    small = build_model(other)
    for name, call in {
        "mismatch": lambda: load_checkpoint(root, [small], None, model_signature(other),
                                            load_rng=False),
        "corrupt": lambda: checkpointing.load_model(corrupt_root, log=lambda line: None),
    }.items():
        try:
            call()
            errors[name] = None
        except CheckpointError as exc:
            errors[name] = str(exc)
    return {"reference": reference, "errors": errors}


@pytest.fixture(scope="module")
def single_process(dense_tp2_pp2, tmp_path_factory):
    import shutil

    ckpt = dense_tp2_pp2[0]
    corrupt = str(tmp_path_factory.mktemp("corrupt"))
    shutil.copytree(os.path.join(ckpt, "iter_0000004"), os.path.join(corrupt, "iter_0000004"))
    with open(os.path.join(corrupt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("4")
    shard = sorted(n for n in os.listdir(os.path.join(corrupt, "iter_0000004"))
                   if n.endswith(".distcp"))[0]
    path = os.path.join(corrupt, "iter_0000004", shard)
    with open(path, "r+b") as f:  # a truncated shard, as a full disk would leave it
        f.truncate(os.path.getsize(path) // 3)
    (result,) = run_distributed(single_process_checks, 1, root=ckpt, corrupt_root=corrupt)
    return result


@pytest.mark.slow
def test_reshard_to_tp1_single_process_matches(single_process, resharded_logits):
    # generate.load_for_inference (one process) sees the same model
    np.testing.assert_array_equal(single_process["reference"], resharded_logits[0][1])


@pytest.mark.slow
def test_load_of_other_hidden_size_names_the_field(single_process):
    message = single_process["errors"]["mismatch"]
    assert message is not None
    assert "different model" in message
    assert "hidden_size: checkpoint 128, this run 64" in message


@pytest.mark.slow
def test_corrupt_shard_is_a_clear_error(single_process):
    message = single_process["errors"]["corrupt"]
    assert message is not None
    assert "iter_0000004 is corrupt: shard file __0_0.distcp is truncated" in message


# --------------------------------------------------------------------------------------------
# publishing and choosing a checkpoint (file operations only)


def _fake_checkpoint(root, iteration: int, partial: bool = False) -> str:
    from megatron_trillion.training.checkpointing import PARTIAL, checkpoint_dir

    path = checkpoint_dir(str(root), iteration) + (PARTIAL if partial else "")
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write("{}")
    return path


def test_publish_keeps_last_k_and_moves_the_tracker_last(tmp_path):
    from megatron_trillion.training.checkpointing import publish_checkpoint, read_tracker

    for iteration in (2, 4, 6):
        _fake_checkpoint(tmp_path, iteration, partial=True)
        publish_checkpoint(str(tmp_path), iteration, keep_last=2, log=lambda line: None)
        assert read_tracker(str(tmp_path)) == iteration
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000006",
                                            "latest_checkpointed_iteration.txt"]


def test_resolve_ignores_partial_and_reports_it(tmp_path):
    from megatron_trillion.training.checkpointing import publish_checkpoint, resolve_checkpoint

    _fake_checkpoint(tmp_path, 2, partial=True)
    publish_checkpoint(str(tmp_path), 2, keep_last=None, log=lambda line: None)
    partial = _fake_checkpoint(tmp_path, 4, partial=True)
    lines = []
    assert resolve_checkpoint(str(tmp_path), log=lines.append).endswith("iter_0000002")
    assert lines == [f" ignoring incomplete checkpoint {partial} (its save did not finish)"]


def test_resolve_recovers_from_a_kill_inside_publish(tmp_path):
    from megatron_trillion.training.checkpointing import (
        REPLACED,
        TRACKER,
        checkpoint_dir,
        resolve_checkpoint,
    )

    # killed after the first rename (before the tracker): the renamed directory is complete
    _fake_checkpoint(tmp_path, 2)
    assert resolve_checkpoint(str(tmp_path), log=lambda line: None).endswith("iter_0000002")
    # saving iteration 2 again, killed between setting the old copy aside and the rename
    with open(os.path.join(tmp_path, TRACKER), "w") as f:
        f.write("2")
    os.rename(checkpoint_dir(str(tmp_path), 2), checkpoint_dir(str(tmp_path), 2) + REPLACED)
    assert resolve_checkpoint(str(tmp_path), log=lambda line: None).endswith(REPLACED)


def test_missing_load_path_and_step_are_clear_errors(tmp_path):
    from megatron_trillion.training.checkpointing import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError, match="--load .*nope: no such directory"):
        resolve_checkpoint(str(tmp_path / "nope"))
    _fake_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError,
                       match=r"--ckpt-step 3: .* does not exist \(complete checkpoints "
                             r"in .*: \[2\]\)"):
        resolve_checkpoint(str(tmp_path), 3)
    with pytest.raises(CheckpointError, match="is one checkpoint's directory: give the run's"):
        resolve_checkpoint(str(tmp_path / "iter_0000002"), log=lambda line: None)


_UNUSABLE = {  # case: (flags, the error's text); "F" is a file, "E" an empty directory
    "--load of an empty directory to fine-tune": (["--load", "E", "--finetune"],
                                                 "--load E holds no checkpoint"),
    "--load of an empty directory": (["--load", "E"], "--load E holds no checkpoint"),
    "--load of a file": (["--load", "F"],
                         "--load F is a file, not a checkpoint directory"),
    "--save is a file": (["--save", "F"], "--save F is a file, not a directory"),
    "--save below a file": (["--save", "F/ckpt"],
                            "--save F/ckpt cannot be created: F is a file, not a directory"),
    "--save on a read-only file system": (["--save", "E/ckpt"], "--save E/ckpt is not writable "
                                          "(E, where it is created): a read-only file system"),
    "--tensorboard-dir is a file": (["--tensorboard-dir", "F"],
                                    "--tensorboard-dir F is a file, not a directory"),
    "--data-cache-path is a file": (["--data-cache-path", "F"],
                                    "--data-cache-path F is a file, not a directory"),
}


@pytest.mark.parametrize("case", list(_UNUSABLE))
def test_unusable_load_and_output_paths_are_refused_before_training(case, tmp_path, capsys,
                                                                     monkeypatch):
    """Found at start-up, with the other flags: not after training (a save into a file), and
    not by training from scratch (an empty --load to start from)."""
    from megatron_trillion.pretrain import main

    flags, message = _UNUSABLE[case]
    (tmp_path / "F").write_text("not a directory")
    (tmp_path / "E").mkdir()
    if "read-only" in case:  # root ignores permission bits: fake what access() reports
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("E")
                            else real_access(path, mode))
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "tiny-tri-7b", "--seq-length", "32", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "512", "--mock-data", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "1", "--eval-iters", "0",
            "--no-progress-bar"]
    if "--data-cache-path" not in flags:
        argv += ["--data-cache-path", "cache"]
    assert main(argv + flags) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.startswith("error: ")
    assert "Traceback" not in captured.err and "iteration" not in captured.out


# --------------------------------------------------------------------------------------------
# killed during a save; signals (real CLI processes)


def _cli_env() -> dict:
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(predicate, proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_during_save_then_signal_resume(tmp_path):
    cache, ckpt = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    argv = _argv("tiny-tri-7b", cache, "--save", ckpt, "--ckpt-keep-last", "1",
                 "--log-interval", "1", "--train-iters", "20")
    # 1. save at 2 publishes; the save at 4 writes its files, then hangs before publishing
    #    (HANG_AT_SAVE below) and the whole process group is SIGKILLed there.
    hang = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, "--save-interval", "2"],
        env=dict(_cli_env(), HANG_AT_SAVE="4"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = os.path.join(ckpt, "iter_0000004.partial")
    _wait_for(lambda: os.path.isfile(os.path.join(partial, "metadata.json")), hang, 600,
              "the save at iteration 4 to write its files")
    os.killpg(hang.pid, signal.SIGKILL)
    hang.wait()
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(partial) and os.path.isdir(os.path.join(ckpt, "iter_0000002"))

    # 2. resume: the partial save is reported and ignored, iteration 2 is loaded; SIGUSR1
    #    (SLURM's pre-timeout signal) makes it save at the next step and exit 0.
    resume = subprocess.Popen(
        [sys.executable, "-m", "megatron_trillion.pretrain", *argv, "--load", ckpt,
         "--exit-signal-handler", "--async-save"],
        env=_cli_env(), start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in resume.stdout:
        lines.append(line)
        if line.startswith(" iteration") and "consumed samples" in line:
            os.kill(resume.pid, signal.SIGUSR1)
            break
    rest, _ = resume.communicate(timeout=600)
    output = "".join(lines) + rest
    assert resume.returncode == 0, output
    assert f"ignoring incomplete checkpoint {partial}" in output
    assert "loaded checkpoint" in output and "(iteration 2)" in output
    assert "iteration        3/" in output  # training continued from iteration 3
    assert "exiting at iteration" in output
    saved = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    assert 3 <= saved < 20
    # the stale partial was removed and only the newest checkpoint is kept (--ckpt-keep-last 1)
    assert sorted(os.listdir(ckpt)) == [f"iter_{saved:07d}",
                                        "latest_checkpointed_iteration.txt"]


def _hang_in_save_main(argv: list[str]) -> int:
    """The CLI with a save that never publishes iteration $HANG_AT_SAVE (files written)."""
    from megatron_trillion import pretrain
    from megatron_trillion.training import checkpointing

    hang_at = int(os.environ["HANG_AT_SAVE"])
    finish = checkpointing.CheckpointSaver._finish

    def finish_or_hang(self, iteration):
        if iteration == hang_at:
            while True:
                time.sleep(1)
        finish(self, iteration)

    checkpointing.CheckpointSaver._finish = finish_or_hang
    return pretrain.main(argv)


if __name__ == "__main__":
    sys.exit(_hang_in_save_main(sys.argv[1:]))


# --------------------------------------------------------------------------------------------
# the state a resume allocates fits the inner optimizer (TE's FusedAdam on GPU)


class FusedAdamStateContract(torch.optim.Optimizer):
    """A stand-in for TE's FusedAdam, which does not install without CUDA: its per-parameter
    state is only exp_avg, exp_avg_sq and master_param (``step`` lives in the param groups),
    and its ``state_dict()`` looks every state name up in ``name_to_dtype_map``, so any other
    name is a ``KeyError``."""

    name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                         "master_param": torch.float32}

    @classmethod
    def taking_over(cls, optimizer: torch.optim.Optimizer) -> "FusedAdamStateContract":
        """The double with ``optimizer``'s param groups and state (its main params are views
        into megatron-core's buffers, which a new optimizer would refuse as non-leaf)."""
        double = cls.__new__(cls)
        double.__dict__.update(optimizer.__dict__)
        return double

    def state_dict(self):
        for state in self.state.values():
            for name in state:
                self.name_to_dtype_map[name]  # noqa: B018 - TE's lookup
        return super().state_dict()


def _resume_request_with_each_inner_optimizer(config, run) -> dict:
    """Build a fresh distributed optimizer's load request (what a resume does first) with
    torch's AdamW and with the FusedAdam double as its inner optimizer."""
    from megatron.core.optimizer import distrib_optimizer

    from megatron_trillion.training import checkpointing
    from megatron_trillion.training.build import build_optimizer

    states = {}
    for inner in ("torch", "fused"):
        optimizer = build_optimizer(config, run.model)
        leaf = checkpointing._leaf_optimizers(optimizer)[0]
        assert isinstance(leaf, distrib_optimizer.DistributedOptimizer)
        saved = (distrib_optimizer.HAVE_APEX_OR_TE, distrib_optimizer.USING_TE_OPTIMIZER)
        if inner == "fused":
            # megatron-core then reads the step from the param groups, as with TE on GPU
            leaf.optimizer = FusedAdamStateContract.taking_over(leaf.optimizer)
            distrib_optimizer.HAVE_APEX_OR_TE = distrib_optimizer.USING_TE_OPTIMIZER = True
        try:
            checkpointing._sharded_state(run.model, optimizer, include_optimizer=True,
                                         include_rng=False, is_loading=True)
        finally:
            distrib_optimizer.HAVE_APEX_OR_TE, distrib_optimizer.USING_TE_OPTIMIZER = saved
        states[inner] = sorted({name for state in leaf.optimizer.state.values()
                                for name in state})
    return states


def _distributed_optimizer_run(argv: list[str], save: str) -> dict:
    """A DP2 run with the distributed optimizer and --overlap-param-gather that saves at
    step 2; then what a resume allocates (with each inner optimizer) and whether the
    checkpoint holds the weights the model computes with."""
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    config = parse_args(argv)
    _, run = pretrain(config, log=lambda line: None)
    return {"saved": _saved_and_computed_weights(run, save),
            "resume_state": _resume_request_with_each_inner_optimizer(config, run)}


@pytest.fixture(scope="module")
def distributed_optimizer_dp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distopt")
    save = str(tmp / "ckpt")
    return run_distributed(
        _distributed_optimizer_run, 2, timeout=600, save=save,
        argv=_argv("tiny-tri-7b", str(tmp / "cache"), "--use-distributed-optimizer",
                   "--overlap-grad-reduce", "--overlap-param-gather", "--save", save,
                   "--exit-interval", str(SAVE_AT)))


@pytest.mark.slow
def test_resume_allocates_only_the_state_the_inner_optimizer_keeps(distributed_optimizer_dp2):
    """With --use-distributed-optimizer a resume first builds a load request from a fresh
    optimizer; a per-parameter ``step`` there made TE's FusedAdam raise KeyError('step') at
    every GPU resume. torch's AdamW (CPU) still gets its per-parameter step."""
    from megatron_trillion.training.checkpointing import keeps_step_per_parameter

    for result in distributed_optimizer_dp2:
        assert result["resume_state"] == {"torch": ["exp_avg", "exp_avg_sq", "step"],
                                          "fused": ["exp_avg", "exp_avg_sq"]}
    adamw = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    assert keeps_step_per_parameter(adamw)
    assert not keeps_step_per_parameter(FusedAdamStateContract.taking_over(adamw))


# --------------------------------------------------------------------------------------------
# --overlap-param-gather: a save holds the weights of the step it is taken at


def _saved_and_computed_weights(run, save: str) -> dict:
    from megatron_trillion.training.checkpointing import load_model, unwrap

    assert all(chunk.ddp_config.overlap_param_gather for chunk in run.model)
    # The weights the next forward computes with: its pre-hooks' all-gather, done now.
    for chunk in run.model:
        chunk.start_param_sync(force_sync=True)
    computed = {name: p.detach().clone() for name, p in unwrap(run.model[0]).named_parameters()}
    loaded, common = load_model(save, log=lambda line: None)
    saved = dict(loaded.named_parameters())
    return {"iteration": common["iteration"], "tensors": len(saved),
            "differing": [name for name in saved if not torch.equal(saved[name],
                                                                      computed[name])]}


@pytest.mark.slow
def test_overlap_param_gather_saves_the_weights_of_the_saved_step(distributed_optimizer_dp2):
    """DP2 with the distributed optimizer: each rank's step updates its own shard and, with
    --overlap-param-gather, gathers the other's only in the next forward; the checkpoint of
    step 2 must hold the weights step 3 computes with (not step 1's for half of them)."""
    for result in distributed_optimizer_dp2:
        assert result["saved"]["iteration"] == SAVE_AT and result["saved"]["tensors"] > 10
        assert result["saved"]["differing"] == []
