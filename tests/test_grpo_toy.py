"""GRPO learns a toy verifiable task through the real entry point (slow):
``bench/bench_grpo_toy_addition.py`` at its defaults, in one process.

One-digit addition ("What is A + B?", 100 pairs). ``pretrain --sft`` on demonstrations that are
right 2 times in 5 ("The answer is A+B.") and otherwise make one systematic mistake ("The sum is
A+B+1."), so the start policy is partially right on purpose, as real RLVR starts from imperfect
demonstrations; then ``pretrain --grpo --load sft --finetune`` (30 steps of 8 prompts x 8
samples, the gsm8k verifier) on 80 of the pairs. Held out: the other 20 pairs (a seeded
shuffle), never GRPO prompts; SFT saw them with the same 2-in-5 mix. The figure is their
exact-match reward with greedy decoding.

Seen (three runs, the same figures; CPU fp32): greedy 0.30 after SFT (most greedy answers take
the likelier, wrong "The sum is A+B+1."), 0.70 after 30 GRPO steps; sampled (8 answers per
pair, temperature 1) 0.369 -> 0.619; 23 of the 240 groups dropped. The bench at --seed 4 and 5
(another SFT order) gave 0.15 -> 0.75 and 0.15 -> 0.80. The asserted bounds leave 3 of the 20
pairs of margin on each side of this run's figures.
"""

from __future__ import annotations

import os
import sys

import pytest

from multiprocess import run_distributed

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _toy(root: str) -> dict:
    sys.path.insert(0, BENCH)
    from bench_grpo_toy_addition import run

    out = run(root, log=lambda line: None)
    return {key: out[key] for key in ("before", "after", "rewards", "dropped", "groups",
                                      "train pairs", "held-out pairs", "wall", "cpu")}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    (out,) = run_distributed(_toy, 1, timeout=900,
                             root=str(tmp_path_factory.mktemp("grpo_toy")))
    before, after = out["before"], out["after"]
    print(f"GRPO toy figures: held-out greedy {before['greedy']:.3f} -> {after['greedy']:.3f}, "
          f"sampled {before['sampled']:.3f} -> {after['sampled']:.3f}; {out['dropped']} of "
          f"{out['groups']} groups dropped; CPU s {out['cpu']}")
    return out


@pytest.mark.slow
def test_grpo_raises_the_held_out_exact_match_reward(toy):
    before, after = toy["before"], toy["after"]
    assert not set(toy["held-out pairs"]) & set(toy["train pairs"])
    assert len(toy["held-out pairs"]) == 20 and len(toy["train pairs"]) == 80
    # the start is partially right: sampled answers are right now and then, greedy ones seldom
    assert 0.2 <= before["sampled"] <= 0.6, before
    assert before["greedy"] <= 0.45, before
    assert after["greedy"] >= 0.55, (before, after)
    assert after["greedy"] - before["greedy"] >= 0.25, (before, after)
    assert after["sampled"] - before["sampled"] >= 0.1, (before, after)
    # few groups had nothing to learn (all 8 answers right or all wrong)
    assert toy["dropped"] <= toy["groups"] // 4, toy["dropped"]
