"""Model merging (tools/merge_checkpoints.py): a weighted average of checkpoints' model weights.

The Trillion report merges three SFT checkpoints trained with different seeds by a uniform
average (model soups, Wortsman et al. 2022). Each input is loaded with
``training.checkpointing.load_checkpoint_dir`` into one model built at TP1 x PP1 in this process
- megatron-core reshards every tensor by its global key, so the inputs may have been saved at any
TP/PP/EP/DP - and summed with its weight; the result is written by the importer's weights-only
writer (write to ``iter_0000000.partial``, rename, tracker), an ordinary checkpoint that
``pretrain --load OUT --finetune``, ``tools/generate.py`` and the HF export read. Optimizer states
are not merged: an averaged Adam moment describes no trajectory, and ``--finetune`` starts a fresh
optimizer anyway.

Memory: the model plus one fp32 accumulator (two model copies in fp32), whatever the number of
inputs.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch

from megatron_trillion.errors import UserError
from megatron_trillion.platform.output_paths import check_new_output_dir

# Signature fields that do not change the weights' meaning (a preset's display name).
_IGNORED_FIELDS = ("name",)


def resolve_weights(weights: Optional[Sequence[float]], count: int,
                    log: Callable[[str], None] = print) -> list[float]:
    """Equal weights by default; given weights must be one per input, >= 0, not all 0, and are
    normalised to sum to 1 (saying so when they did not)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UserError(f"--weights has {len(weights)} values for {count} checkpoints (--load); "
                         "give one weight per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"--weights must be finite and >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise UserError("--weights are all 0")
    normalised = [w / total for w in weights]
    if abs(total - 1.0) > 1e-6:
        log(f" --weights {' '.join(f'{w:g}' for w in weights)} sum to {total:g}, not 1: "
            f"normalised to {' '.join(f'{w:.6g}' for w in normalised)}")
    return normalised


def _signature_differences(reference: dict, other: dict) -> list[str]:
    keys = sorted((set(reference) | set(other)) - set(_IGNORED_FIELDS))
    return [f"{k}: {reference.get(k)!r} vs {other.get(k)!r}" for k in keys
            if reference.get(k) != other.get(k)]


def merge_checkpoints(loads: Sequence[str], save: str, weights: Optional[Sequence[float]] = None,
                      log: Callable[[str], None] = print) -> str:
    """Average the model weights of the checkpoints in ``loads`` into ``save``; returns the
    written directory. Must run in an initialised single-rank process group
    (``initialize_single_process()``). Every input is checked before anything is loaded or
    written; a failure leaves ``save`` without a (partial) checkpoint."""
    from megatron_trillion.convert.importer import save_weights_only
    from megatron_trillion.data.attention_blocks import MASKING_NONE
    from megatron_trillion.models.config import build_model
    from megatron_trillion.training.checkpointing import (
        CheckpointError,
        load_checkpoint_dir,
        preset_from_signature,
        read_common,
        resolve_checkpoint,
        verify_shard_files,
    )
    from megatron_trillion.training.loop import TrainState

    if len(loads) < 2:
        raise UserError(f"--load needs at least two checkpoints to merge, got {len(loads)}")
    check_new_output_dir(save)
    factors = resolve_weights(weights, len(loads), log)
    paths, commons = [], []
    for root in loads:
        path = resolve_checkpoint(root, None, log=lambda line: None)
        commons.append(read_common(path))
        verify_shard_files(path)
        paths.append(path)
    reference = dict(commons[0].get("model") or {})
    if not reference:
        raise CheckpointError(f"{paths[0]}: no model signature (not a megatron-trillion "
                              "checkpoint?)")
    for path, common in zip(paths[1:], commons[1:]):
        differences = _signature_differences(reference, dict(common.get("model") or {}))
        if differences:
            raise CheckpointError(
                f"cannot merge {path} into {paths[0]}: the checkpoints are of different models "
                f"(architecture or vocabulary); differing: " + "; ".join(differences))
    templates = {common.get("chat_template") for common in commons}
    if len(templates) > 1:
        log(" note: the inputs were trained with different chat templates; the merged "
            f"checkpoint carries the first one's ({paths[0]})")

    preset = preset_from_signature(reference)
    model = build_model(preset, pre_process=True, post_process=True, attention_masking=MASKING_NONE)
    state = model.state_dict()
    merged = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in state.items()
              if torch.is_tensor(t) and t.is_floating_point()}
    for path, factor in zip(paths, factors):
        load_checkpoint_dir(path, [model], None, reference, load_optimizer=False,
                            load_rng=False, log=lambda line: None)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name in merged:
                    merged[name].add_(tensor.float(), alpha=factor)
        log(f" read {path} (weight {factor:.6g})")
    with torch.no_grad():
        # Integer buffers (none hold weights) keep the last input's values.
        for name, tensor in model.state_dict().items():
            if name in merged:
                tensor.copy_(merged[name].to(tensor.dtype))
    common = {
        "model": reference,
        "config": dict(commons[0].get("config") or {}),
        "train_state": TrainState().state_dict(),
        "merged_from": [{"path": os.path.abspath(p), "weight": f,
                         "iteration": c.get("iteration")}
                        for p, f, c in zip(paths, factors, commons)],
        "iteration": 0,
    }
    if commons[0].get("chat_template"):
        common["chat_template"] = commons[0]["chat_template"]
    written = save_weights_only(save, model, common)
    log(f" merged {len(paths)} checkpoints of {preset.name} into {written}; continue with "
        f"pretrain --load {save} --finetune, tools/generate.py --load {save} or "
        "tools/convert_checkpoint.py export")
    return written
