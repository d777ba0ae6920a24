"""Distributed checkpoints through ``megatron.core.dist_checkpointing`` (torch_dist format).

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt     the iteration of the newest complete checkpoint
    DIR/iter_0000100/                         one complete checkpoint (any TP/PP/DP can load it)
    DIR/iter_0000200.partial/                 a save in progress (or killed): never loaded

A save writes into ``iter_N.partial``, waits for every rank, then rank 0 renames it to
``iter_N`` and only then rewrites the tracker file (write-to-temp + rename), so a run killed at
any moment leaves the previous checkpoint loadable. The checkpoint holds the model, the
optimizer (distributed-optimizer shards included), the scheduler, the training state
(iteration, consumed samples, skipped steps), the data pipeline's mixture state, the NaN
guard, per-rank RNG states and the full run configuration. Loading reshards: megatron-core maps
every tensor by its global key and offsets, whatever layout saved it.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL = ".partial"
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "num_experts", "moe_ffn_hidden_size",
                "mtp_num_layers", "kv_channels")


class CheckpointError(ValueError):
    pass


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from exc


def partial_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.endswith(PARTIAL))


# --------------------------------------------------------------------------------------------
# what goes in


def _rank_coordinates() -> tuple[tuple, tuple]:
    from megatron.core import parallel_state as ps

    shape = (ps.get_pipeline_model_parallel_world_size(),
             ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size(with_context_parallel=True))
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank(with_context_parallel=True))
    return shape, offset


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Mapping) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def unwrap(model):
    """The GPTModel inside DDP / Float16 wrappers: checkpoint keys must not depend on them."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded_state(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(chunk).sharded_state_dict()
            for i, chunk in enumerate(model_chunks)}


def _sharded_state(model_chunks, optimizer, include_optimizer: bool, include_rng: bool,
                   rng_layout: Optional[tuple], is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = _model_sharded_state(model_chunks)
    if include_optimizer and optimizer is not None:
        model_state = {}
        for value in state.values():
            model_state.update(value)
        # "fully_reshardable": the distributed optimizer's state is stored per parameter in
        # model space, so it loads at any TP/PP/DP (the other formats reshard only over DP).
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if include_rng:
        shape, offset = rng_layout or _rank_coordinates()
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), shape, offset,
                                           replica_id=0)
    return state


@dataclass
class CheckpointContents:
    """What a loaded checkpoint gives back besides tensors (already copied into the model)."""

    iteration: int
    common: dict
    path: str


# --------------------------------------------------------------------------------------------
# saving


def save_checkpoint(root: str, iteration: int, model_chunks: list, optimizer: Any,
                    common: Mapping[str, Any], keep_last: Optional[int] = None,
                    log: Callable[[str], None] = print) -> str:
    """Save collectively (call on every rank); returns the published directory."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = checkpoint_dir(root, iteration)
    partial = final + PARTIAL
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in partial_checkpoints(root):
            log(f" removing incomplete checkpoint {stale} (a save that did not finish)")
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(partial)
    torch.distributed.barrier()
    state = _sharded_state(model_chunks, optimizer, include_optimizer=True, include_rng=True,
                           rng_layout=None, is_loading=False)
    shape, _ = _rank_coordinates()
    state["common"] = dict(common, rng_layout=list(shape), iteration=iteration)
    dist_checkpointing.save(state, partial)
    torch.distributed.barrier()  # every rank's shards are on disk before publishing
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER))
        if keep_last:
            _prune(root, keep_last, log)
    torch.distributed.barrier()
    log(f" saved checkpoint at iteration {iteration:7d} to {final}")
    return final


def _prune(root: str, keep_last: int, log: Callable[[str], None]) -> None:
    complete = sorted(d for d in os.listdir(root)
                      if d.startswith("iter_") and not d.endswith(PARTIAL))
    for old in complete[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        log(f" removed old checkpoint {old} (keeping the last {keep_last})")


# --------------------------------------------------------------------------------------------
# loading


def _check_model_matches(saved: Mapping, current: Mapping, path: str) -> None:
    mismatched = [f"{name}: checkpoint {saved.get(name)!r}, this run {current.get(name)!r}"
                  for name in MODEL_FIELDS if saved.get(name) != current.get(name)]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model ({saved.get('name')!r} vs "
            f"{current.get('name')!r}); mismatched: " + "; ".join(mismatched))


def load_checkpoint(root: str, model_chunks: list, optimizer: Any, model_signature: Mapping,
                    *, load_optimizer: bool = True, load_rng: bool = True,
                    log: Callable[[str], None] = print) -> Optional[CheckpointContents]:
    """Load the newest complete checkpoint in ``root`` into the model (and optimizer).

    Returns None when ``root`` holds no checkpoint yet (a fresh start, e.g. the first job of
    an auto-resuming sbatch chain); a missing ``root`` is an error.
    """
    from megatron.core import dist_checkpointing

    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    for stale in partial_checkpoints(root):
        log(f" ignoring incomplete checkpoint {stale} (its save did not finish)")
    iteration = read_tracker(root)
    if iteration is None:
        log(f" no checkpoint in {root} ({TRACKER} not found): starting from iteration 0")
        return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {path} "
                              "does not exist")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    common = common.get("common", common)
    _check_model_matches(common.get("model", {}), model_signature, path)

    shape, _ = _rank_coordinates()
    rng_ok = load_rng and list(common.get("rng_layout", [])) == list(shape)
    if load_rng and not rng_ok:
        log(f" checkpoint RNG states are for layout {common.get('rng_layout')} (PP, TP, DP), "
            f"this run is {list(shape)}: not restoring RNG states")
    request = _sharded_state(model_chunks, optimizer, include_optimizer=load_optimizer,
                             include_rng=rng_ok, rng_layout=None, is_loading=True)
    try:
        loaded = dist_checkpointing.load(request, path, strict="raise_all")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in
                                                      range(len(model_chunks))]
    for name, chunk in zip(names, model_chunks):
        unwrap(chunk).load_state_dict(loaded[name])
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if rng_ok:
        _set_rng_state(loaded["rng_state"])
    log(f" loaded checkpoint {path} (iteration {iteration})")
    return CheckpointContents(iteration=iteration, common=common, path=path)
