"""GRPO (Group Relative Policy Optimization) for RLVR: the arithmetic of one step.

A step samples G responses for each of B prompts, scores them with the verifiers and trains on
them. This module holds what happens between the scores and the optimizer:

* **advantages** (``group_advantages``): each response's reward minus its group's mean
  (optionally divided by the group's standard deviation). A group whose rewards are all equal
  teaches nothing about which answer is better; it is dropped (and counted), so it costs no
  compute and adds no gradient, not even through the KL term.
* **the per-token loss** (``token_losses``): the clipped importance ratio of PPO with separate
  low and high clip bounds (``1 - clip_low <= ratio <= 1 + clip_high``; a higher upper bound lets
  unlikely tokens gain probability faster), a k3 KL penalty against the reference policy
  (``exp(ref - logp) - (ref - logp) - 1``: non-negative, 0 exactly where the policies agree), and
  optionally the truncated importance-sampling weight ``min(exp(old - sampler), cap)`` that
  corrects for the sampler's log-probabilities differing from the trainer's (bf16 kernels, a
  different attention implementation) without letting one token's weight explode.
* **token-level normalisation** (``reduce_token_losses``): the loss is summed over response
  tokens and returned with the token count, so megatron-core divides by the count of the whole
  global batch (``calculate_per_token_loss``): every token weighs the same, a long answer is not
  favoured over a short one and no micro-batch or DP split changes the result.

The old log-probabilities (``old``) are the trainer's own, recomputed on the rollout batch
before the first update; on the first epoch they are the current log-probabilities detached, so
the ratio is exactly 1 there. All log-probabilities are of the plain policy (temperature 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# Rewards closer than this count as equal (a verifier's 1.0 and 1.0 - 1e-9 are the same answer).
EQUAL_REWARD_TOLERANCE = 1e-6


@dataclass(frozen=True)
class GRPOLossConfig:
    """The loss's knobs (``--grpo-clip-low``, ``--grpo-clip-high``, ``--grpo-kl-coeff``,
    ``--grpo-truncated-is-cap``)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coeff: float = 0.0  # 0: no reference policy is needed
    truncated_is_cap: Optional[float] = None  # None: no sampler-drift correction

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.clip_low < 1:
            out.append(f"--grpo-clip-low must lie in (0, 1), got {self.clip_low}")
        if not self.clip_high > 0:
            out.append(f"--grpo-clip-high must be > 0, got {self.clip_high}")
        if self.kl_coeff < 0:
            out.append(f"--grpo-kl-coeff must be >= 0, got {self.kl_coeff}")
        if self.truncated_is_cap is not None and not self.truncated_is_cap >= 1:
            out.append("--grpo-truncated-is-cap must be >= 1 (a cap below 1 would shrink "
                       f"every on-policy token), got {self.truncated_is_cap}")
        return out


# --------------------------------------------------------------------------------------------
# advantages


@dataclass
class GroupAdvantages:
    """Per-response advantages of the groups that are kept."""

    advantages: torch.Tensor  # [groups, G]; rows of dropped groups are 0
    kept: torch.Tensor  # [groups] bool: the group's rewards differ
    dropped: int  # groups whose rewards are all equal

    def kept_groups(self) -> list[int]:
        return [int(g) for g in torch.nonzero(self.kept).reshape(-1)]


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = False,
                     eps: float = 1e-6) -> GroupAdvantages:
    """``rewards[g, i]``: response ``i`` of prompt ``g`` -> reward minus the group's mean
    (``scale_by_std``: divided by the group's standard deviation + ``eps``, as in the GRPO
    paper; without it, as in Dr. GRPO, a group of nearly equal rewards is not blown up).
    Groups whose rewards are all equal (within ``EQUAL_REWARD_TOLERANCE``) are dropped."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, samples >= 2], got {tuple(rewards.shape)}")
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    kept = spread > EQUAL_REWARD_TOLERANCE
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    advantages = torch.where(kept.unsqueeze(1), advantages, torch.zeros_like(advantages))
    return GroupAdvantages(advantages=advantages.float(), kept=kept,
                           dropped=int((~kept).sum()))


# --------------------------------------------------------------------------------------------
# the per-token loss


@dataclass
class TokenTerms:
    """Per-token pieces of the loss (all ``[N]``; ``loss`` carries the gradient)."""

    loss: torch.Tensor  # policy term (times the IS weight) + kl_coeff * kl
    policy: torch.Tensor  # -min(ratio * A, clip(ratio) * A), detached
    kl: torch.Tensor  # k3 estimate (0 where there is no reference), detached
    ratio: torch.Tensor  # exp(logp - old), detached
    clipped: torch.Tensor  # bool: the clip bound, not the ratio, set this token's term
    is_weight: torch.Tensor  # truncated importance weight (1 without the correction)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per sampled token:
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased, 0 with equal log-probabilities)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """``min(pi_trainer / pi_sampler, cap)`` per token: the correction for sampling with
    log-probabilities that differ from the trainer's (no gradient flows through it)."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


