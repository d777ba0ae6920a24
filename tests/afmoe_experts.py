"""AFMoE experts in transformers' fused in-memory layout, for the conversion tests."""

from __future__ import annotations

import re

import torch

_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(tensors: dict) -> dict:
    """``tensors`` (HF names) with each layer's on-disk per-expert
    ``mlp.experts.{e}.{gate,up,down}_proj.weight`` replaced by transformers' fused
    ``mlp.experts.gate_up_proj`` [E, 2F, H] (per-expert [gate; up]) and ``down_proj`` [E, H, F]."""
    out = dict(tensors)
    experts: dict = {}
    for name in tensors:
        match = _PER_EXPERT.match(name)
        if match:
            experts.setdefault(match[1], {})[(int(match[2]), match[3])] = out.pop(name)
    for prefix, parts in experts.items():
        n = len(parts) // 3
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
        out[prefix + ".down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return out
