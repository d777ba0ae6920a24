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
every tensor by its global key and offsets, whatever layout saved it (the optimizer is saved
"fully_reshardable"); RNG states are restored only at the layout that saved them. The model
signature holds the tokenizer's vocabulary size; the rows padded for TP are zero and loaded
with megatron-core's ``allow_shape_mismatch`` (see ``models.vocab``), so TP sizes that pad
differently load each other's checkpoints.

Async save (``--async-save``): megatron-core's torch_dist strategy writes the shards from a
forked background process (``AsyncCallsQueue``) while training continues; the publish step
(rename + tracker) runs as its finalize function once every rank's writer is done, checked at
each step boundary (one small all-reduce per step while a save is in flight). What stays
synchronous: building the sharded state dict, which for the distributed optimizer's
"fully_reshardable" format gathers the optimizer state over DP, the common-state and
save-plan collectives, and on GPU the device-to-host copy of this rank's shards (host memory
for one extra copy of them). On CPU tensors are already in host memory: the fork's
copy-on-write pages are the snapshot, so memory grows by the pages training rewrites while
the writer runs (at most one copy of the state). A save requested before the previous one is
published waits for it. Works under gloo on CPU (tested).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL = ".partial"
REPLACED = ".replaced"  # the previous copy of an iteration being saved again
# dist_checkpointing writes this file last (after every rank's shards): without it a
# directory is not a complete checkpoint.
METADATA_FILE = "metadata.json"
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "num_experts", "moe_ffn_hidden_size",
                "mtp_num_layers", "kv_channels")


class CheckpointError(ValueError):
    pass


# The per-rank object a save may carry besides the RNG states (e.g. a GRPO rollout that later
# steps still train on).
RANK_STATE = "rank_state"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from exc


def partial_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.endswith(PARTIAL))


def complete_checkpoints(root: str) -> list[int]:
    """Iterations of the published checkpoints in ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("iter_") and not name.endswith(PARTIAL):
            try:
                found.append(int(name[len("iter_"):]))
            except ValueError:
                continue
    return sorted(found)


def read_common(path: str) -> dict:
    """The non-tensor part of the checkpoint directory ``path`` (see the lead's notes)."""
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {METADATA_FILE} "
                              "is missing (its save did not finish)")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read its common state "
                              f"({type(exc).__name__}: {exc})") from exc
    return common.get("common", common)


