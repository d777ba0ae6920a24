"""``pretrain --grpo`` through the real entry point (slow): TP2 and DP2 give the losses of one
process on the same rollouts, a resumed run continues exactly (also from a save between the
epochs of a rollout), the KL reference is reloaded on resume, and the log carries the rollout's
figures."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from multiprocess import run_distributed

STEPS = 3
PARALLEL_STEPS = 2
# A reward a random tiny model earns about half the time, so most groups differ.
REWARDS = ("def odd_length(response, ground_truth):\n    return float(len(response) % 2)\n"
           "def odd_length_unless_same(response, ground_truth):\n"
           "    return 1.0 if ground_truth == 'same' else float(len(response) % 2)\n")


def _argv(world: dict, steps: int, save: str, *extra: str) -> list[str]:
    return ["--preset", "tiny-tri-7b", "--grpo", "--tokenizer-model", world["tokenizer"],
            "--data-path", world["en"], world["ko"], "--seq-length", "64",
            "--global-batch-size", "2", "--train-iters", str(steps), "--lr", "3e-3",
            "--grpo-samples-per-prompt", "4", "--grpo-max-new-tokens", "6", "--seed", "5",
            "--no-progress-bar", "--save", save, *extra]


def _train(argv: list[str]) -> dict:
    import sys

    # the user verifier's directory (the forked ranks do not read PYTHONPATH again)
    sys.path.insert(0, os.path.dirname(argv[argv.index("--data-path") + 1]))
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    losses, lines = [], []
    pretrain(parse_args(argv), log=lines.append,
             on_step=lambda state, result: losses.append(result["grpo loss"]))
    return {"losses": losses, "lines": lines}


def _serial_runs(world: dict) -> dict:
    from megatron_trillion.platform.distributed import destroy_distributed

    out = {}
    kl = ("--grpo-kl-coeff", "0.1", "--grpo-truncated-is-cap", "2")
    plan = [("base", _argv(world, 1, world["base"])),
            ("straight", _argv(world, STEPS, world["straight"], "--load", world["base"],
                               "--finetune", "--save-interval", "2", *kl))]
    for name, argv in plan:
        out[name] = _train(argv)
        destroy_distributed()
    # the checkpoint of step 2, resumed in a directory of its own (the straight run went on)
    shutil.copytree(world["straight"], world["resumed"])
    with open(os.path.join(world["resumed"], "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    shutil.rmtree(os.path.join(world["resumed"], f"iter_{STEPS:07d}"))
    out["resumed"] = _train(_argv(world, STEPS, world["resumed"], "--load", world["resumed"],
                                  *kl))
    destroy_distributed()
    out["inside a rollout"] = _inside_a_rollout(world)
    out["all dropped"] = _all_dropped(world)
    out["selection"] = _select_prompts(world)
    out["bad data"] = _bad_data(world)
    return out


def _inside_a_rollout(world: dict) -> dict:
    """--grpo-epochs 2: a straight run of two rollouts (4 steps); the same run stopped by a
    signal after epoch 1 of its first rollout (it saves there), then resumed."""
    import signal

    from megatron_trillion.platform.distributed import destroy_distributed
    from megatron_trillion.pretrain import pretrain
    from megatron_trillion.training.arguments import parse_args

    root = os.path.dirname(world["base"])
    epochs = ("--grpo-epochs", "2", "--grpo-kl-coeff", "0.1")
    straight = _train(_argv(world, 4, os.path.join(root, "epochs_straight"), "--load",
                            world["base"], "--finetune", *epochs))
    destroy_distributed()
    save = os.path.join(root, "epochs_stopped")
    stopped = []

    def on_step(state, result):
        stopped.append(result["grpo loss"])
        if state.iteration == 1:  # SLURM's pre-timeout signal
            os.kill(os.getpid(), signal.SIGUSR1)

    pretrain(parse_args(_argv(world, 4, save, "--load", world["base"], "--finetune",
                              "--exit-signal-handler", *epochs)), log=lambda line: None,
             on_step=on_step)
    destroy_distributed()
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        saved = int(f.read())
    resumed = _train(_argv(world, 4, save, "--load", save, *epochs))
    destroy_distributed()
    return {"straight": straight["losses"], "stopped": stopped, "saved": saved,
            "resumed": resumed["losses"], "lines": resumed["lines"]}


def _all_dropped(world: dict) -> dict:
    """One prompt per step: step 1's rewards differ, step 2's are all equal (its one group is
    dropped). The weights saved after each step, the steps' results and the log."""
    import torch

    from megatron_trillion.platform.distributed import (
        destroy_distributed,
        initialize_single_process,
    )
    from megatron_trillion.posttraining.rollout import prompt_order
    from megatron_trillion.training.checkpointing import load_model

    root = os.path.dirname(world["base"])
    lines = [None, None]
    seed = 5  # _argv's
    for step, truth in enumerate(("differ", "same")):
        lines[prompt_order(2, seed, step)] = json.dumps({
            "prompt": f"What is {step} plus 1?", "ground_truth": truth,
            "verifier": "toy_rewards:odd_length_unless_same"}) + "\n"
    data = os.path.join(root, "dropped_en.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(lines)
    save = os.path.join(root, "dropped")
    argv = _argv(world, 2, save, "--load", world["base"], "--finetune", "--save-interval", "1")
    argv[argv.index("--data-path") + 1:argv.index("--data-path") + 3] = [data]
    argv[argv.index("--global-batch-size") + 1] = "1"
    results, lines = [], []
    from megatron_trillion.pretrain import pretrain
    from megatron_trillion.training.arguments import parse_args

    pretrain(parse_args(argv), log=lines.append,
             on_step=lambda state, result: results.append(
                 {k: result[k] for k in ("skipped", "updated", "dropped groups")}))
    destroy_distributed()
    initialize_single_process()
    try:
        weights = [load_model(save, step, log=lambda line: None)[0].state_dict()
                   for step in (1, 2)]
    finally:
        destroy_distributed()
    differing = [name for name, tensor in weights[0].items()
                 if torch.is_tensor(tensor) and tensor.is_floating_point()
                 and not torch.equal(tensor, weights[1][name])]
    return {"results": results, "lines": lines, "differing": differing,
            "compared": sum(torch.is_tensor(t) and t.is_floating_point()
                            for t in weights[0].values())}


def _bad_data(world: dict) -> dict:
    """A prompt file with an unknown verifier on line 3: refused before any step or save."""
    from megatron_trillion.errors import UserError
    from megatron_trillion.platform.distributed import destroy_distributed

    root = os.path.dirname(world["base"])
    bad = os.path.join(root, "bad_en.jsonl")
    with open(world["en"], encoding="utf-8") as f:
        lines = f.readlines()
    lines[2] = lines[2].replace("toy_rewards:odd_length", "no_such_verifier")
    with open(bad, "w", encoding="utf-8") as f:
        f.writelines(lines)
    argv = _argv(world, 1, os.path.join(root, "bad_save"))
    argv[argv.index("--data-path") + 1:argv.index("--data-path") + 3] = [bad]
    try:
        _train(argv)
        message = None
    except UserError as exc:
        message = str(exc)
    finally:
        destroy_distributed()
    return {"message": message, "saved": os.path.exists(os.path.join(root, "bad_save"))}


def _select_prompts(world: dict) -> dict:
    import contextlib
    import io

    from megatron_trillion.cli.select_rlvr_prompts import main

    stdout = io.StringIO()
    output = os.path.join(os.path.dirname(world["base"]), "selected.jsonl")
    with contextlib.redirect_stdout(stdout):
        status = main(["--load", world["base"], "--data-path", world["en"], world["ko"],
                       "--output", output, "--samples-per-prompt", "4", "--max-new-tokens",
                       "6", "--min-pass-rate", "0.25", "--max-pass-rate", "0.75"])
    with open(output, encoding="utf-8") as f:
        kept = [json.loads(line) for line in f]
    return {"status": status, "stdout": stdout.getvalue(), "kept": kept}


def _parallel(world: dict, name: str, layout: tuple) -> dict:
    return _train(_argv(world, PARALLEL_STEPS, os.path.join(world["parallel"], name), "--load",
                        world["base"], "--finetune", "--grpo-kl-coeff", "0.1",
                        "--grpo-truncated-is-cap", "2", *layout))


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    from megatron_trillion.data.sample_corpus import write_sample_corpus
    from megatron_trillion.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    root = tmp_path_factory.mktemp("grpo")
    tokenizer = str(root / "tok")
    train_tokenizer(TokenizerTrainingConfig(
        inputs=(str(write_sample_corpus(root / "corpus.jsonl", docs_per_lang=30)),),
        output_dir=tokenizer, vocab_size=600, heldout_docs=0, tensor_model_parallel_size=2))
    (root / "toy_rewards.py").write_text(REWARDS)
    files = {}
    for lang, text in (("en", "What is {a} plus {b}?"), ("ko", "{a} 더하기 {b}는?")):
        path = root / f"rl_{lang}.jsonl"
        path.write_text("".join(json.dumps({"prompt": text.format(a=a, b=a + 1),
                                            "ground_truth": str(2 * a + 1),
                                            "verifier": "toy_rewards:odd_length"},
                                           ensure_ascii=False) + "\n" for a in range(4)))
        files[lang] = str(path)
    world = {"tokenizer": tokenizer, **files, **{k: str(root / k) for k in (
        "base", "straight", "resumed", "parallel")}}
    (serial,) = run_distributed(_serial_runs, 1, timeout=600, world=world)
    tp2 = run_distributed(_parallel, 2, timeout=600, world=world, name="tp2",
                          layout=("--tensor-model-parallel-size", "2"))
    dp2 = run_distributed(_parallel, 2, timeout=600, world=world, name="dp2",
                          layout=("--use-distributed-optimizer",))
    print(f"GRPO figures: straight losses {serial['straight']['losses']}, resumed "
          f"{serial['resumed']['losses']}, TP2 {tp2[0]['losses']}, DP2 {dp2[0]['losses']}")
    return {"serial": serial, "tp2": tp2, "dp2": dp2}


@pytest.mark.slow
def test_tp2_and_dp2_give_the_losses_of_one_process_on_the_same_rollouts(grpo_runs):
    serial = grpo_runs["serial"]["straight"]["losses"][:PARALLEL_STEPS]
    assert all(np.isfinite(serial)), serial  # the groups were not all dropped
    for layout in ("tp2", "dp2"):
        for rank in grpo_runs[layout]:
            np.testing.assert_allclose(rank["losses"], serial, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_run_continues_exactly_with_its_reference_reloaded(grpo_runs):
    straight = grpo_runs["serial"]["straight"]
    resumed = grpo_runs["serial"]["resumed"]
    assert len(resumed["losses"]) == 1
    np.testing.assert_allclose(resumed["losses"], straight["losses"][2:], rtol=0, atol=1e-6)
    for run in (straight, resumed):
        assert any("GRPO reference policy: " in line and "base" in line
                   for line in run["lines"]), run["lines"]


@pytest.mark.slow
def test_a_run_stopped_between_the_epochs_of_a_rollout_resumes_exactly(grpo_runs):
    run = grpo_runs["serial"]["inside a rollout"]
    assert run["saved"] == 1 and len(run["stopped"]) == 1 and len(run["resumed"]) == 3, run
    assert all(np.isfinite(run["straight"])), run["straight"]
    np.testing.assert_allclose(run["stopped"] + run["resumed"], run["straight"], rtol=0,
                               atol=1e-6)
    assert any("resuming after epoch 1 of 2 of a rollout" in line for line in run["lines"])


@pytest.mark.slow
def test_the_log_line_reports_rewards_drift_and_the_time_split(grpo_runs):
    lines = [line for line in grpo_runs["serial"]["straight"]["lines"]
             if line.startswith(" iteration")]
    assert len(lines) == STEPS
    for field in ("grpo loss", "kl", "clip fraction", "entropy", "reward [verifier "
                  "toy_rewards:odd_length]", "reward [language en]", "reward [language ko]",
                  "dropped groups", "response length max", "responses cut", "drift mean",
                  "drift max", "time/generation s", "time/scoring s"):
        assert f"| {field}: " in lines[-1], (field, lines[-1])


@pytest.mark.slow
def test_a_step_whose_groups_are_all_dropped_leaves_the_weights_as_they_were(grpo_runs):
    dropped = grpo_runs["serial"]["all dropped"]
    first, second = dropped["results"]
    assert not first["skipped"] and first["updated"] and first["dropped groups"] == 0, first
    assert second["skipped"] and not second["updated"] and second["dropped groups"] == 1, second
    # Adam's momentum from step 1 would move every weight at step 2 if it stepped
    assert dropped["compared"] > 0 and dropped["differing"] == [], dropped["differing"]
    log = [line for line in dropped["lines"] if line.startswith(" iteration")]
    assert "number of skipped iterations:   1 | number of nan iterations:   0" in log[-1], log
    assert "| dropped groups: 1" in log[-1], log
    assert any(line.startswith(" skipped iteration 2: no loss tokens") for line in
               dropped["lines"]), dropped["lines"]


@pytest.mark.slow
def test_prompt_selection_keeps_the_band_and_prints_the_histogram(grpo_runs):
    selection = grpo_runs["serial"]["selection"]
    assert selection["status"] == 0
    lines = selection["stdout"].splitlines()
    rows = [line for line in lines if line.startswith("  [")]
    assert len(rows) == 10 and sum(int(row.split()[2]) for row in rows) == 8, lines
    counts = [int(row.split()[2]) for row in rows]
    rates = [record["pass_rate"] for record in selection["kept"]]
    assert all(0.25 <= rate <= 0.75 for rate in rates)
    # 4 samples: pass rates 0, .25, .5, .75, 1 fall in bins 0, 2, 5, 7, 9; the band keeps 2, 5, 7
    assert len(rates) == counts[2] + counts[5] + counts[7]
    assert counts[0] + counts[9] + len(rates) == 8
    assert f"kept {len(rates)} of 8 prompts" in selection["stdout"]


@pytest.mark.slow
def test_a_bad_prompt_line_stops_the_run_before_it_trains_or_saves(grpo_runs):
    bad = grpo_runs["serial"]["bad data"]
    assert bad["message"] is not None and "bad_en.jsonl:3: unknown verifier " \
        "'no_such_verifier'" in bad["message"], bad
    assert not bad["saved"]
