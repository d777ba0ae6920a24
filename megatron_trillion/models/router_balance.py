"""The rule that moves the MoE routers' expert bias, and routing-health statistics.

megatron-core 0.16.1 has one aux-loss-free rule, ``moe_utils.get_updated_expert_bias`` (the
"sign" rule: bias_i += rate * sign(mean load - load_i)), applied inside
``finalize_model_grads`` once per global batch from the token counts all-reduced over
TP x CP x DP. Trinity Large trains with SMEBU instead, which megatron-core does not have. This
module adds it as a second style of the same update; the router and its buffers stay
megatron-core's (``expert_bias``, ``local_tokens_per_expert``), SMEBU adds one buffer,
``expert_bias_momentum``, registered on the router so checkpoints carry it with the bias.

SMEBU (Soft-clamped Momentum Expert Bias Updates, Trinity Large technical report, arXiv
2602.17004), per MoE layer and optimizer step, with n_i the tokens routed to expert i::

    v_i = (mean(n) - n_i) / mean(n)          normalised violation (batch-size free)
    d_i = rate * tanh(clamp_scale * v_i)      soft clamp: bounded, smooth near balance
    d_i = d_i - mean(d)                       mean-centred
    m_i = momentum * m_i + (1 - momentum) * d_i
    b_i = b_i + m_i

The report's text was not reachable from here; the rule and Trinity Large's constants
(rate lambda = 5e-4, momentum beta = 0.5, clamp scale kappa = 2) are taken from secondary
write-ups of the report that agree on them (they are the ``trinity-large`` preset's values
and can be changed with ``--moe-router-bias-update-rate / -momentum / -clamp-scale``).

Interface::

    configure_expert_bias_update(model, ExpertBiasUpdate("smebu", 5e-4, 0.5, 2.0))  # build
    routers(model_chunks)                 # routers with an expert bias, in module order
    smebu_step(counts, bias, momentum, rate=..., momentum_coeff=..., clamp_scale=...)
    max_violation(counts), empty_experts(counts)   # routing health per layer ([L, E] -> [L])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

BIAS_UPDATE_STYLES = ("sign", "smebu")


@dataclass(frozen=True)
class ExpertBiasUpdate:
    """How the expert bias moves after each optimizer step."""

    style: str = "sign"
    """"sign": megatron-core's rule; "smebu": soft-clamped momentum updates."""
    rate: float = 1e-3
    """sign: the step size gamma; smebu: lambda, the scale of the soft-clamped step."""
    momentum: float = 0.5
    """smebu only: beta of the momentum buffer."""
    clamp_scale: float = 2.0
    """smebu only: kappa in tanh(kappa * violation)."""

    def errors(self, name_of: Callable[[str], str] = str) -> list[str]:
        """Every problem, naming each value by ``name_of(preset field)`` (see
        ``ModelPreset.errors``)."""
        n = name_of
        errors = []
        if self.style not in BIAS_UPDATE_STYLES:
            errors.append(f"{n('moe_router_bias_update_style')} must be one of "
                          f"{BIAS_UPDATE_STYLES}, got {self.style!r}")
        if not self.rate >= 0:
            errors.append(f"{n('moe_router_bias_update_rate')} must be >= 0, got {self.rate}")
        if not 0 <= self.momentum < 1:
            errors.append(f"{n('moe_router_bias_update_momentum')} must be in [0, 1), "
                          f"got {self.momentum}")
        if not self.clamp_scale > 0:
            errors.append(f"{n('moe_router_bias_update_clamp_scale')} must be > 0, "
                          f"got {self.clamp_scale}")
        return errors

    def validate(self, where: str = "expert bias update") -> None:
        errors = self.errors()
        if errors:
            raise ValueError(f"{where}: " + "; ".join(errors))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def routers(model_chunks: Iterable[torch.nn.Module]) -> list:
    """``[(name, router)]`` of every router with an expert bias (decoder and MTP layers)."""
    found = []
    for chunk in model_chunks:
        for name, module in _unwrap(chunk).named_modules():
            if isinstance(getattr(module, "expert_bias", None), torch.Tensor):
                found.append((name, module))
    return found


def configure_expert_bias_update(model: torch.nn.Module, update: ExpertBiasUpdate) -> None:
    """Give every router of ``model`` the update rule, and SMEBU its momentum buffer (fp32,
    zeros, persistent: saved and loaded with the expert bias)."""
    update.validate()
    for _, router in routers([model]):
        router.expert_bias_update = update
        if update.style == "smebu" and getattr(router, "expert_bias_momentum", None) is None:
            router.register_buffer("expert_bias_momentum",
                                   torch.zeros_like(router.expert_bias, dtype=torch.float32))


def smebu_step(counts: torch.Tensor, bias: torch.Tensor, momentum: torch.Tensor, *,
               rate: float, momentum_coeff: float, clamp_scale: float) -> tuple:
    """One SMEBU update of ``[layers, experts]`` tensors: returns (new bias, new momentum).

    ``counts`` are the tokens routed to each expert over the whole global batch. A layer that
    routed no token at all (mean 0) gets a zero step."""
    counts = counts.float()
    mean = counts.mean(dim=-1, keepdim=True)
    violation = torch.where(mean > 0, (mean - counts) / mean.clamp(min=1e-12),
                            torch.zeros_like(counts))
    step = rate * torch.tanh(clamp_scale * violation)
    step = step - step.mean(dim=-1, keepdim=True)
    new_momentum = momentum_coeff * momentum + (1.0 - momentum_coeff) * step
    return bias + new_momentum, new_momentum


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: max over experts of load / mean load - 1 (0 for a layer without
    tokens). ``counts``: ``[..., experts]``."""
    counts = counts.float()
    mean = counts.mean(dim=-1)
    return torch.where(mean > 0, counts.max(dim=-1).values / mean.clamp(min=1e-12) - 1.0,
                       torch.zeros_like(mean))


def empty_experts(counts: torch.Tensor) -> torch.Tensor:
    """Experts per layer that received no token. ``counts``: ``[..., experts]``."""
    return (counts == 0).sum(dim=-1)