def verify_shard_files(path: str) -> None:
    """Raise naming the first shard file that is missing or shorter than the checkpoint's
    index says (a full disk, a copy cut short): torch's own error for it is a bare EOFError."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(path).read_metadata().storage_data
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read its index "
                              f"(.metadata): {type(exc).__name__}: {exc}") from exc
    needed: dict[str, int] = {}
    for info in storage.values():
        end = (info.offset or 0) + (info.length or 0)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            raise CheckpointError(f"checkpoint {path} is corrupt: shard file {name} is missing")
        actual = os.path.getsize(shard)
        if actual < size:
            raise CheckpointError(f"checkpoint {path} is corrupt: shard file {name} is "
                                  f"truncated ({actual} bytes, its index needs {size})")


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


def rank_layout() -> list:
    """This run's (PP, TP, DP) sizes: a checkpoint's per-rank objects load at the layout its
    common state records as ``rng_layout``."""
    return list(_rank_coordinates()[0])


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


def finish_param_sync(model_chunks: list) -> None:
    """Bring this rank's full weights up to date (collective; call on every rank).

    With ``--overlap-param-gather`` the distributed optimizer's step updates only the weight
    shard this rank owns and leaves the all-gather of the others to the forward pre-hooks of
    the next forward pass: until then the model holds the previous step's weights for the
    shards of other ranks, and a save (whose model tensors DP rank 0 writes) would store them.
    Megatron-LM finishes the gather the same way before a save (``start_param_sync(
    force_sync=True)``, through ``disable_forward_pre_hook``); the next forward then finds it
    done and gathers nothing."""
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and \
                ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _chunk_sharded_state(chunk) -> dict:
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    # GPTModel.sharded_state_dict reads metadata["dp_cp_group"] itself when the MTP block sits
    # on a stage without the embedding (PP > 1), but only fills it in for its parent class:
    # pass it explicitly.
    return unwrap(chunk).sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))


def _model_sharded_state(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return {"model": _chunk_sharded_state(model_chunks[0])}
    return {f"model{i}": _chunk_sharded_state(chunk) for i, chunk in enumerate(model_chunks)}


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def keeps_step_per_parameter(inner_optimizer) -> bool:
    """Whether the optimizer keeps Adam's ``step`` in each parameter's state.

    torch's Adam/AdamW do (created by their first ``step()``). TE's and apex's FusedAdam keep it
    in the param groups, and TE's ``state_dict()`` looks every per-parameter state name up in
    its ``name_to_dtype_map`` (exp_avg, exp_avg_sq, master_param): a ``step`` there is a
    ``KeyError``."""
    return isinstance(inner_optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _allocate_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer the state a first step would create, and no other.

    The distributed optimizer's ``sharded_state_dict(is_loading=True)`` reads the inner
    optimizer's per-parameter state (and, for torch's Adam, its per-parameter ``step``, which
    torch creates only on the first ``step()``), so a fresh run cannot build its load request
    without it. The values are placeholders: the load overwrites every one of them.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for leaf in _leaf_optimizers(optimizer):
        if not isinstance(leaf, DistributedOptimizer) or len(leaf.optimizer.state) > 0:
            continue
        if leaf.init_state_fn is None:
            continue
        leaf.init_state_fn(leaf.optimizer, leaf.config)
        if not keeps_step_per_parameter(leaf.optimizer):
            continue
        for group in leaf.optimizer.param_groups:
            for param in group["params"]:
                leaf.optimizer.state[param].setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def _param_state_load_without_step(optimizer):
    """Let the distributed optimizer load "fully_reshardable" state into torch's Adam.

    megatron-core copies every key of torch Adam's per-parameter state from the checkpoint
    but leaves out ``step`` (restored from the param groups instead), so with torch's Adam
    (no apex/TE, e.g. on CPU) the copy fails with ``KeyError: 'step'``. Hide ``step`` during
    that copy, on these optimizer instances only.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for leaf in _leaf_optimizers(optimizer):
        if not isinstance(leaf, DistributedOptimizer):
            continue
        original = leaf._set_main_param_and_optimizer_states

        def without_step(model_param, tensors, leaf=leaf, original=original):
            group_index, group_order = leaf.model_param_group_index_map[model_param]
            main_param = leaf.optimizer.param_groups[group_index]["params"][group_order]
            state = leaf.optimizer.state[main_param]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        leaf._set_main_param_and_optimizer_states = without_step
        patched.append(leaf)
    try:
        yield
    finally:
        for leaf in patched:
            del leaf._set_main_param_and_optimizer_states
    # megatron-core hands every parameter the *same* ``step`` tensor; torch's Adam increments
    # it in place once per parameter, so after a resume the bias correction would run ahead.
    for leaf in patched:
        for state in leaf.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _sharded_state(model_chunks, optimizer, include_optimizer: bool, include_rng: bool,
                   is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = _model_sharded_state(model_chunks)
    if include_optimizer and optimizer is not None:
        model_state = {}
        for value in state.values():
            model_state.update(value)
        if is_loading:
            _allocate_optimizer_state(optimizer)
        # "fully_reshardable": the distributed optimizer's state is stored per parameter in
        # model space, so it loads at any TP/PP/DP (the other formats reshard only over DP).
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if include_rng:
        shape, offset = _rank_coordinates()
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


def publish_checkpoint(root: str, iteration: int, keep_last: Optional[int] = None,
                       log: Callable[[str], None] = print) -> None:
    """Rank 0, after every rank's shards are in ``iter_N.partial``: make ``iter_N`` the newest
    checkpoint (rename, then a synced tracker), so a kill at any point leaves either the old
    newest checkpoint or the new one, never a half-written one that looks complete."""
    final = checkpoint_dir(root, iteration)
    if os.path.exists(final):  # saving an iteration again (resumed from an older one)
        # Set the old copy aside rather than deleting it first: a kill between the two renames
        # leaves it loadable (see resolve_checkpoint).
        shutil.rmtree(final + REPLACED, ignore_errors=True)
        os.replace(final, final + REPLACED)
    os.replace(final + PARTIAL, final)
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    shutil.rmtree(final + REPLACED, ignore_errors=True)
    if keep_last:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(checkpoint_dir(root, old), ignore_errors=True)
            log(f" removed old checkpoint iter_{old:07d} (keeping the last {keep_last})")


class CheckpointSaver:
    """Saves to one ``--save`` directory, synchronously or in the background (``async_save``).

    Every method is collective: call it on every rank, at the same point of the run.
    """

    def __init__(self, root: str, keep_last: Optional[int] = None, async_save: bool = False,
                 log: Callable[[str], None] = print) -> None:
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"--ckpt-keep-last must be >= 1, got {keep_last}")
        self.root = root
        self.keep_last = keep_last
        self.log = log
        # The iteration of the newest save started (published, or being written in the
        # background): saving it again would only repeat the work.
        self.last_saved_iteration: Optional[int] = None
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def save(self, iteration: int, model_chunks: list, optimizer: Any,
             common: Mapping[str, Any], rank_state: Any = None) -> str:
        """Write checkpoint ``iteration``; returns the directory it is (or will be) published as.
        ``rank_state``: an object of this rank's own (not None on every rank or on none),
        read back by ``load_rank_state`` at the same layout."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        # One save in flight at a time: a new one waits for the previous to be published.
        self.wait()
        rank = torch.distributed.get_rank()
        final = checkpoint_dir(self.root, iteration)
        partial = final + PARTIAL
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in partial_checkpoints(self.root):
                self.log(f" removing incomplete checkpoint {stale} (a save that did not finish)")
                shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(partial)
        torch.distributed.barrier()
        finish_param_sync(model_chunks)
        state = _sharded_state(model_chunks, optimizer, include_optimizer=True,
                               include_rng=True, is_loading=False)
        shape, offset = _rank_coordinates()
        if rank_state is not None:
            state[RANK_STATE] = ShardedObject(RANK_STATE, rank_state, shape, offset,
                                              replica_id=0)
        state["common"] = dict(common, rng_layout=list(shape), iteration=iteration)
        request = dist_checkpointing.save(state, partial, async_sharded_save=self.is_async)
        self.last_saved_iteration = iteration
        if request is None:
            self._finish(iteration)
        else:
            request.add_finalize_fn(lambda: self._finish(iteration))
            self._queue.schedule_async_request(request)
            self.log(f" saving checkpoint at iteration {iteration:7d} in the background")
        return final

    @property
    def is_async(self) -> bool:
        return self._queue is not None

    def _finish(self, iteration: int) -> None:
        torch.distributed.barrier()  # every rank's shards are on disk before publishing
        if torch.distributed.get_rank() == 0:
            publish_checkpoint(self.root, iteration, self.keep_last, self.log)
        torch.distributed.barrier()
        self.log(f" saved checkpoint at iteration {iteration:7d} to "
                 f"{checkpoint_dir(self.root, iteration)}")

    def poll(self) -> None:
        """Publish a background save that every rank has finished (cheap; a collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until the background save (if any) is written and published."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)


def save_checkpoint(root: str, iteration: int, model_chunks: list, optimizer: Any,
                    common: Mapping[str, Any], keep_last: Optional[int] = None,
                    log: Callable[[str], None] = print) -> str:
    """Save synchronously (call on every rank); returns the published directory."""
    return CheckpointSaver(root, keep_last, log=log).save(iteration, model_chunks, optimizer,
                                                          common)


# --------------------------------------------------------------------------------------------
# loading


def load_may_be_absent(load: Optional[str], save: Optional[str], finetune: bool) -> bool:
    """Whether ``--load`` may name a directory that does not exist yet: only when it is also
    ``--save`` (an auto-resuming run, whose first job creates it) and not a ``--finetune``
    start. Any other ``--load`` is a checkpoint to start from, and a typo there must not
    silently train from scratch."""
    return bool(load and save) and not finetune and \
        os.path.realpath(load) == os.path.realpath(save)


def load_dir_problem(root: str, may_be_absent: bool) -> Optional[str]:
    """Why ``--load root`` holds nothing to start from, or None (``may_be_absent``: see
    :func:`load_may_be_absent`; such a directory may also exist and be empty)."""
    if not os.path.exists(root):
        if may_be_absent:
            return None
        return (f"--load {root}: no such directory (a run that resumes where it saves gives "
                "--save and --load the same directory, which the first job creates)")
    if not os.path.isdir(root):
        return f"--load {root} is a file, not a checkpoint directory (the --save of a run)"
    if may_be_absent:
        return None
    try:
        if read_tracker(root) is not None or complete_checkpoints(root):
            return None
    except CheckpointError as exc:
        return str(exc)
    if os.path.isfile(os.path.join(root, METADATA_FILE)):
        return (f"--load {root} is one checkpoint's directory: give the run's directory "
                f"({os.path.dirname(os.path.abspath(root))}), with --ckpt-step for an older "
                "iteration")
    return (f"--load {root} holds no checkpoint (no {TRACKER}, no iter_* directory); only "
            "a run that resumes where it saves (--save and --load the same directory) may "
            "start from an empty one")


def check_model_matches(saved: Mapping, current: Mapping, path: str) -> None:
    """Raise naming every architecture field in which the checkpoint's model differs."""
    mismatched = [f"{name}: checkpoint {saved.get(name)!r}, this run {current.get(name)!r}"
                  for name in MODEL_FIELDS if saved.get(name) != current.get(name)]
    if mismatched:
        # vocab_size is the tokenizer's (unpadded) size: the TP padding never mismatches.
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model ({saved.get('name')!r} vs "
            f"{current.get('name')!r}); mismatched: " + "; ".join(mismatched))


def resolve_checkpoint(root: str, iteration: Optional[int] = None,
                       log: Callable[[str], None] = print,
                       may_not_exist: bool = False) -> Optional[str]:
    """The directory to load from ``--load root`` (``iteration``: ``--ckpt-step``).

    None when ``root`` holds no checkpoint yet (the first job of an auto-resuming chain), or
    does not exist and ``may_not_exist`` (it is also the run's ``--save``, as in Megatron-LM's
    ``--save X --load X`` habit); otherwise a missing ``root``, a missing requested iteration
    or a tracker naming a missing directory are errors.
    """
    problem = load_dir_problem(root, may_not_exist and iteration is None)
    if problem:
        raise CheckpointError(problem)
    if not os.path.isdir(root):
        log(f" no checkpoint in {root} (not created yet): starting from iteration 0")
        return None
    for stale in partial_checkpoints(root):
        log(f" ignoring incomplete checkpoint {stale} (its save did not finish)")
    if iteration is not None:
        path = checkpoint_dir(root, iteration)
        if not os.path.isdir(path):
            raise CheckpointError(f"--ckpt-step {iteration}: {path} does not exist (complete "
                                  f"checkpoints in {root}: {complete_checkpoints(root)})")
        return path
    iteration = read_tracker(root)
    if iteration is None:
        published = complete_checkpoints(root)
        if not published:  # an empty --save X --load X (load_dir_problem refused the others)
            log(f" no checkpoint in {root} ({TRACKER} not found): starting from iteration 0")
            return None
        # Killed between publishing the first checkpoint (rename) and writing the tracker:
        # a renamed directory is complete, so take the newest.
        iteration = published[-1]
        log(f" {root} has no {TRACKER}; loading the newest published checkpoint "
            f"(iteration {iteration})")
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + REPLACED):
        log(f" {path} was being replaced when the run stopped: loading its previous copy")
        return path + REPLACED
    if not os.path.isdir(path):
        raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {path} "
                              "does not exist")
    return path


