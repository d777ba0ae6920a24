"""What a run trains for: an ``Objective`` = (batch source, loss function, log fields).

Pretraining, SFT and DPO (and later GRPO) share the loop, the schedules, the optimizer, the
checkpoints and the validation; they differ only here. The loop asks the objective three things:

* the batch source (``Run.train_batches``: ``for_step(consumed, global_batch)`` -> this rank's
  micro-batches of a step, ``dataset``, ``close()``): a reader of a packed dataset for
  pretraining, SFT and DPO; a GRPO batch source would sample rollouts from the current model
  there and attach advantages and old log-probabilities to each micro-batch;
* ``forward_step``: megatron-core's forward-step contract, ``(output, loss_func)``, where
  ``loss_func(output) -> (loss sum, count, {report_key: report})`` returns *sums and counts*, so
  megatron-core (``calculate_per_token_loss``) averages over the whole global batch whatever the
  micro-batch and DP split. ``report`` is a vector of sums whose first two entries are the loss
  sum and the count (tokens for a language-model loss, pairs for DPO), the third the tokens
  processed (throughput), the rest what ``fields`` names;
* ``metrics(report sums)``: the logged values (the first is the loss), from sums over any number
  of micro-batches, steps and ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_trillion.platform.device import to_device

LM_LOSS = "lm loss"


@dataclass(frozen=True)
class Objective:
    """One training objective. ``kind`` names the run in checkpoints ("pretraining", "sft",
    "dpo"): a resume must be of the same kind."""

    kind: str
    loss_name: str  # the logged loss ("lm loss", "dpo loss"); also the report's key
    forward_step: Callable  # megatron-core's forward_step_func(data_iterator, model)
    fields: Sequence[str] = ()  # names of the report entries after [loss, count, tokens]
    metrics: Callable[[Sequence[float]], dict] = None  # report sums -> logged values
    trains_mtp: bool = True  # an MTP block (if any) learns from this objective (its log line)

    @property
    def report_size(self) -> int:
        return 3 + len(self.fields)

    def values(self, report: Sequence[float]) -> dict:
        """The logged values of summed reports (the loss first)."""
        if self.metrics is not None:
            return self.metrics(report)
        return {self.loss_name: _ratio(report[0], report[1])}


def _ratio(total: float, count: float) -> float:
    return total / count if count else float("nan")


# --------------------------------------------------------------------------------------------
# the language-model loss (pretraining and SFT)


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss sum and token count (megatron-core normalises by the global count)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    count = num_tokens.detach().float()
    report = torch.stack([loss_sum.detach(), count, count])
    return loss_sum, num_tokens, {LM_LOSS: report}


def lm_forward_step(data_iterator, model):
    """megatron-core's forward-step contract: (output, loss function of the output)."""
    batch = to_device(next(data_iterator))
    output = model(
        batch["tokens"], batch["position_ids"], None,
        labels=batch["labels"], loss_mask=batch["loss_mask"],
        packed_seq_params=batch["packed_seq_params"],
    )
    return output, functools.partial(lm_loss_func, batch["loss_mask"])


def language_model_objective(kind: str) -> Objective:
    """Next-token loss on the loss-masked tokens: pretraining (every token) and SFT
    (assistant tokens); only the batches differ."""
    return Objective(kind=kind, loss_name=LM_LOSS, forward_step=lm_forward_step)
