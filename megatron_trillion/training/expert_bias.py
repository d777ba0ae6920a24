"""The MoE expert bias in the training loop: its update, a skipped step, routing health.

megatron-core updates every router's ``expert_bias`` buffer (fp32, in place) inside
``finalize_model_grads`` - once per call of the pipeline schedule, i.e. once per global batch,
from the ``local_tokens_per_expert`` counts all-reduced over TP x CP x DP - *before* the
optimizer step, with its sign rule only. :func:`finalize_grads_and_expert_bias` is
``finalize_model_grads`` with the model's own rule instead (``models.router_balance``: sign or
SMEBU), at the same point, from the same all-reduced counts; it also leaves each router's
counts of the step in ``router.routed_tokens`` for :class:`RoutingHealth`.

When the NaN guard (training.numerics) then skips the optimizer step, the weights stay as they
were but the bias (and SMEBU's momentum) has already moved on the counts of the rejected
batch, so a skipped step would still change the routing of every later step.
:func:`snapshot_expert_bias` / :func:`restore_expert_bias` undo that: the loop snapshots before
the schedule runs and restores for a step that is skipped, so the bias state changes exactly
once per applied optimizer step.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Optional

import torch

from megatron_trillion.models.router_balance import (
    ExpertBiasUpdate,
    empty_experts,
    max_violation,
    routers,
    smebu_step,
)

_STATE_BUFFERS = ("expert_bias", "expert_bias_momentum")


def _expert_bias_buffers(model_chunks: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """Every router's expert bias and SMEBU momentum (decoder and MTP layers) of this rank."""
    buffers = []
    for _, router in routers(model_chunks):
        for name in _STATE_BUFFERS:
            buffer = getattr(router, name, None)
            if isinstance(buffer, torch.Tensor):
                buffers.append(buffer)
    return buffers


def snapshot_expert_bias(model_chunks: Iterable[torch.nn.Module]) -> list[tuple]:
    """``[(buffer, copy)]`` of every expert-bias state buffer (empty for dense models)."""
    return [(buffer, buffer.detach().clone()) for buffer in _expert_bias_buffers(model_chunks)]


def restore_expert_bias(snapshot: list[tuple]) -> None:
    """Put the buffers back in place (same tensors: optimizer/checkpoint references stay)."""
    with torch.no_grad():
        for buffer, saved in snapshot:
            buffer.copy_(saved)


# --------------------------------------------------------------------------------------------
# the update


@contextlib.contextmanager
def _without_megatron_bias_update(config):
    """megatron-core's finalize_model_grads applies its sign rule (and zeroes the counts) iff
    ``config.moe_router_enable_expert_bias``; nothing else there reads the flag, and routers
    read their own copy (``router.enable_expert_bias``) at forward time."""
    enabled = config.moe_router_enable_expert_bias
    config.moe_router_enable_expert_bias = False
    try:
        yield
    finally:
        config.moe_router_enable_expert_bias = enabled


def finalize_grads_and_expert_bias(model: list, num_tokens: Optional[torch.Tensor] = None,
                                   pg_collection=None, force_all_reduce: bool = False):
    """megatron-core's ``finalize_model_grads`` (same signature, the schedule's
    ``config.finalize_model_grads_func``) with the expert bias moved by the model's rule."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    if not (config.num_moe_experts and config.moe_router_enable_expert_bias):
        return finalize_model_grads(model, num_tokens, pg_collection, force_all_reduce)
    with _without_megatron_bias_update(config):
        finalize_model_grads(model, num_tokens, pg_collection, force_all_reduce)
    update_expert_bias(model, config)


@torch.no_grad()
def update_expert_bias(model: list, config) -> None:
    """Move every router's bias by its rule from the global batch's counts, then zero them."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    found = [router for _, router in routers(model)]
    if not found:  # a pipeline stage without MoE layers
        return
    rules = {getattr(r, "expert_bias_update", None) for r in found}
    if len(rules) != 1:
        raise RuntimeError(f"routers of one model disagree on the expert-bias update: {rules}")
    rule = rules.pop() or ExpertBiasUpdate("sign", config.moe_router_bias_update_rate)
    counts = torch.stack([r.local_tokens_per_expert for r in found])
    bias = torch.stack([r.expert_bias for r in found])
    if rule.style == "sign":
        # megatron-core's own rule; it all-reduces ``counts`` in place over TP x CP x DP.
        new_bias = get_updated_expert_bias(counts, bias, rule.rate)
    else:
        # The same group as megatron-core's rule.
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(counts, group=group)
        momentum = torch.stack([r.expert_bias_momentum for r in found])
        new_bias, new_momentum = smebu_step(counts, bias, momentum, rate=rule.rate,
                                            momentum_coeff=rule.momentum,
                                            clamp_scale=rule.clamp_scale)
        for router, row in zip(found, new_momentum):
            router.expert_bias_momentum.copy_(row)
    for router, row, routed in zip(found, new_bias, counts):
        router.expert_bias.copy_(row)
        router.routed_tokens = routed.clone()
        router.local_tokens_per_expert.zero_()


# --------------------------------------------------------------------------------------------
# routing health


