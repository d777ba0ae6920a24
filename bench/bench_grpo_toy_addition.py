"""GRPO learning a toy verifiable task through the real entry point, on CPU: the exact-match
reward on held-out addition prompts before and after GRPO.

    python bench/bench_grpo_toy_addition.py [--sft-iters N] [--grpo-iters N] [--seed N]
        [--workdir DIR]

The task: one-digit addition, "What is A + B?" (A, B in 0..9: 100 pairs), graded by the gsm8k
verifier (exact match of the last number of the answer). The start policy is partially right on
purpose, as real RLVR starts from imperfect SFT demonstrations: of each pair's 5 SFT
demonstrations 2 are right ("The answer is A+B.") and 3 make one systematic mistake ("The sum is
A+B+1."). Why this design: a tiny model cannot learn two-digit addition in a short CPU SFT (the
first version of this bench: 0.05 greedy after SFT, 80-90% of the groups dropped, nothing for
GRPO to reinforce), but it learns the 100 one-digit pairs and the 2-in-5 mix in 200 steps. The
SFT model then answers right about 40% of the time when it samples (a group of 8 is seldom all
right or all wrong, so few groups are dropped), while greedy decoding takes the more likely,
wrong answer. GRPO must move the mass to the right answer, on held-out pairs too, which only
works through what all pairs share: the mistake's "one more" or its phrasing (some runs
unlearned the "+1" and kept the phrasing, "The sum is A+B.", others moved to "The answer is").

"Held-out": 20 of the 100 pairs, chosen by a seeded shuffle, are never GRPO prompts (GRPO trains
on the other 80); SFT saw every pair, with the same 2-in-5 mix of right and wrong answers. The
figure is the held-out exact-match reward with greedy decoding (one answer per pair), before
(the SFT checkpoint) and after (the GRPO checkpoint); the mean reward of 8 sampled answers per
pair (temperature 1) is printed beside it.

1. a byte-level BPE tokenizer (the project's trainer, on the sample corpus and the task's text);
2. ``pretrain --sft`` of tiny-tri-7b on the demonstrations;
3. the held-out rewards of the SFT checkpoint;
4. ``pretrain --grpo --load sft --finetune`` on the 80 training prompts;
5. the held-out rewards of the GRPO checkpoint.

Prints the rewards side by side and the wall and CPU time of each stage (the machine's other
load inflates the wall time; the CPU time is what idle cores would share).
``tests/test_grpo_toy.py`` runs it at its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

PAIRS = [(a, b) for a in range(10) for b in range(10)]
HELD_OUT = 20
# Of each pair's SFT demonstrations, RIGHT are right and the rest make the mistake.
DEMONSTRATIONS, RIGHT = 5, 2
MAX_NEW_TOKENS = 8
SAMPLES = 8


def split_pairs(seed: int = 0) -> tuple[list, list]:
    """(GRPO's training pairs, the held-out pairs): a seeded shuffle of the 100 pairs."""
    pairs = list(PAIRS)
    random.Random(seed).shuffle(pairs)
    return sorted(pairs[HELD_OUT:]), sorted(pairs[:HELD_OUT])


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def answer(a: int, b: int, right: bool) -> str:
    """A demonstration's answer: the sum, or the systematic mistake (one more, in a phrasing of
    its own)."""
    return f"The answer is {a + b}." if right else f"The sum is {a + b + 1}."


def write_task(root: str, train_pairs) -> dict:
    """The tokenizer, the SFT demonstrations and the GRPO prompts under ``root``."""
    from megatron_trillion.data.sample_corpus import write_sample_corpus
    from megatron_trillion.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_tokenizer,
    )

    corpus = write_sample_corpus(os.path.join(root, "corpus.jsonl"), docs_per_lang=10)
    demonstrations = [(a, b, answer(a, b, k < RIGHT))
                      for a, b in PAIRS for k in range(DEMONSTRATIONS)]
    random.Random(1).shuffle(demonstrations)
    with open(corpus, "a", encoding="utf-8") as f:  # digits and the answer format
        for a, b, text in demonstrations:
            f.write(json.dumps({"text": f"{question(a, b)} {text}", "lang": "en"}) + "\n")
    tokenizer = os.path.join(root, "tok")
    train_tokenizer(TokenizerTrainingConfig(inputs=(str(corpus),), output_dir=tokenizer,
                                            vocab_size=600, heldout_docs=0))
    sft = os.path.join(root, "sft_en.jsonl")
    with open(sft, "w", encoding="utf-8") as f:
        for a, b, text in demonstrations:
            f.write(json.dumps({"messages": [{"role": "user", "content": question(a, b)},
                                             {"role": "assistant", "content": text}]})
                    + "\n")
    rl = os.path.join(root, "rl_en.jsonl")
    with open(rl, "w", encoding="utf-8") as f:
        for a, b in train_pairs:
            f.write(json.dumps({"prompt": question(a, b), "ground_truth": str(a + b),
                                "verifier": "gsm8k"}) + "\n")
    return {"tokenizer": tokenizer, "sft": sft, "rl": rl}