def token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 config: GRPOLossConfig, ref_logprobs: Optional[torch.Tensor] = None,
                 sampler_logprobs: Optional[torch.Tensor] = None) -> TokenTerms:
    """The GRPO loss of each sampled token. ``logprobs`` carry the gradient; the others are
    data: ``old_logprobs`` the trainer's before this rollout batch's first update,
    ``advantages`` the token's response's advantage, ``ref_logprobs`` the reference policy's
    (needed when ``config.kl_coeff > 0``), ``sampler_logprobs`` the generation engine's (needed
    with ``config.truncated_is_cap``)."""
    old_logprobs = old_logprobs.detach()
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped_ratio = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    policy = -torch.minimum(unclipped, clipped_ratio * advantages)
    # Where the clipped term is the smaller one and differs, the token gets no gradient.
    clipped = ((advantages > 0) & (ratio > 1.0 + config.clip_high)) | (
        (advantages < 0) & (ratio < 1.0 - config.clip_low))
    if config.truncated_is_cap is not None:
        if sampler_logprobs is None:
            raise ValueError("the truncated importance-sampling correction needs the sampler's "
                             "log-probabilities")
        is_weight = truncated_is_weights(old_logprobs, sampler_logprobs,
                                         config.truncated_is_cap)
    else:
        is_weight = torch.ones_like(policy)
    loss = policy * is_weight
    if config.kl_coeff > 0:
        if ref_logprobs is None:
            raise ValueError("--grpo-kl-coeff > 0 needs the reference policy's log-probabilities")
        kl = k3_kl(logprobs, ref_logprobs.detach())
        loss = loss + config.kl_coeff * kl
    else:
        kl = torch.zeros_like(policy)
    return TokenTerms(loss=loss, policy=policy.detach(), kl=kl.detach(), ratio=ratio.detach(),
                      clipped=clipped, is_weight=is_weight)


# Log fields of the loss: summed over tokens (and over micro-batches and DP ranks), then divided
# by the token count when logged.
TOKEN_SUM_FIELDS = ("policy loss", "kl", "clip fraction", "entropy", "ratio", "is weight")