def _layer_slot(name: str, router, num_layers: int) -> int:
    """0-based slot of a router: its decoder layer, or num_layers + j for MTP layer j."""
    mtp = re.match(r"mtp\.layers\.(\d+)(\.|$)", name)
    if mtp:
        return num_layers + int(mtp.group(1))
    if router.layer_number is None:
        raise RuntimeError(f"router {name} has no layer number")
    return router.layer_number - 1


class RoutingHealth:
    """Per MoE layer MaxVio and empty experts, and experts that stay empty.

    ``record()`` runs on every rank after each step: the counts of all layers are assembled on
    the compute device (one small all-reduce over the pipeline group) and each expert's run of
    consecutive empty steps is counted there, with no host read. At a log line,
    ``summary()`` / ``per_layer()`` describe the last step and ``warnings()`` names experts
    empty for at least ``warn_after_steps`` consecutive steps (once per such stretch).
    """

    def __init__(self, model_chunks: list, warn_after_steps: Optional[int] = 100) -> None:
        from megatron.core.utils import get_model_config

        config = get_model_config(model_chunks[0])
        self.enabled = bool(config.num_moe_experts and config.moe_router_enable_expert_bias)
        self.warn_after_steps = warn_after_steps
        self._num_layers = config.num_layers
        self._slots = config.num_layers + (config.mtp_num_layers or 0)
        self._experts = config.num_moe_experts or 0
        self._routers = [(_layer_slot(name, r, config.num_layers), r)
                         for name, r in routers(model_chunks)] if self.enabled else []
        self._counts: Optional[torch.Tensor] = None  # [slots, experts + 1]: counts, present
        self._empty_run: Optional[torch.Tensor] = None
        self._warned: Optional[torch.Tensor] = None
        self._host: Optional[tuple] = None  # (counts, MoE slots) read once per log line

    def record(self) -> None:
        """Collect this step's counts of every layer (collective over the pipeline group)."""
        from megatron.core import parallel_state as ps

        from megatron_trillion.platform.device import compute_device

        if not self.enabled:
            return
        both = torch.zeros(self._slots, self._experts + 1, device=compute_device())
        for slot, router in self._routers:
            routed = getattr(router, "routed_tokens", None)
            if routed is not None:
                both[slot, :-1] = routed.float()
                both[slot, -1] = 1.0
        if ps.model_parallel_is_initialized() and \
                ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(both, group=ps.get_pipeline_model_parallel_group())
        empty = both[:, :-1] == 0
        if self._empty_run is None:
            self._empty_run = torch.zeros_like(empty, dtype=torch.long)
            self._warned = torch.zeros_like(empty)
        self._empty_run = torch.where(empty, self._empty_run + 1,
                                      torch.zeros_like(self._empty_run))
        self._warned &= empty  # a stretch ended: warn again next time
        self._counts = both
        self._host = None

    def _read(self) -> tuple:
        if self._host is None:
            both = self._counts.cpu()
            self._host = (both[:, :-1], [s for s in range(self._slots) if both[s, -1] > 0])
        return self._host

    def layer_name(self, slot: int) -> str:
        return (f"layer_{slot + 1}" if slot < self._num_layers
                else f"mtp_{slot - self._num_layers + 1}")

    def _last_rows(self) -> tuple:
        """(layer slots, their expert counts of the last step); ([], None) before any step."""
        if self._counts is None:
            return [], None
        counts, slots = self._read()
        return slots, (counts[slots] if slots else None)

    def per_layer(self) -> dict:
        """TensorBoard scalars of the last step: ``moe/max_vio/layer_N`` and
        ``moe/empty_experts/layer_N`` (``mtp_J`` for the MTP layers)."""
        slots, rows = self._last_rows()
        if not slots:
            return {}
        out = {}
        for slot, v, e in zip(slots, max_violation(rows).tolist(), empty_experts(rows).tolist()):
            out[f"moe/max_vio/{self.layer_name(slot)}"] = v
            out[f"moe/empty_experts/{self.layer_name(slot)}"] = float(e)
        return out

    def summary(self) -> dict:
        """For the iteration line: the largest MaxVio over layers, the empty experts summed over
        layers."""
        slots, rows = self._last_rows()
        if not slots:
            return {}
        return {"moe max vio": float(max_violation(rows).max()),
                "moe empty experts": float(empty_experts(rows).sum())}

    def warnings(self, iteration: int) -> list[str]:
        """Experts empty for ``warn_after_steps`` steps or more, not yet reported."""
        if self._counts is None or not self.warn_after_steps:
            return []
        stuck = (self._empty_run >= self.warn_after_steps) & ~self._warned
        self._warned |= stuck
        stuck, runs = stuck.cpu(), self._empty_run.cpu()
        _, slots = self._read()
        lines = []
        for slot in slots:
            experts = stuck[slot].nonzero().flatten().tolist()
            if experts:
                lines.append(
                    f" warning: MoE {self.layer_name(slot).replace('_', ' ')}: expert(s) "
                    f"{experts} received no token for {int(runs[slot, experts].min())} or more "
                    f"consecutive steps (up to iteration {iteration})")
        return lines