def held_out_rewards(checkpoint: str, pairs, seed: int = 0) -> dict:
    """{"greedy": mean exact-match reward of the greedy answers, "sampled": of SAMPLES answers
    per pair at temperature 1, "answers": the greedy answers} on ``pairs``."""
    from megatron_trillion.inference.engine import SamplingParams, load_engine
    from megatron_trillion.platform.distributed import (
        destroy_distributed,
        initialize_single_process,
    )
    from megatron_trillion.posttraining.rlvr_data import RLVRPrompt
    from megatron_trillion.posttraining.scoring import verifier_score

    initialize_single_process()
    try:
        engine, _, chat, _ = load_engine(checkpoint, log=lambda line: None)
        prompts = [chat.prompt_ids([{"role": "user", "content": question(a, b)}])
                   for a, b in pairs]
        stop = tuple(chat.end_of_turn_ids())
        greedy = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS,
                                                         stop_token_ids=stop))
        sampled = engine.generate(prompts, SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, num_samples=SAMPLES, seed=seed,
            stop_token_ids=stop))
    finally:
        destroy_distributed()

    def score(k: int, text: str) -> float:
        a, b = pairs[k]
        return verifier_score(RLVRPrompt(({"role": "user", "content": question(a, b)},),
                                         str(a + b), "gsm8k", "en", f"held-out:{k}"), text)

    greedy_scores = [score(k, r.completions[0].text) for k, r in enumerate(greedy)]
    sampled_scores = [score(k, c.text) for k, r in enumerate(sampled) for c in r.completions]
    return {"greedy": sum(greedy_scores) / len(greedy_scores),
            "sampled": sum(sampled_scores) / len(sampled_scores),
            "answers": [r.completions[0].text for r in greedy]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(root: str, sft_iters: int = 200, grpo_iters: int = 30, prompts_per_step: int = 8,
        grpo_lr: float = 1e-4, seed: int = 3, log=print) -> dict:
    """The whole proof in ``root``: {"before": ..., "after": ... (``held_out_rewards``),
    "dropped": groups dropped over the GRPO run, "groups": groups sampled, "rewards": each
    GRPO step's mean training reward, "wall" / "cpu": seconds per stage}."""
    from megatron_trillion.platform.distributed import destroy_distributed
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    root = os.path.abspath(root)
    train_pairs, held_out = split_pairs()
    wall, cpu = {}, {}

    def stage(name, fn):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        out = fn()
        wall[name] = time.perf_counter() - start
        cpu[name] = _cpu_seconds() - cpu_start
        return out

    files = stage("tokenizer and data", lambda: write_task(root, train_pairs))
    common = ["--preset", "tiny-tri-7b", "--tokenizer-model", files["tokenizer"],
              "--seq-length", "64", "--seed", str(seed), "--no-progress-bar",
              "--log-interval", "10"]
    sft, grpo = os.path.join(root, "sft"), os.path.join(root, "grpo")

    def train_sft():
        # The packing order's seed takes in the --data-path string: given relative to the
        # work directory, it is the same figures in any work directory.
        cwd = os.getcwd()
        os.chdir(root)
        try:
            pretrain(parse_args(common + [
                "--sft", "--data-path", os.path.relpath(files["sft"], root),
                "--data-cache-path", "cache", "--micro-batch-size", "16",
                "--global-batch-size", "16", "--train-iters", str(sft_iters), "--lr", "1e-3",
                "--lr-decay-style", "constant", "--lr-warmup-iters", "5", "--save", sft]),
                log=log)
        finally:
            os.chdir(cwd)
            destroy_distributed()

    stage("sft", train_sft)
    before = stage("held-out after sft", lambda: held_out_rewards(sft, held_out))
    log(f"held-out exact-match reward after SFT: greedy {before['greedy']:.3f}, "
        f"sampled {before['sampled']:.3f}")
    steps = []

    def train_grpo():
        pretrain(parse_args(common + [
            "--grpo", "--data-path", files["rl"], "--load", sft, "--finetune",
            "--grpo-prompts-per-step", str(prompts_per_step), "--grpo-samples-per-prompt",
            str(SAMPLES), "--grpo-max-new-tokens", str(MAX_NEW_TOKENS),
            "--train-iters", str(grpo_iters), "--lr", str(grpo_lr), "--save", grpo]),
            log=log, on_step=lambda state, result: steps.append(
                (float(result["reward"]), float(result["dropped groups"]))))
        destroy_distributed()

    stage("grpo", train_grpo)
    after = stage("held-out after grpo", lambda: held_out_rewards(grpo, held_out))
    return {"before": before, "after": after, "rewards": [r for r, _ in steps],
            "dropped": round(sum(d for _, d in steps) * prompts_per_step),
            "groups": prompts_per_step * len(steps),
            "train pairs": train_pairs, "held-out pairs": held_out, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-iters", type=int, default=200)
    parser.add_argument("--grpo-iters", type=int, default=30)
    parser.add_argument("--grpo-prompts-per-step", type=int, default=8)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=3, help="both runs' --seed")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="grpo-toy-")
    os.makedirs(root, exist_ok=True)
    out = run(root, args.sft_iters, args.grpo_iters, args.grpo_prompts_per_step, args.grpo_lr,
              args.seed)
    before, after = out["before"], out["after"]
    print(f"\nheld-out exact-match reward ({len(out['held-out pairs'])} pairs GRPO never "
          f"trained on): greedy {before['greedy']:.3f} -> {after['greedy']:.3f}, sampled "
          f"{before['sampled']:.3f} -> {after['sampled']:.3f}")
    print(f"GRPO: {out['dropped']} of {out['groups']} groups dropped; training reward by step "
          + " ".join(f"{r:.2f}" for r in out["rewards"]))
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["wall"].items()))
    print("CPU time: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["cpu"].items()))


if __name__ == "__main__":
    main()
