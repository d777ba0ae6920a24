"""Which Hugging Face architecture a preset exports to (one mapping module per architecture)."""

from __future__ import annotations

from types import ModuleType

import torch

from megatron_trillion.convert import afmoe, llama
from megatron_trillion.convert.layout import GetTensor
from megatron_trillion.errors import UserError
from megatron_trillion.models.presets import ModelPreset

ARCHITECTURES = {llama.MODEL_TYPE: llama, afmoe.MODEL_TYPE: afmoe}


def architecture_for(p: ModelPreset) -> ModuleType:
    """``llama`` for dense presets, ``afmoe`` for MoE presets; a UserError names the preset
    fields the chosen architecture cannot represent."""
    module = afmoe if p.is_moe else llama
    problems = module.unsupported_features(p)
    if problems:
        raise UserError(f"preset {p.name!r} cannot be expressed as {module.ARCHITECTURE}: "
                        + "; ".join(problems))
    return module


def hf_state_dict(p: ModelPreset, get: GetTensor) -> dict[str, torch.Tensor]:
    """The whole HF state dict at once (for small models and tests; the exporter streams).

    ``get`` maps TP1 local-spec names to tensors, e.g. ``model.state_dict().__getitem__`` of a
    GPTModel built at TP1 x PP1 without MTP."""
    out: dict[str, torch.Tensor] = {}
    for _, produce in architecture_for(p).export_steps(p, get):
        out.update(produce())
    return out