def load_checkpoint(root: str, model_chunks: list, optimizer: Any, model_signature: Mapping,
                    *, load_optimizer: bool = True, load_rng: bool = True,
                    iteration: Optional[int] = None, log: Callable[[str], None] = print,
                    without_mtp: bool = False,
                    may_not_exist: bool = False) -> Optional[CheckpointContents]:
    """Load the newest complete checkpoint in ``root`` (or ``iteration``) into the model chunks
    (and optimizer). Collective. Returns None when ``root`` holds no checkpoint yet.

    ``without_mtp``: the model was deliberately built without the checkpoint's MTP layers
    (evaluation); they are then not compared nor loaded. ``may_not_exist``: see
    ``resolve_checkpoint``."""
    path = resolve_checkpoint(root, iteration, log, may_not_exist)
    if path is None:
        return None
    return load_checkpoint_dir(path, model_chunks, optimizer, model_signature,
                               load_optimizer=load_optimizer, load_rng=load_rng, log=log,
                               without_mtp=without_mtp)


def load_checkpoint_dir(path: str, model_chunks: list, optimizer: Any,
                        model_signature: Mapping, *, load_optimizer: bool = True,
                        load_rng: bool = True, log: Callable[[str], None] = print,
                        without_mtp: bool = False) -> CheckpointContents:
    """``load_checkpoint`` from one checkpoint directory (``iter_N``)."""
    from megatron.core import dist_checkpointing

    common = read_common(path)
    verify_shard_files(path)
    saved = dict(common.get("model", {}))
    if without_mtp:
        saved["mtp_num_layers"] = model_signature.get("mtp_num_layers")
    check_model_matches(saved, model_signature, path)

    shape, _ = _rank_coordinates()
    rng_ok = load_rng and list(common.get("rng_layout", [])) == list(shape)
    if load_rng and not rng_ok:
        log(f" checkpoint RNG states are for layout {common.get('rng_layout')} (PP, TP, DP), "
            f"this run is {list(shape)}: not restoring RNG states")
    request = _sharded_state(model_chunks, optimizer, include_optimizer=load_optimizer,
                             include_rng=rng_ok, is_loading=True)
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in
                                                      range(len(model_chunks))]
    # The expert-bias rule may change at a resume: a checkpoint of the sign rule has no SMEBU
    # momentum, which then starts at zero as in a fresh SMEBU run (the reverse just leaves the
    # saved momentum unread).
    fresh = {name: [] for name in names}
    if saved.get("moe_router_bias_update_style", "sign") != "smebu" and \
            model_signature.get("moe_router_bias_update_style") == "smebu":
        for name in names:
            fresh[name] = [k for k in request[name] if k.endswith(".expert_bias_momentum")]
            for key in fresh[name]:
                del request[name][key]
        log(f" checkpoint {path} was trained with the "
            f"{saved.get('moe_router_bias_update_style', 'sign')!r} expert-bias rule: SMEBU's "
            "momentum starts at zero")
    try:
        # Every tensor this run needs must be in the checkpoint ("unexpected" keys raise);
        # the checkpoint may hold more (optimizer, RNG) when those are deliberately skipped.
        loaded = dist_checkpointing.load(request, path, strict="raise_unexpected")
    except (KeyboardInterrupt, SystemExit):
        raise
    # torch.distributed.checkpoint's CheckpointException (a failed read, e.g. a truncated
    # shard) derives from BaseException, not Exception.
    except BaseException as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt or does not fit this model: "
                              f"{type(exc).__name__}: {exc}") from exc
    for name, chunk in zip(names, model_chunks):
        if fresh[name]:
            current = unwrap(chunk).state_dict()
            loaded[name].update({key: current[key] for key in fresh[name]})
        unwrap(chunk).load_state_dict(loaded[name])
    if load_optimizer and optimizer is not None:
        with _param_state_load_without_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        # Weights only (--finetune, --no-load-optim): with BF16/FP16 the optimizer's fp32 main
        # copies still hold the initial weights and its first step would write them back over
        # the loaded ones (Megatron-LM reloads them the same way).
        optimizer.reload_model_params()
    if rng_ok:
        _set_rng_state(loaded["rng_state"])
    log(f" loaded checkpoint {path} (iteration {common.get('iteration')})")
    return CheckpointContents(iteration=int(common.get("iteration", 0)), common=common,
                              path=path)


