"""Greedy generation from a megatron-trillion checkpoint, in one CPU/GPU process.

The checkpoint is loaded at TP1 x PP1 whatever layout saved it (megatron-core reshards by
global keys), the model is rebuilt from the preset stored in the checkpoint, and the tokenizer
from the run configuration stored beside it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_trillion.errors import UserError


def load_for_inference(checkpoint_root: str, iteration: Optional[int] = None, log=print):
    """(model, tokenizer, run_config) from ``--save`` directory ``checkpoint_root``;
    ``run_config["sft_chat_template"]`` is the chat template of an ``--sft`` run.

    Must run in an initialised process group (one rank:
    ``megatron_trillion.platform.distributed.initialize_single_process()``); the model is
    built at that layout, without MTP, and loaded from whatever layout saved it.
    """
    from megatron_trillion.data.tokenizers import (
        TokenizerConfig,
        build_tokenizer,
        tokenizer_drift_warning,
    )
    from megatron_trillion.training.checkpointing import load_model

    model, common = load_model(checkpoint_root, iteration, log=lambda line: None)
    run_config = dict(common.get("config", {}))
    if common.get("chat_template"):  # the template an --sft run trained with
        run_config["sft_chat_template"] = common["chat_template"]
    tokenizer = None
    tokenizer_flags = TokenizerConfig.from_run_config(run_config)
    if tokenizer_flags is not None:
        tokenizer = build_tokenizer(tokenizer_flags)
        drift = tokenizer_drift_warning(run_config, tokenizer_flags, tokenizer)
        if drift:
            log(f"WARNING: {drift}")
    return model, tokenizer, run_config


def chat_format(tokenizer, run_config: dict):
    """The chat template to talk to the model with: the one its SFT run trained with, else
    the tokenizer's own, else the default (``data.chat_template``)."""
    from megatron_trillion.data.chat_template import ChatFormat, resolve_chat_template

    template = run_config.get("sft_chat_template")
    if not template:
        template, _ = resolve_chat_template(None, run_config.get("tokenizer_model"))
    return ChatFormat(template, tokenizer)


@torch.no_grad()
def greedy_generate(model, token_ids: list[int], max_new_tokens: int,
                    eod: Optional[int] = None, stop: Sequence[int] = ()) -> list[int]:
    """Append up to ``max_new_tokens`` argmax tokens (stops at ``eod`` or any of ``stop``)."""
    from megatron_trillion.models.vocab import unpadded_vocab_size

    if not token_ids:
        raise UserError("the prompt encodes to no tokens")
    from megatron_trillion.platform.device import compute_device

    device = compute_device()
    tokens = list(token_ids)
    for _ in range(max_new_tokens):
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        positions = torch.arange(len(tokens), device=device).unsqueeze(0)
        logits = model(ids, positions, None)
        # Only the tokenizer's ids: the rows padded for TP are not tokens.
        next_id = int(logits[0, -1, :unpadded_vocab_size(model)].argmax())
        tokens.append(next_id)
        if next_id == eod or next_id in stop:
            break
    return tokens[len(token_ids):]
