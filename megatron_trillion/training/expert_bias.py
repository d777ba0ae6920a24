"""The aux-loss-free MoE expert bias across a skipped step.

megatron-core updates every router's ``expert_bias`` buffer (fp32, in place) inside
``finalize_model_grads`` - once per call of the pipeline schedule, i.e. once per global batch,
from the ``local_tokens_per_expert`` counts all-reduced over TP x CP x DP - *before* the
optimizer step. When the NaN guard (training.numerics) then skips the optimizer step, the
weights stay as they were but the bias has already moved on the counts of the rejected batch,
so a skipped step would still change the routing of every later step. These two functions
undo that: the loop snapshots the biases before the schedule runs and restores them for a
step that is skipped, so the bias changes exactly once per applied optimizer step.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _expert_bias_buffers(model_chunks: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """Every router's expert-bias buffer (decoder and MTP layers) of this rank's chunks."""
    buffers = []
    for chunk in model_chunks:
        for module in chunk.modules():
            bias = getattr(module, "expert_bias", None)
            if isinstance(bias, torch.Tensor):
                buffers.append(bias)
    return buffers


def snapshot_expert_bias(model_chunks: Iterable[torch.nn.Module]) -> list[tuple]:
    """``[(buffer, copy)]`` of every expert bias (empty for dense models: costs nothing)."""
    return [(bias, bias.detach().clone()) for bias in _expert_bias_buffers(model_chunks)]


def restore_expert_bias(snapshot: list[tuple]) -> None:
    """Put the biases back in place (same tensors: optimizer/checkpoint references stay valid)."""
    with torch.no_grad():
        for bias, saved in snapshot:
            bias.copy_(saved)
