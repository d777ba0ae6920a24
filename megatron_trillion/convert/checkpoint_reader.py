"""Read a megatron-trillion torch_dist checkpoint tensor by tensor, in one process, no GPU.

megatron-core stores every model tensor under a *global* key with its global shape, whatever
TP/PP/EP layout saved it (each rank writes its chunk at its global offsets). This reader lists
the keys from the checkpoint's metadata and asks megatron-core's loader for exactly one
(per-layer, per-expert) slice at a time, so memory stays at the size of the largest single
weight matrix, never the model.

Two storage shapes exist for the same weight and both are handled:

* per-layer keys ``decoder.layers.3.self_attention.linear_qkv.weight`` (megatron-core 0.16 with
  heterogeneous layer lists) and layer-stacked keys ``decoder.layers.self_attention...`` with a
  prepended layer axis;
* megatron's *checkpoint* names, which follow the Transformer Engine module names even for the
  local spec (``input_layernorm.weight`` is stored as ``self_attention.linear_qkv.
  layer_norm_weight``; the experts of a SequentialMLP as ``mlp.experts.experts.*`` with a
  prepended expert axis).

Callers ask by the names of a TP1 local-spec model's ``state_dict()`` (the *canonical* names the
architecture mappings in this package use), e.g. ``decoder.layers.3.input_layernorm.weight`` or
``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import torch

from megatron_trillion.errors import UserError

_LAYER = re.compile(r"^(?P<prefix>decoder\.layers\.)(?P<layer>\d+)\.(?P<rest>.+)$")
_EXPERT = re.compile(r"^(?P<prefix>mlp\.experts\.)local_experts\.(?P<expert>\d+)\.(?P<rest>.+)$")
# canonical (local spec) suffix -> the name megatron-core writes into checkpoints
_CHECKPOINT_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


class MissingTensorError(UserError):
    """The checkpoint lacks a tensor the architecture needs (the message names it)."""


@dataclasses.dataclass(frozen=True)
class _Location:
    key: str
    index: tuple[int, ...]
    """Positions along the key's leading (prepended layer / expert) axes."""


class CheckpointReader:
    """One complete checkpoint of a ``--save`` directory: its run metadata and its tensors.

    Must be used inside an initialised torch.distributed process group (one gloo rank is
    enough: ``initialize_distributed(ParallelSizes())``), as megatron-core's loader needs one.
    """

    def __init__(self, root: str, iteration: Optional[int] = None) -> None:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron_trillion.models.presets import ModelPreset
        from megatron_trillion.training.checkpointing import (
            CheckpointError,
            checkpoint_dir,
            load_dir_problem,
            read_tracker,
        )

        problem = load_dir_problem(root, may_be_absent=False)
        if problem:
            raise CheckpointError(problem)
        if iteration is None:
            iteration = read_tracker(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no latest_checkpointed_iteration.txt, i.e. "
                                  "no complete checkpoint in this directory")
        self.iteration = iteration
        self.path = checkpoint_dir(root, iteration)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{root} names iteration {iteration} but {self.path} is missing")
        try:
            common = dist_checkpointing.load_common_state_dict(self.path)
            metadata = FileSystemReader(self.path).read_metadata()
        except Exception as exc:  # noqa: BLE001 - any reader failure = unusable checkpoint
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from exc
        self.common = common.get("common", common)
        signature = self.common.get("model")
        if not signature:
            raise CheckpointError(f"{self.path}: no model signature in the checkpoint's common "
                                  "state (not written by megatron-trillion?)")
        fields = {f.name for f in dataclasses.fields(ModelPreset)}
        self.preset = ModelPreset(**{k: v for k, v in signature.items() if k in fields})
        self.run_config: dict = dict(self.common.get("config", {}))
        self._tensors = {key: md for key, md in metadata.state_dict_metadata.items()
                         if isinstance(md, TensorStorageMetadata)}

    # ----------------------------------------------------------------------------------------

    def _stored(self, key: str, index: tuple[int, ...]) -> bool:
        md = self._tensors.get(key)
        if md is None or len(md.size) < len(index):
            return False
        # A key can exist with only some of its slices written (e.g. a stacked dense-MLP key
        # when only the first layers are dense): the slice must lie in a stored chunk.
        return any(all(off <= i < off + size for i, off, size in
                       zip(index, chunk.offsets, chunk.sizes)) for chunk in md.chunks)

    def _locate(self, name: str) -> Optional[_Location]:
        names = [name]
        layer = _LAYER.match(name)
        if layer:
            rest = layer["rest"]
            if rest in _CHECKPOINT_ALIASES:
                names.insert(0, f"{layer['prefix']}{layer['layer']}.{_CHECKPOINT_ALIASES[rest]}")
        for candidate in names:
            for location in _locations(candidate):
                if self._stored(location.key, location.index):
                    return location
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` from the checkpoint's metadata (nothing is read)."""
        location = self._require(name)
        return tuple(self._tensors[location.key].size)[len(location.index):]

    def _require(self, name: str) -> _Location:
        location = self._locate(name)
        if location is None:
            raise MissingTensorError(
                f"checkpoint {self.path} has no tensor {name!r} (needed by the "
                f"{self.preset.name!r} architecture); the checkpoint is incomplete or was saved "
                "for another model")
        return location

    def get(self, name: str) -> torch.Tensor:
        """The tensor a TP1 local-spec model calls ``name``, read from disk."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        location = self._require(name)
        md = self._tensors[location.key]
        depth = len(location.index)
        # The slice is requested as a [1, ..., 1, *rest] fragment of the global tensor (not with
        # prepended axes: megatron-core's loader then expects the whole regular grid of slices
        # in one process).
        buffer = torch.empty((1,) * depth + tuple(md.size)[depth:], dtype=md.properties.dtype)
        offsets = [(axis, i, md.size[axis]) for axis, i in enumerate(location.index)]
        request = {"t": ShardedTensor.from_rank_offsets(location.key, buffer, *offsets,
                                                        replica_id=0)}
        loaded = dist_checkpointing.load(request, self.path, validate_access_integrity=False)
        return loaded["t"].reshape(buffer.shape[depth:])


def _locations(name: str):
    """Where ``name`` may be stored: as itself, layer-stacked, and for experts expert-stacked."""
    yield _Location(name, ())
    layer = _LAYER.match(name)
    if not layer:
        return
    i = int(layer["layer"])
    rest = layer["rest"]
    yield _Location(layer["prefix"] + rest, (i,))
    expert = _EXPERT.match(rest)
    if expert:
        e = int(expert["expert"])
        suffix = f"{expert['prefix']}experts.{expert['rest']}"
        yield _Location(f"{layer['prefix']}{i}.{suffix}", (e,))
        yield _Location(layer["prefix"] + suffix, (i, e))