def load_rank_state(path: str) -> Any:
    """The ``rank_state`` this rank saved in checkpoint directory ``path`` (collective). The
    caller checks that the checkpoint's layout (``rng_layout`` of its common state) is this
    run's: each rank reads the object of its own (PP, TP, DP) coordinates."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape, offset = _rank_coordinates()
    request = {RANK_STATE: ShardedObject(RANK_STATE, None, shape, offset, replica_id=0)}
    try:
        return dist_checkpointing.load(request, path, strict="raise_unexpected")[RANK_STATE]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001  (see load_checkpoint_dir)
        raise CheckpointError(f"checkpoint {path}: cannot read this rank's saved state: "
                              f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# a model straight from a checkpoint


def preset_from_signature(signature: Mapping):
    """The ``ModelPreset`` a checkpoint's ``common["model"]`` describes."""
    import dataclasses

    from megatron_trillion.models.presets import ModelPreset

    return ModelPreset(**{f.name: signature[f.name] for f in dataclasses.fields(ModelPreset)
                          if f.name in signature})


def load_model(root: str, iteration: Optional[int] = None, log: Callable[[str], None] = print):
    """(GPTModel, common) rebuilt from the checkpoint's preset at the current parallel layout.

    Collective over the initialised process groups: the model is built for this rank's
    TP/PP/EP position and the weights are resharded from whatever layout saved them (no
    optimizer, no RNG). For evaluation: dropout off, eval mode, and without the MTP layers
    (they only serve training, and need labels in the forward pass).
    """
    import dataclasses

    from megatron_trillion.data.attention_blocks import MASKING_NONE
    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.platform.device import compute_device

    path = resolve_checkpoint(root, iteration, log)
    common = read_common(path)
    signature = dict(common["model"], mtp_num_layers=0)
    preset = dataclasses.replace(preset_from_signature(signature), mtp_num_layers=0)
    config = build_transformer_config(preset, None, hidden_dropout=0.0, attention_dropout=0.0)
    divisible_by = common.get("config", {}).get("make_vocab_size_divisible_by") or 128
    model = build_model(preset, config=config, attention_masking=MASKING_NONE,
                        make_vocab_size_divisible_by=divisible_by).to(compute_device())
    load_checkpoint_dir(path, [model], None, signature, load_optimizer=False, load_rng=False,
                        log=log, without_mtp=True)
    model.eval()
    return model, common
