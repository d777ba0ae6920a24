"""A DPO run's setup beyond pretraining's: which weights are the reference and where their
log-probabilities are cached (``ReferenceTables``)."""

from __future__ import annotations

import os
from typing import Callable, Optional

from megatron_trillion.errors import UserError
from megatron_trillion.posttraining.reference import (
    ReferenceTables,
    checkpoint_identity,
    compute_reference_logps,
)


def reference_tables(config, preset, model: list, data, tokenizer_fingerprint,
                     resumed: Optional[dict], context_parallel, tokens_per_microbatch: int,
                     log: Callable[[str], None]) -> ReferenceTables:
    """The reference of this run: ``--dpo-reference-load``, else the checkpoint a resumed run
    recorded, else ``--load`` (the weights the model holds now), else the initial weights."""
    from megatron_trillion.models.presets import model_signature
    from megatron_trillion.training import checkpointing

    load = config.checkpoint.load
    loaded_now = load is not None and checkpointing.resolve_checkpoint(
        load, config.checkpoint.ckpt_step, log=lambda line: None,
        may_not_exist=True) is not None
    load_reference = restore = None
    if config.dpo.dpo_reference_load:
        identity = checkpoint_identity(config.dpo.dpo_reference_load)

        def load_reference() -> None:
            checkpointing.load_checkpoint(
                config.dpo.dpo_reference_load, model, None, model_signature(preset),
                load_optimizer=False, load_rng=False, log=log)

        if loaded_now and checkpoint_identity(load, config.checkpoint.ckpt_step) == identity:
            load_reference = None  # the model already holds the reference weights
        elif loaded_now:
            def restore() -> None:
                checkpointing.load_checkpoint(
                    load, model, None, model_signature(preset), load_optimizer=False,
                    load_rng=False, iteration=config.checkpoint.ckpt_step, log=log)
        else:
            restore = None  # the policy starts from the reference weights
    elif resumed is not None and not config.checkpoint.finetune:
        identity = resumed.get("data", {}).get("reference")
        if identity is None:
            raise UserError(f"--load {load}: the checkpoint does not record its DPO reference; "
                            "give --dpo-reference-load")

        def load_reference() -> None:
            raise UserError(
                f"the reference log-probabilities of this run ({identity.get('path')}) are "
                f"not in --data-cache-path {_cache_dir(config, data)} any more (or the data "
                "changed): give --dpo-reference-load with the reference checkpoint")
    elif loaded_now:
        identity = checkpoint_identity(load, config.checkpoint.ckpt_step)
    else:
        identity = {"initial weights": model_signature(preset), "seed": config.training.seed}

    micro, dp = config.batch.micro_batch_size, data.shape.data_parallel_size
    return ReferenceTables(
        identity, tokenizer_fingerprint, data.chat.template, _cache_dir(config, data),
        compute=lambda dataset: compute_reference_logps(
            model, dataset, micro, dp, tokens_per_microbatch, data.collate, context_parallel),
        log=log, load_reference=load_reference, restore=restore)


def _cache_dir(config, data) -> str:
    return config.data.data_cache_path or os.path.join(data.workdir, "sft-cache")
