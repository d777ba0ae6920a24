"""Greedy generation from a megatron-trillion checkpoint, in one CPU/GPU process.

The checkpoint is loaded at TP1 x PP1 whatever layout saved it (megatron-core reshards by
global keys), the model is rebuilt from the preset stored in the checkpoint, and the tokenizer
from the run configuration stored beside it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch


def load_for_inference(checkpoint_root: str, iteration: Optional[int] = None):
    """(model, tokenizer, run_config) from ``--save`` directory ``checkpoint_root``.

    Must run in an initialised single-rank process group
    (``initialize_distributed(ParallelSizes())``).
    """
    from megatron.core import dist_checkpointing

    from megatron_trillion.data.tokenizers import TokenizerConfig, build_tokenizer
    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.models.presets import ModelPreset
    from megatron_trillion.training.checkpointing import (
        CheckpointError,
        checkpoint_dir,
        read_tracker,
    )

    iteration = iteration if iteration is not None else read_tracker(checkpoint_root)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_root}")
    path = checkpoint_dir(checkpoint_root, iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    common = common.get("common", common)
    signature = common["model"]
    preset = ModelPreset(**{f.name: signature[f.name] for f in dataclasses.fields(ModelPreset)})
    # MTP layers only serve training; inference (like the HF export) drops them.
    preset = dataclasses.replace(preset, mtp_num_layers=0)
    config = build_transformer_config(preset, None, hidden_dropout=0.0, attention_dropout=0.0)
    model = build_model(preset, config=config, pre_process=True, post_process=True,
                        attention_masking="none")
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"])
    model.eval()
    run_config = common.get("config", {})
    tokenizer = None
    if run_config.get("tokenizer_model") or run_config.get("vocab_file"):
        tokenizer = build_tokenizer(TokenizerConfig(
            tokenizer_type=run_config["tokenizer_type"],
            tokenizer_model=run_config.get("tokenizer_model"),
            vocab_file=run_config.get("vocab_file"), merge_file=run_config.get("merge_file")))
    return model, tokenizer, run_config


@torch.no_grad()
def greedy_generate(model, token_ids: list[int], max_new_tokens: int,
                    eod: Optional[int] = None) -> list[int]:
    """Append up to ``max_new_tokens`` argmax tokens (stops at ``eod``)."""
    if not token_ids:
        raise ValueError("the prompt encodes to no tokens")
    tokens = list(token_ids)
    for _ in range(max_new_tokens):
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(len(tokens)).unsqueeze(0)
        logits = model(ids, positions, None)
        next_id = int(logits[0, -1].argmax())
        tokens.append(next_id)
        if eod is not None and next_id == eod:
            break
    return tokens[len(token_ids):]