def reduce_token_losses(terms: TokenTerms, logprobs: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss sum, token count, {field: [sum, count]}) over the tokens where ``mask`` is 1: the
    forward-step contract of megatron-core with ``calculate_per_token_loss``, which divides by
    the token count of the global batch. ``entropy`` is the mean of ``-logp`` over the sampled
    tokens: with samples drawn from the policy at temperature 1 that is an unbiased estimate of
    its per-token entropy, and it needs no full-vocabulary logits (at any TP)."""
    mask = mask.float().reshape(-1)
    count = mask.sum()
    loss_sum = torch.sum(terms.loss.reshape(-1) * mask)
    values = {
        "policy loss": terms.policy,
        "kl": terms.kl,
        "clip fraction": terms.clipped.float(),
        "entropy": -logprobs.detach(),
        "ratio": terms.ratio,
        "is weight": terms.is_weight,
    }
    report = {name: torch.stack([torch.sum(values[name].reshape(-1).float() * mask), count])
              for name in TOKEN_SUM_FIELDS}
    return loss_sum, count.to(torch.int), report


# --------------------------------------------------------------------------------------------
# sampler-vs-trainer drift


def logprob_drift(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """[sum of |difference|, max |difference|, tokens] between the generation engine's and the
    trainer's log-probabilities of the sampled tokens (the sum and count add up over
    micro-batches and ranks; the max takes a max)."""
    mask = mask.float().reshape(-1)
    diff = (sampler_logprobs.reshape(-1).float() - trainer_logprobs.reshape(-1).float().detach()
            ).abs() * mask
    peak = diff.max() if diff.numel() else diff.new_zeros(())
    return torch.stack([diff.sum(), peak, mask.sum()])


# --------------------------------------------------------------------------------------------
# rollouts -> training sequences


@dataclass
class TrainingSequence:
    """One response as a training sequence: ``tokens = prompt + response[:-1]``, labels the
    next tokens; the per-label arrays cover only the response (``len(response)`` labels at the
    end of the sequence)."""

    prompt: list[int]
    response: list[int]
    advantage: float
    sampler_logprobs: list[float]
    group: int  # the prompt's index in the rollout batch

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response) - 1


def training_sequences(prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]],
                       sampler_logprobs: Sequence[Sequence[list[float]]],
                       advantages: GroupAdvantages) -> list[TrainingSequence]:
    """The responses of the kept groups, in rollout order (prompt, then sample), each with its
    advantage. Empty responses (a stop right away is still one token) cannot occur."""
    out = []
    for g in advantages.kept_groups():
        for i, response in enumerate(responses[g]):
            if not response:
                raise ValueError(f"prompt {g} sample {i}: an empty response")
            if len(sampler_logprobs[g][i]) != len(response):
                raise ValueError(f"prompt {g} sample {i}: {len(sampler_logprobs[g][i])} "
                                 f"log-probabilities for {len(response)} tokens")
            out.append(TrainingSequence(list(prompts[g]), list(response),
                                        float(advantages.advantages[g, i]),
                                        list(sampler_logprobs[g][i]), g))
    return out


def pack_in_order(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sequences into rows of at most ``capacity`` tokens, in order (a new row when the next
    does not fit), so a rollout batch packs the same way at any parallel layout."""
    rows: list[list[int]] = []
    used = capacity
    for i, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"sequence {i} has {length} tokens, more than a row's {capacity}")
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


def collate_sequences(sequences: Sequence[TrainingSequence], capacity: int,
                      pad_token: int) -> dict:
    """One micro-batch: the sequences packed into a row of ``capacity`` tokens (THD layout,
    one attention block per sequence, the padding tail a block of its own), with per-token
    ``loss_mask`` (1 on response labels), ``advantages`` and ``sampler_logprobs``."""
    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks

    tokens = torch.full((capacity,), pad_token, dtype=torch.long)
    labels = torch.full((capacity,), pad_token, dtype=torch.long)
    position_ids = torch.zeros(capacity, dtype=torch.long)
    loss_mask = torch.zeros(capacity)
    advantages = torch.zeros(capacity)
    sampler = torch.zeros(capacity)
    bounds = [0]
    at = 0
    for seq in sequences:
        full = seq.prompt + seq.response
        n = len(full) - 1
        if at + n > capacity:
            raise ValueError(f"the sequences need more than {capacity} tokens")
        tokens[at:at + n] = torch.tensor(full[:-1])
        labels[at:at + n] = torch.tensor(full[1:])
        position_ids[at:at + n] = torch.arange(n)
        first = at + len(seq.prompt) - 1  # the position whose label is the first response token
        loss_mask[first:at + n] = 1.0
        advantages[first:at + n] = seq.advantage
        sampler[first:at + n] = torch.tensor(seq.sampler_logprobs)
        at += n
        bounds.append(at)
    if at < capacity:
        bounds.append(capacity)
        position_ids[at:] = torch.arange(capacity - at)
    return {
        "tokens": tokens.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "loss_mask": loss_mask.unsqueeze(0),
        "advantages": advantages.unsqueeze(0),
        "sampler_logprobs": sampler.unsqueeze(0),
        "packed_seq_params": packed_seq_params_from_blocks(torch.tensor(bounds)),
    }
