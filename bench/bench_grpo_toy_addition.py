"""GRPO learning a toy verifiable task through the real entry point, on CPU: exact-match reward on
held-out addition prompts before and after GRPO.

    python bench/bench_grpo_toy_addition.py [--sft-iters 150] [--grpo-iters 50] [--workdir DIR]

1. a byte-level BPE tokenizer (the project's trainer, on the sample corpus and the prompts);
2. SFT of tiny-tri-7b on one- and two-digit additions, "What is A + B?" -> "The answer is N.";
3. the held-out reward (greedy, the gsm8k verifier: the last number of the answer) of the SFT
   checkpoint;
4. ``pretrain --grpo --load sft --finetune`` on the training prompts, same verifier;
5. the held-out reward of the GRPO checkpoint.

Prints both rewards side by side and the wall and CPU time of each stage (the machine's other
load inflates the wall time; the CPU time is what 2 idle cores would share). Not a test: it
takes minutes.
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


def _pairs(seed: int, n: int, exclude=frozenset()):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = rng.randrange(60), rng.randrange(40)
        if (a, b) not in exclude and (a, b) not in out:
            out.append((a, b))
    return out


def _question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def _held_out_reward(checkpoint: str, pairs) -> float:
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
        prompts = [chat.prompt_ids([{"role": "user", "content": _question(a, b)}])
                   for a, b in pairs]
        results = engine.generate(prompts, SamplingParams(
            max_new_tokens=12, stop_token_ids=tuple(chat.end_of_turn_ids())))
        scores = [verifier_score(RLVRPrompt(({"role": "user", "content": ""},), str(a + b),
                                            "gsm8k", "en", f"held-out:{k}"),
                                 r.completions[0].text)
                  for k, ((a, b), r) in enumerate(zip(pairs, results))]
        return sum(scores) / len(scores)
    finally:
        destroy_distributed()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-iters", type=int, default=150)
    parser.add_argument("--grpo-iters", type=int, default=50)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from megatron_trillion.data.sample_corpus import write_sample_corpus
    from megatron_trillion.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_tokenizer,
    )
    from megatron_trillion.platform.distributed import destroy_distributed
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    root = args.workdir or tempfile.mkdtemp(prefix="grpo-toy-")
    os.makedirs(root, exist_ok=True)
    held_out = _pairs(2, 64)
    train = _pairs(1, 600, exclude=frozenset(held_out))
    times, cpu = {}, {}
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    corpus = write_sample_corpus(os.path.join(root, "corpus.jsonl"), docs_per_lang=30)
    with open(corpus, "a", encoding="utf-8") as f:  # digits and the answer format
        for a, b in train[:200]:
            f.write(json.dumps({"text": f"{_question(a, b)} The answer is {a + b}.",
                                "lang": "en"}) + "\n")
    tokenizer = os.path.join(root, "tok")
    train_tokenizer(TokenizerTrainingConfig(inputs=(str(corpus),), output_dir=tokenizer,
                                            vocab_size=600, heldout_docs=0))
    with open(os.path.join(root, "sft_en.jsonl"), "w") as f:
        for a, b in train:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": _question(a, b)},
                {"role": "assistant", "content": f"The answer is {a + b}."}]}) + "\n")
    with open(os.path.join(root, "rl_en.jsonl"), "w") as f:
        for a, b in train:
            f.write(json.dumps({"prompt": _question(a, b), "ground_truth": str(a + b),
                                "verifier": "gsm8k"}) + "\n")
    times["tokenizer and data"] = time.perf_counter() - start
    cpu["tokenizer and data"] = _cpu_seconds() - cpu_start
    common = ["--preset", "tiny-tri-7b", "--tokenizer-model", tokenizer, "--seq-length", "64",
              "--seed", "3", "--no-progress-bar", "--log-interval", "10"]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    pretrain(parse_args(common + [
        "--sft", "--data-path", os.path.join(root, "sft_en.jsonl"),
        "--data-cache-path", os.path.join(root, "cache"), "--micro-batch-size", "4",
        "--global-batch-size", "16", "--train-iters", str(args.sft_iters), "--lr", "3e-3",
        "--lr-warmup-iters", "10", "--save", os.path.join(root, "sft")]), log=print)
    destroy_distributed()
    times["sft"] = time.perf_counter() - start
    cpu["sft"] = _cpu_seconds() - cpu_start
    before = _held_out_reward(os.path.join(root, "sft"), held_out)
    print(f"held-out exact-match reward after SFT: {before:.3f}", flush=True)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    pretrain(parse_args(common + [
        "--grpo", "--data-path", os.path.join(root, "rl_en.jsonl"),
        "--load", os.path.join(root, "sft"), "--finetune",
        "--grpo-prompts-per-step", "8", "--grpo-samples-per-prompt", "8",
        "--grpo-max-new-tokens", "12", "--train-iters", str(args.grpo_iters), "--lr", "3e-4",
        "--save", os.path.join(root, "grpo")]), log=print)
    destroy_distributed()
    times["grpo"] = time.perf_counter() - start
    cpu["grpo"] = _cpu_seconds() - cpu_start
    after = _held_out_reward(os.path.join(root, "grpo"), held_out)
    print(f"\nheld-out exact-match reward ({len(held_out)} prompts, greedy): "
          f"SFT {before:.3f} -> GRPO {after:.3f} (x{after / max(before, 1e-9):.2f})")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print("CPU time: " + ", ".join(f"{k} {v:.0f} s" for k, v in cpu.items()))


if __name__ == "__main__":
    main()
