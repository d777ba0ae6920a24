"""Hugging Face directory (Llama / AFMoE) -> megatron-trillion checkpoint for continued
pretraining or context extension (``pretrain --load DIR --finetune``).

Why one process at TP1 x PP1 serves any requested TP/PP/EP: torch_dist checkpoints store every
model tensor under a global key with global offsets, and megatron-core's loader cuts each rank's
slice out of them at load time (the same resharding that lets a TP2xPP2 run resume at TP1). The
only layout-bound parts of a checkpoint are the optimizer state and the per-rank RNG states, and
an import has neither to carry (``--finetune`` skips both). What the requested layout does
decide is checked here, before anything is written: that it divides the model (heads, query
groups, layers, experts). The vocabulary is config.json's ``vocab_size`` (the tokenizer's); the
model pads it for TP with inert zero rows (``models.vocab``), and a run at any TP size loads
them. ``tests/test_convert.py`` loads an import into a TP2 x PP2 run.

Memory: the model is built once in this process (the size of the model in fp32); the HF tensors
are read one at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_trillion.convert.architectures import architecture_for
from megatron_trillion.convert.export import check_vocab
from megatron_trillion.convert.hf_files import HFCheckpointReader
from megatron_trillion.data.attention_blocks import MASKING_NONE
from megatron_trillion.errors import UserError
from megatron_trillion.models.vocab import is_vocab_parallel_key
from megatron_trillion.platform.output_paths import check_new_output_dir

# config.json keys that are not architecture (or are compared separately)
_NOT_COMPARED = {"architectures", "use_cache", "initializer_range", "rope_theta",
                 "rope_parameters", "vocab_size", "max_position_embeddings", "score_func",
                 "route_norm", "layer_types"}


@dataclass(frozen=True)
class ImportConfig:
    """What to import where.

    Attributes:
        load: the Hugging Face directory (``--load``).
        save: the checkpoint directory to write (``--save``; later ``pretrain --load``).
        preset: the model preset the weights are for (``--preset``); vocab_size and
            seq_length are taken from config.json, every other field must match it.
        tensor_model_parallel_size / pipeline_model_parallel_size / expert_model_parallel_size:
            the layout the checkpoint will be trained at (checked against the model).
        make_vocab_size_divisible_by: as pretrain's flag of the same name.
        seed: initialises weights HF has no counterpart for (the MTP layer).
    """

    load: str
    save: str
    preset: str
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    make_vocab_size_divisible_by: int = 128
    seed: int = 1234


@dataclass
class ImportResult:
    path: str
    num_tensors: int
    initialized: list


def _rope_theta(config: dict):
    rope = config.get("rope_parameters") or {}
    return rope.get("rope_theta", config.get("rope_theta"))


def resolve_import_preset(config: ImportConfig, hf_config: dict):
    """The preset with vocab/sequence length of config.json, after checking everything else."""
    from megatron_trillion.models.presets import get_preset

    base = get_preset(config.preset)
    arch = architecture_for(base)
    model_type = hf_config.get("model_type")
    if model_type != arch.MODEL_TYPE:
        raise UserError(f"{config.load}/config.json: model_type {model_type!r}, but preset "
                        f"{base.name!r} (--preset) is a {arch.MODEL_TYPE!r} model")
    for key in ("vocab_size", "max_position_embeddings"):
        if key not in hf_config:
            raise UserError(f"{config.load}/config.json has no {key!r}")
    preset = dataclasses.replace(base, vocab_size=hf_config["vocab_size"],
                                 seq_length=hf_config["max_position_embeddings"])
    preset.validate()
    expected = arch.hf_config(preset)
    mismatched = [f"{key}={hf_config[key]!r} (preset has {value!r})"
                  for key, value in expected.items()
                  if key not in _NOT_COMPARED and key in hf_config and hf_config[key] != value]
    theta = _rope_theta(hf_config)
    if theta is not None and float(theta) != float(preset.rotary_base):
        mismatched.append(f"rope_theta={theta!r} (preset has {preset.rotary_base!r})")
    if mismatched:
        raise UserError(f"{config.load}/config.json does not describe preset {base.name!r} "
                        "(--preset): " + "; ".join(mismatched))
    return preset, arch


def check_layout(config: ImportConfig, preset) -> None:
    from megatron_trillion.platform.distributed import ParallelSizes, validate_parallel_sizes

    tp, pp, ep = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                  config.expert_model_parallel_size)
    errors = validate_parallel_sizes(ParallelSizes(tensor=tp, pipeline=pp, expert=ep),
                                     tp * pp * ep, **preset.layout_dims())
    if config.make_vocab_size_divisible_by < 1:
        errors.append(f"--make-vocab-size-divisible-by must be >= 1, got "
                      f"{config.make_vocab_size_divisible_by}")
    if errors:
        raise UserError("the requested layout does not fit the model:\n  - "
                        + "\n  - ".join(errors))


def import_checkpoint(config: ImportConfig, progress: bool = True,
                      log: Callable[[str], None] = print) -> ImportResult:
    """Import; must run in an initialised single-rank process group
    (``initialize_distributed(ParallelSizes())``)."""
    from megatron_trillion.data.tokenizers import HuggingFaceTokenizer
    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.init import initialize_weights
    from megatron_trillion.models.presets import model_signature
    from megatron_trillion.training.loop import TrainState

    check_new_output_dir(config.save)
    hf = HFCheckpointReader(config.load)
    preset, arch = resolve_import_preset(config, hf.config)
    check_layout(config, preset)
    has_tokenizer = os.path.isfile(os.path.join(config.load, "tokenizer.json"))
    if has_tokenizer:
        check_vocab(preset.vocab_size, HuggingFaceTokenizer(config.load), config.load,
                    "vocab_size in config.json",
                    "the tokenizer.json does not belong to these weights")
    rows = hf.get("model.embed_tokens.weight").shape[0]
    if rows != preset.vocab_size:
        raise UserError(f"{config.load}: model.embed_tokens.weight has {rows} rows but "
                        f"config.json vocab_size is {preset.vocab_size}")

    model = build_model(preset, pre_process=True, post_process=True, attention_masking=MASKING_NONE,
                        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by)
    initialize_weights([model], seed=config.seed)
    state = model.state_dict()
    wanted = {name for name in state if not name.startswith("mtp.")
              and "_extra_state" not in name}
    done = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(wanted), desc=f"import {arch.ARCHITECTURE}", unit="tensor",
                   dynamic_ncols=True)
    # The bar is closed (its line ended) before any error is printed.
    with torch.no_grad(), (bar if bar is not None else contextlib.nullcontext()):
        for name, tensor in arch.import_tensors(preset, hf.get):
            target = state.get(name)
            if target is None:
                raise ValueError(f"internal: the {arch.MODEL_TYPE} mapping produced {name!r}, "
                                 f"which the {preset.name!r} model does not have")
            if is_vocab_parallel_key(name):
                target = target[: preset.vocab_size]  # the rest is padding (zeros)
            if tuple(tensor.shape) != tuple(target.shape):
                raise UserError(f"{config.load}: the tensor for {name} has shape "
                                f"{tuple(tensor.shape)}, the {preset.name!r} model expects "
                                f"{tuple(target.shape)}")
            target.copy_(tensor)
            done.add(name)
            if bar is not None:
                bar.update(1)
    # Buffers megatron keeps for bookkeeping (e.g. the router's token counters) have no HF
    # counterpart; every learned weight must have come from the HF checkpoint.
    params = {n for n, _ in model.named_parameters() if not n.startswith("mtp.")}
    missing = sorted(params - done)
    if missing:
        raise ValueError(f"internal: the {arch.MODEL_TYPE} mapping left weights unset: {missing}")
    initialized = sorted(n for n in state if n.startswith("mtp.") and "_extra_state" not in n)
    if initialized:
        log(f" {preset.name} has {preset.mtp_num_layers} MTP layer(s), which HF checkpoints do "
            f"not carry: initialised fresh (seed {config.seed})")

    run_config = {
        "preset": config.preset,
        "tensor_model_parallel_size": config.tensor_model_parallel_size,
        "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
        "expert_model_parallel_size": config.expert_model_parallel_size,
        "seq_length": preset.seq_length,
        "tokenizer_type": "HuggingFaceTokenizer" if has_tokenizer else None,
        "tokenizer_model": os.path.abspath(config.load) if has_tokenizer else None,
    }
    common = {"model": model_signature(preset), "config": run_config,
              "train_state": TrainState().state_dict(),
              "imported_from": {"path": os.path.abspath(config.load),
                                "architecture": arch.ARCHITECTURE}, "iteration": 0}
    path = save_weights_only(config.save, model, common)
    log(f" imported {config.load} ({arch.ARCHITECTURE}) as preset {preset.name} "
        f"(vocab {preset.vocab_size}, seq {preset.seq_length}) into {path}; continue with "
        f"pretrain --load {config.save} --finetune --tensor-model-parallel-size "
        f"{config.tensor_model_parallel_size} --pipeline-model-parallel-size "
        f"{config.pipeline_model_parallel_size}"
        + (f" --expert-model-parallel-size {config.expert_model_parallel_size}"
           if config.expert_model_parallel_size > 1 else ""))
    return ImportResult(path=path, num_tensors=len(done), initialized=initialized)


def save_weights_only(root: str, model, common: dict) -> str:
    """Write ``root/iter_0000000`` with the model's tensors and ``common`` only, then point the
    tracker at it.

    Unlike a training save there is no optimizer and no RNG state: ``pretrain --finetune``
    requests exactly the model's tensors, and megatron-core's strict loading rejects keys a
    request does not name. Published by ``training.checkpointing.publish_checkpoint``, as a
    training save is, so a killed import leaves no checkpoint that looks complete.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    from megatron_trillion.training.checkpointing import (
        PARTIAL,
        checkpoint_dir,
        publish_checkpoint,
        unwrap,
    )

    final = checkpoint_dir(root, 0)
    partial = final + PARTIAL
    os.makedirs(partial)  # callers checked that root is new or empty (check_new_output_dir)
    state = {"model": unwrap(model).sharded_state_dict(
        metadata=ensure_metadata_has_dp_cp_group(None)), "common": common}
    dist_checkpointing.save(state, partial)
    publish_checkpoint(root, 0)
    return final
