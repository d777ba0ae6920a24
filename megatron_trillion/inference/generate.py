"""Loading a megatron-trillion checkpoint for inference, and the chat template to talk to it.

The checkpoint is loaded at the current layout (TP1 x PP1 in one process) whatever layout saved it (megatron-core reshards by
global keys), the model is rebuilt from the preset stored in the checkpoint, and the tokenizer
from the run configuration stored beside it. Generation itself is ``inference.engine``.
"""

from __future__ import annotations

from typing import Optional


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
