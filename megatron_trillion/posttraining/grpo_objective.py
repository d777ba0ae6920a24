"""GRPO as a training objective: the forward step and loss over rollout micro-batches, the
trainer's own passes over a rollout (old and reference log-probabilities), and the log report.

A rollout micro-batch (``grpo.collate_sequences``) carries per label position: ``loss_mask``
(response tokens), ``advantages``, ``sampler_logprobs`` (the generation engine's), and, filled
by ``score_rollout_batches`` before training, ``ref_logprobs`` (the reference policy's, with
``--grpo-kl-coeff > 0``); the first epoch's forward adds ``old_logprobs`` (this policy before
the step's first update) for the later epochs.

Log-probabilities come from megatron-core's vocab-parallel cross entropy: the model is called
with labels and returns ``-log p(label)`` per position, at any TP, without gathering logits.

The report (one vector of sums, summed over micro-batches, DP ranks and the iterations of a log
window) is ``[loss sum, tokens, tokens, *fields]``: token sums of the loss's pieces, then the
rollout's statistics, which the first micro-batch of each rank adds (``rollout_report``).
Maxima (drift, response length) cannot be summed: they are reduced with a MAX over DP when
the rollout is made and carried by DP rank 0 only, so the DP sum is the max; over a log window
the logged value is the mean of the per-step maxima.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from megatron_trillion.platform.device import compute_device, to_device
from megatron_trillion.posttraining.grpo import (
    TOKEN_SUM_FIELDS,
    GRPOLossConfig,
    logprob_drift,
    reduce_token_losses,
    token_losses,
)
from megatron_trillion.training.objective import Objective

GRPO_LOSS = "grpo loss"

# Rollout statistics: sums over the step's prompts (every rank adds its share).
ROLLOUT_FIELDS = (
    "steps",  # 1 per step (carried by DP rank 0): divides the per-step maxima and times
    "groups", "dropped groups", "responses", "response tokens", "cut responses",
    "length max", "drift sum", "drift tokens", "drift max",
    # The rest of an iteration's time (its log line's elapsed ms) is training.
    "generation seconds", "scoring seconds", "logprob pass seconds",
)


def report_fields(verifiers: Sequence[str], languages: Sequence[str]) -> tuple[str, ...]:
    """The report entries after [loss sum, tokens, tokens], for a run whose prompts name
    ``verifiers`` and are of ``languages``."""
    per = []
    for kind, names in (("verifier", verifiers), ("language", languages)):
        for name in names:
            per += [f"reward sum [{kind} {name}]", f"responses [{kind} {name}]"]
    return TOKEN_SUM_FIELDS + ROLLOUT_FIELDS + tuple(per)


def grpo_metrics(fields: Sequence[str], report: Sequence[float]) -> dict:
    """Summed report -> logged values: the loss first, then per-token means, rollout rates and
    means, the reward per verifier and per language."""
    value = dict(zip(("loss", "tokens", "processed", *fields), report))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    out = {GRPO_LOSS: ratio(value["loss"], value["tokens"])}
    for name in TOKEN_SUM_FIELDS:
        out[name] = ratio(value[name], value["tokens"])
    steps = value["steps"]
    out["reward"] = ratio(sum(value[f] for f in fields if f.startswith("reward sum [verifier")),
                          value["responses"])
    out["dropped groups"] = ratio(value["dropped groups"], value["groups"])
    out["response length"] = ratio(value["response tokens"], value["responses"])
    out["response length max"] = ratio(value["length max"], steps)
    out["responses cut"] = ratio(value["cut responses"], value["responses"])
    out["drift mean"] = ratio(value["drift sum"], value["drift tokens"])
    out["drift max"] = ratio(value["drift max"], steps)
    for part in ("generation", "scoring", "logprob pass"):
        out[f"time/{part} s"] = ratio(value[f"{part} seconds"], steps)
    for name in fields:
        if name.startswith("reward sum ["):
            key = name[len("reward sum "):]
            out[f"reward {key}"] = ratio(value[name], value[f"responses {key}"])
    return out


# --------------------------------------------------------------------------------------------
# the loss of one micro-batch


def grpo_loss_func(config: GRPOLossConfig, fields: Sequence[str], host: dict, batch: dict,
                   output_tensor: torch.Tensor):
    """(loss sum, tokens, {GRPO_LOSS: report}) of one micro-batch; ``output_tensor`` is the
    per-position ``-log p(label)``. On a rollout batch's first epoch the old log-probabilities
    are this forward's own (detached), so the ratio is exactly 1; the first epoch records them
    in ``host`` for the later ones."""
    logprobs = -output_tensor.float().reshape(-1)
    if host.get("old_logprobs") is None:
        old = logprobs.detach()
        host["old_logprobs"] = old
    else:
        old = batch["old_logprobs"].reshape(-1)
    terms = token_losses(
        logprobs, old, batch["advantages"].reshape(-1), config,
        ref_logprobs=(batch["ref_logprobs"].reshape(-1) if config.kl_coeff > 0 else None),
        sampler_logprobs=batch["sampler_logprobs"].reshape(-1))
    loss_sum, count, sums = reduce_token_losses(terms, logprobs, batch["loss_mask"])
    tokens = count.detach().float()
    rollout = batch.get("rollout_report")
    extra = torch.zeros(len(fields) - len(TOKEN_SUM_FIELDS), device=logprobs.device)
    if rollout is not None:
        extra = extra + rollout.to(extra.device).float()
    report = torch.cat([torch.stack([loss_sum.detach(), tokens, tokens]),
                        torch.stack([sums[name][0] for name in TOKEN_SUM_FIELDS]), extra])
    return loss_sum, count, {GRPO_LOSS: report}


def _model_inputs(batch: dict) -> tuple:
    return (batch["tokens"], batch["position_ids"], None)


def grpo_forward_step(config: GRPOLossConfig, fields: Sequence[str], data_iterator, model):
    """megatron-core's forward-step contract over rollout micro-batches (bind ``config`` and
    ``fields`` with ``functools.partial``)."""
    host = next(data_iterator)
    batch = to_device(host)
    # No loss mask for the model: an MTP block (if any) does not learn from sampled answers.
    output = model(*_model_inputs(batch), labels=batch["labels"],
                   loss_mask=torch.zeros_like(batch["loss_mask"]),
                   packed_seq_params=batch["packed_seq_params"])
    return output, functools.partial(grpo_loss_func, config, fields, host, batch)


def grpo_objective(config: GRPOLossConfig, fields: Sequence[str]) -> Objective:
    """GRPO as the loop's objective; ``fields``: ``report_fields`` of the run's verifiers and
    languages."""
    fields = tuple(fields)
    return Objective(kind="grpo", loss_name=GRPO_LOSS,
                     forward_step=functools.partial(grpo_forward_step, config, fields),
                     fields=fields, metrics=functools.partial(grpo_metrics, fields),
                     trains_mtp=False)


# --------------------------------------------------------------------------------------------
# the trainer's passes over a rollout


@torch.no_grad()
def sequence_logprobs(model, batches: Sequence[dict]) -> list[torch.Tensor]:
    """``log p(label)`` at every position of each micro-batch ([1, T] each, on the device),
    forward only, eval mode (no dropout). Pipeline parallelism is not supported (the
    rollout runs at PP1)."""
    chunk = model[0] if isinstance(model, (list, tuple)) else model
    was_training = chunk.training
    chunk.eval()
    try:
        out = []
        for host in batches:
            batch = to_device(host)
            nll = chunk(*_model_inputs(batch), labels=batch["labels"],
                        packed_seq_params=batch["packed_seq_params"])
            out.append(-nll.float().reshape(1, -1))
        return out
    finally:
        chunk.train(was_training)


class ReferencePolicy:
    """The reference policy of the KL penalty: the starting weights of this rank's shard, kept
    in host memory (one more copy of the local shard, in the parameters' dtype) and swapped into
    the model for the reference pass; no second model lives on the accelerator."""

    def __init__(self, model) -> None:
        self._tensors = list(_policy_tensors(model))
        self._host = [t.detach().to("cpu", copy=True) for t in self._tensors]

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host)

    def state_tensors(self) -> list[torch.Tensor]:
        return self._host

    @contextmanager
    def swapped_in(self):
        """The model computes with the reference weights inside the block; the current ones
        are back afterwards, bit for bit."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def exchange(self) -> None:
        """Swap the model's weights with the stored ones (kept swapped). A resumed run stores
        its own weights, loads the reference checkpoint into the model, then exchanges: the
        model holds its weights again and this object the reference's."""
        self._swap()

    def _swap(self) -> None:
        with torch.no_grad():
            for live, stored in zip(self._tensors, self._host):
                current = live.detach().to("cpu", copy=True)
                live.copy_(stored.to(live.device))
                stored.copy_(current)


def _policy_tensors(model):
    """Every floating tensor that shapes the model's output: parameters and floating buffers
    (e.g. MoE expert biases), of each chunk."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        while hasattr(chunk, "module"):  # DDP's own `buffers` are its gradient buffers
            chunk = chunk.module
        seen = set()
        for tensor in list(chunk.parameters()) + [b for b in chunk.buffers()
                                                   if b.is_floating_point()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def score_rollout_batches(model, batches: Sequence[dict], reference: Optional[ReferencePolicy]
                          ) -> torch.Tensor:
    """The trainer's recomputation of the sampled tokens' log-probabilities, compared with the
    sampler's: returns [sum |diff|, max |diff|, tokens] over this rank's response tokens (the
    caller reduces over DP). With a reference, fills each micro-batch's ``ref_logprobs``."""
    current = sequence_logprobs(model, batches)
    drift = torch.zeros(3, device=compute_device())
    for host, logprobs in zip(batches, current):
        mask = host["loss_mask"].to(logprobs.device)
        part = logprob_drift(host["sampler_logprobs"].to(logprobs.device), logprobs, mask)
        drift = torch.stack([drift[0] + part[0], torch.maximum(drift[1], part[1]),
                             drift[2] + part[2]])
    if reference is not None:
        with reference.swapped_in():
            for host, logprobs in zip(batches, sequence_logprobs(model, batches)):
                host["ref_logprobs"] = logprobs
    return drift
