"""Direct preference optimisation (``pretrain --dpo``): the loss, the packed pairs, the objective.

The loss of a pair reads four summed log-probabilities (policy and reference, chosen and
rejected) and the two response token counts (TRL's formulas, Tulu 3's ``dpo_norm``)::

    sigmoid: -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    norm:    the same with every log-probability divided by its response's token count
    ipo:     (((pc - rc) / nc - (pr - rr) / nr) - 1 / (2 beta)) ** 2

plus ``--dpo-sft-loss-weight`` times the chosen response's mean NLL. The rewards logged are
``beta`` times the policy-reference differences the loss uses (per token for norm and ipo).

A packed sample holds whole pairs: the chosen and the rejected conversation (each the prompt and
its response) are two attention blocks (``cu_seqlens``) so neither sees the other, and a pair is
never split between samples (nor, as samples are never split, between micro-batches or DP
ranks; under context parallelism each CP rank holds a share of every block and the response
sums are all-reduced over the CP group before the loss). ``response_ids`` tags every label
position with the response it belongs to (0: none, 2k+1: pair k's chosen, 2k+2: its rejected).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_trillion.data.packed_batch import collate_packed
from megatron_trillion.platform.device import to_device
from megatron_trillion.training.objective import Objective

DPO_LOSSES = ("sigmoid", "norm", "ipo")
DPO_LOSS = "dpo loss"
DPO_FIELDS = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
              "sft nll")


# --------------------------------------------------------------------------------------------
# the loss of given log-probabilities


def dpo_pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
                    loss_type: str = "norm", beta: float = 5.0,
                    sft_weight: float = 0.0) -> dict:
    """Per-pair losses and rewards from summed response log-probabilities.

    Returns ``{"loss", "chosen_rewards", "rejected_rewards", "sft_nll"}`` (each ``[pairs]``);
    ``loss`` includes ``sft_weight`` times ``sft_nll`` (the chosen response's mean NLL)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {DPO_LOSSES}")
    nc = chosen_tokens.to(policy_chosen.dtype).clamp(min=1)
    nr = rejected_tokens.to(policy_chosen.dtype).clamp(min=1)
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    if loss_type in ("norm", "ipo"):
        chosen, rejected = chosen / nc, rejected / nr
    delta = chosen - rejected
    if loss_type == "ipo":
        loss = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        loss = -torch.nn.functional.logsigmoid(beta * delta)
    sft_nll = -policy_chosen / nc
    if sft_weight:
        loss = loss + sft_weight * sft_nll
    return {"loss": loss, "chosen_rewards": beta * chosen.detach(),
            "rejected_rewards": beta * rejected.detach(), "sft_nll": sft_nll.detach()}


def dpo_metrics(report: Sequence[float]) -> dict:
    """Summed report [loss, pairs, tokens, accuracy, margin, chosen, rejected, sft nll] ->
    the logged means per pair."""
    pairs = report[1]
    mean = (lambda total: total / pairs) if pairs else (lambda total: float("nan"))
    return {DPO_LOSS: mean(report[0]),
            **{name: mean(value) for name, value in zip(DPO_FIELDS, report[3:])}}


# --------------------------------------------------------------------------------------------
# one micro-batch


def response_sums(token_logps: torch.Tensor, loss_mask: torch.Tensor,
                  response_ids: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    """(summed log-probabilities, token counts), each ``[num_pairs, 2]`` (chosen, rejected),
    of the responses tagged in ``response_ids`` (this rank's tokens only)."""
    ids = response_ids.reshape(-1).long()
    mask = loss_mask.reshape(-1).to(token_logps.dtype)
    sums = token_logps.new_zeros(2 * num_pairs + 1).index_add(
        0, ids, token_logps.reshape(-1) * mask)
    counts = mask.new_zeros(2 * num_pairs + 1).index_add(0, ids, mask)
    return sums[1:].reshape(num_pairs, 2), counts[1:].reshape(num_pairs, 2)


def dpo_loss_func(batch: dict, loss_type: str, beta: float, sft_weight: float,
                  output_tensor: torch.Tensor):
    """megatron-core's loss-function contract: (loss sum, pairs, {"dpo loss": report})."""
    from megatron.core import parallel_state as ps

    reference = batch["reference"]
    num_pairs = reference.shape[0]
    # the model's output is the per-token NLL of the labels (vocab-parallel cross entropy)
    sums, counts = response_sums(-output_tensor.float(), batch["loss_mask"],
                                 batch["response_ids"], num_pairs)
    cp_size = ps.get_context_parallel_world_size()
    first_cp = True
    if cp_size > 1:  # each CP rank holds a share of every block: the loss needs whole sums
        from torch.distributed.nn.functional import all_reduce

        group = ps.get_context_parallel_group()
        sums = all_reduce(sums, group=group)
        counts = torch.distributed.nn.functional.all_reduce(counts.detach(), group=group)
        first_cp = ps.get_context_parallel_rank() == 0
    out = dpo_pair_losses(sums[:, 0], sums[:, 1], reference[:, 0].float(),
                          reference[:, 1].float(), counts[:, 0], counts[:, 1],
                          loss_type=loss_type, beta=beta, sft_weight=sft_weight)
    # One CP rank counts the pairs; the gradient still reaches every rank's share through the
    # all-reduce's backward.
    weight = 1.0 if first_cp else 0.0
    loss_sum = out["loss"].sum() * weight
    chosen, rejected = out["chosen_rewards"], out["rejected_rewards"]
    accuracy = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    tokens = batch["loss_mask"].float().sum()
    report = torch.stack([
        loss_sum.detach(), torch.tensor(float(num_pairs), device=loss_sum.device) * weight,
        tokens, accuracy.sum() * weight, (chosen - rejected).sum() * weight,
        chosen.sum() * weight, rejected.sum() * weight, out["sft_nll"].sum() * weight])
    num = torch.tensor(num_pairs if first_cp else 0, dtype=torch.int, device=loss_sum.device)
    return loss_sum, num, {DPO_LOSS: report}


def dpo_forward_step(loss_type: str, beta: float, sft_weight: float, data_iterator, model):
    batch = to_device(next(data_iterator))
    # No loss mask for the model: an MTP block (if any) gets no loss from preference pairs.
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=torch.zeros_like(batch["loss_mask"]),
                   packed_seq_params=batch["packed_seq_params"])
    return output, functools.partial(dpo_loss_func, batch, loss_type, beta, sft_weight)


def dpo_objective(loss_type: str = "norm", beta: float = 5.0,
                  sft_weight: float = 0.0) -> Objective:
    return Objective(kind="dpo", loss_name=DPO_LOSS,
                     forward_step=functools.partial(dpo_forward_step, loss_type, beta,
                                                    sft_weight),
                     fields=DPO_FIELDS, metrics=dpo_metrics, trains_mtp=False)


# --------------------------------------------------------------------------------------------
# collating packed pairs


def collate_pairs(samples: Sequence[dict]) -> dict:
    """``collate_packed`` plus the pair fields: ``response_ids`` over the row (renumbered per
    micro-batch), ``pair_keys`` and ``reference`` ([pairs, 2] summed reference log-probs)."""
    batch = collate_packed(samples)
    rows, offset = [], 0
    for sample in samples:
        ids = np.asarray(sample["response_ids"], dtype=np.int64)
        rows.append(np.where(ids > 0, ids + 2 * offset, 0))
        offset += len(sample["pair_keys"])
    batch["response_ids"] = torch.from_numpy(np.concatenate(rows)).unsqueeze(0)
    batch["pair_keys"] = torch.from_numpy(np.concatenate(
        [np.asarray(s["pair_keys"], dtype=np.int64) for s in samples]))
    batch["reference"] = torch.from_numpy(np.concatenate(
        [np.asarray(s["reference"], dtype=np.float64).reshape(-1, 2) for s in samples]))
    batch["extra_token_keys"] = ("response_ids",)  # split with the tokens under CP
    return batch
