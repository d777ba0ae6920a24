"""Choosing RLVR prompts of the right difficulty: sample N answers per prompt from a checkpoint,
score them with the prompts' verifiers, keep the prompts whose pass rate lies in a band.

A prompt every sample solves, or none does, gives GRPO a group of equal rewards: no signal, a
dropped group. The pass rate of a prompt is its mean reward over the N samples (for 0/1
verifiers, the share of samples that pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_trillion.posttraining.rlvr_data import RLVRPrompt
from megatron_trillion.posttraining.rollout import RolloutConfig, sample_and_score, sampler_seed

HISTOGRAM_BINS = 10


@dataclass
class Selection:
    pass_rates: list[float]  # per prompt, in input order
    kept: list[int]  # indices of prompts with low <= pass rate <= high

    def histogram(self, bins: int = HISTOGRAM_BINS) -> list[int]:
        """Prompts per pass-rate bin [k/bins, (k+1)/bins) (the last bin includes 1.0)."""
        counts = [0] * bins
        for rate in self.pass_rates:
            counts[min(int(rate * bins), bins - 1)] += 1
        return counts

    def histogram_lines(self, bins: int = HISTOGRAM_BINS, width: int = 40) -> list[str]:
        counts = self.histogram(bins)
        peak = max(counts) or 1
        lines = []
        for k, count in enumerate(counts):
            close = "]" if k == bins - 1 else ")"
            lines.append(f"  [{k / bins:.1f}, {(k + 1) / bins:.1f}{close} {count:6d} "
                         + "#" * round(width * count / peak))
        return lines


def measure_pass_rates(engine, prompts: Sequence[RLVRPrompt], prompt_ids: Sequence[list[int]],
                       config: RolloutConfig, score: Callable[[RLVRPrompt, str], float],
                       low: float, high: float, chunk: int = 64,
                       progress: Callable[[int], None] = lambda done: None) -> Selection:
    """Pass rates of ``prompts`` from ``config.samples_per_prompt`` samples each (``chunk``
    prompts between progress reports; each prompt seeded by ``config.seed`` and its index: the
    same flags sample the same answers). ``low <= pass rate <= high`` is kept."""
    rates: list[float] = []
    for start in range(0, len(prompts), chunk):
        part = slice(start, start + chunk)
        seeds = [sampler_seed(config.seed, i)
                 for i in range(start, min(start + chunk, len(prompts)))]
        rollout = sample_and_score(engine, prompts[part], prompt_ids[part], config, seeds, score)
        rates.extend(rollout.rewards.mean(dim=1).tolist())
        progress(len(rates))
    kept = [i for i, rate in enumerate(rates) if low <= rate <= high]
    return Selection(rates, kept)
