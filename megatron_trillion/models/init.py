"""Layout-invariant initialisation: the same seed gives the same full weights at any TP/PP/EP/DP.

Interface::

    initialize_weights(model_chunks, seed)            # in place, every rank, no communication
    full = gather_full_tensors(model_chunks, "param" | "grad" | "main_grad")  # for tests

How: megatron-core's ``sharded_state_dict()`` describes every local parameter as a shard of a
global tensor (the same description distributed checkpointing uses to reshard): a global key,
the global shape, this rank's offsets, and ``data`` = a view into the local parameter. For each
shard we draw the *global* tensor from generators keyed only by (seed, key, offsets along the
axes megatron prepends for stacking, e.g. the expert index), and copy this rank's slice into the
view. Nothing depends on the rank or the layout, so every layout sees the same full weights.

To scale to 7B+ without materialising big tensors, a global tensor is drawn in fixed blocks of
rows (block size a function of the global shape only), each block from its own generator; a rank
draws only the row blocks that overlap its shard (a column-sharded weight draws all rows, one
block at a time).

Distributions (megatron-core's defaults): weights ~ N(0, init_method_std); the output
projections of residual branches (``linear_proj``, ``linear_fc2``, incl. experts) ~
N(0, init_method_std / sqrt(2 * num_layers)); norm weights = 1; biases, the MoE expert bias and
its SMEBU momentum = 0. A module may name constant initial values of its own parameters with
``initial_values()`` -> {parameter: value} (the depth-scaled sandwich post-norms do). Unknown
1-D tensors raise, so a new module type cannot silently get a wrong initialisation.
Vocabulary rows (embedding, output layer) are drawn as if the tensor had exactly the tokenizer's
rows, so the padding for the TP size (``models.vocab``) changes no real row; padded rows are 0.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Optional

import torch

from megatron_trillion.models.vocab import is_vocab_parallel_key, unpadded_vocab_size

_BLOCK_ELEMENTS = 1 << 20  # elements per generator block (rows x row length)


def _iter_shards(model_chunks: Iterable) -> Iterable:
    """Every ShardedTensor (factories built) of the given model chunks."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron.core import parallel_state

    # GPTModel reads the DP group from here when the last stage holds a copy of the embedding
    # for MTP (Megatron-LM's checkpointing passes the same).
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    for chunk in model_chunks:
        module = chunk
        while hasattr(module, "module"):
            module = module.module
        for value in nested_values(module.sharded_state_dict(metadata=metadata)):
            if isinstance(value, ShardedTensorFactory):
                built = value.build()
                items = built if isinstance(built, (list, tuple)) else nested_values(built)
                for sub in items:
                    if isinstance(sub, ShardedTensor):
                        yield sub
            elif isinstance(value, ShardedTensor):
                yield value


def _seed_for(seed: int, key: str, prefix: tuple, block: int) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{prefix}|{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _kind(key: str, ndim: int) -> str:
    name = key.rsplit(".", 1)[-1]
    if name in ("expert_bias", "expert_bias_momentum") or name == "bias" or \
            name.endswith("_bias"):
        return "zeros"
    if "norm" in key and name.endswith("weight"):
        return "ones"
    if ndim >= 2 and name.endswith("weight"):
        if ".linear_proj." in key or ".linear_fc2." in key:
            return "normal_out"
        return "normal"
    raise ValueError(
        f"initialize_weights: no initialisation rule for {key!r} ({ndim}-D); add one to "
        "megatron_trillion/models/init.py"
    )


def _draw_rows(shape: tuple, row_start: int, row_stop: int, std: float,
               seed_fn: Callable[[int], int]) -> torch.Tensor:
    """Rows [row_start, row_stop) of the global normal tensor of ``shape``."""
    row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, row_numel))
    first, last = row_start // rows_per_block, (row_stop - 1) // rows_per_block
    parts = []
    for block in range(first, last + 1):
        b0 = block * rows_per_block
        b1 = min(shape[0], b0 + rows_per_block)
        gen = torch.Generator().manual_seed(seed_fn(block))
        values = torch.empty((b1 - b0,) + tuple(shape[1:]), dtype=torch.float32)
        values.normal_(0.0, std, generator=gen)
        lo, hi = max(row_start, b0) - b0, min(row_stop, b1) - b0
        parts.append(values[lo:hi])
    return torch.cat(parts, dim=0)


@torch.no_grad()
def initialize_weights(model_chunks, seed: int, *, init_method_std: Optional[float] = None,
                       num_layers: Optional[int] = None) -> int:
    """Overwrite all parameters (and the expert-bias buffers) of ``model_chunks`` in place.

    ``model_chunks``: a model or a list of (possibly DDP-wrapped) model chunks. Defaults for
    ``init_method_std`` / ``num_layers`` come from the model's TransformerConfig. Returns the
    number of local elements written. Call it before building the optimizer (or copy into
    its fp32 main params afterwards).
    """
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    module = model_chunks[0]
    while hasattr(module, "module"):
        module = module.module
    config = module.config
    std = config.init_method_std if init_method_std is None else init_method_std
    layers = config.num_layers if num_layers is None else num_layers
    out_std = std / math.sqrt(2.0 * layers)
    constants = _module_initial_values(model_chunks)
    written = 0
    vocab_size = unpadded_vocab_size(module)
    for shard in _iter_shards(model_chunks):
        data = shard.data
        targets = [data, *_high_precision_copy(data)]
        n_pre = shard.prepend_axis_num
        constant = constants.get((data.data_ptr(), data.numel()))
        if constant is not None:
            for target in targets:
                target.fill_(constant)
            written += data.numel()
            continue
        kind = _kind(shard.key, len(shard.global_shape) - n_pre)
        if kind in ("zeros", "ones"):
            for target in targets:
                target.fill_(0.0 if kind == "zeros" else 1.0)
            written += data.numel()
            continue
        gshape = tuple(shard.global_shape[n_pre:])
        offsets = tuple(shard.global_offset[n_pre:])
        prefix = tuple(shard.global_offset[:n_pre])
        local = tuple(data.shape)
        if len(local) != len(gshape):
            raise ValueError(f"initialize_weights: shard {shard.key!r} has local shape {local} "
                             f"for global shape {gshape}")

        def seed_fn(block: int, _key=shard.key, _prefix=prefix) -> int:
            return _seed_for(seed, _key, _prefix, block)

        row_stop = offsets[0] + local[0]
        if is_vocab_parallel_key(shard.key):
            gshape = (vocab_size,) + gshape[1:]
            row_stop = min(row_stop, vocab_size)
            for target in targets:
                target.zero_()  # padded rows
        written += data.numel()
        if row_stop <= offsets[0]:
            continue
        rows = _draw_rows(gshape, offsets[0], row_stop,
                          out_std if kind == "normal_out" else std, seed_fn)
        index = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offsets[1:], local[1:]))
        for target in targets:
            target[: rows.size(0)].copy_(rows[index].to(target.dtype))
    return written


def _high_precision_copy(param) -> list:
    """``[the high-precision initial value]`` Transformer Engine keeps beside an FP8 weight,
    or ``[]``.

    megatron-core builds FP8 weights (``--fp8-param-gather``) with TE's
    ``preserve_high_precision_init_val``: each keeps its initial value before quantisation,
    and the distributed optimizer builds its fp32 main weights from that copy (then clears
    it). Writing only the quantised weight would leave megatron-core's default initialisation
    there, and training would start from it after the first step."""
    getter = getattr(param, "get_high_precision_init_val", None)
    value = getter() if callable(getter) else None
    return [value] if value is not None else []


def _module_initial_values(model_chunks) -> dict:
    """{(data pointer, numel): value} of the parameters whose modules name their initial value
    (such parameters are never sharded: their shard is the whole tensor)."""
    values = {}
    for chunk in model_chunks:
        for module in chunk.modules():
            if hasattr(module, "initial_values"):
                for tensor, value in module.initial_values().items():
                    values[(tensor.data_ptr(), tensor.numel())] = float(value)
    return values


def _owner_lookup(model_chunks) -> dict:
    owners = {}
    for chunk in model_chunks:
        for param in chunk.parameters():
            owners[param.data.untyped_storage().data_ptr()] = param
    return owners


def _grad_view(data: torch.Tensor, owners: dict, attr: str) -> Optional[torch.Tensor]:
    param = owners.get(data.untyped_storage().data_ptr())
    if param is None:
        return None
    grad = getattr(param, attr, None)
    if grad is None:
        return None
    if grad.shape != param.shape or grad.stride() != param.data.stride():
        grad = grad.reshape(param.shape).contiguous()
    offset = data.storage_offset() - param.data.storage_offset()
    return grad.as_strided(data.shape, data.stride(), grad.storage_offset() + offset)


@torch.no_grad()
def gather_full_tensors(model_chunks, what: str = "param", group=None) -> dict:
    """Full (unsharded) tensors keyed by ``key`` (+ ``[i]`` per prepended axis, e.g. expert i).

    ``what``: "param", "grad" or "main_grad" (megatron DDP's fp32 grad buffer). Collective over
    ``group`` (default: the world); every rank returns the same dict. For tests and small models
    only: the whole model is assembled on every rank.
    """
    import torch.distributed as dist

    if what not in ("param", "grad", "main_grad"):
        raise ValueError(f"what must be 'param', 'grad' or 'main_grad', got {what!r}")
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    owners = _owner_lookup(model_chunks) if what != "param" else {}
    local = []
    for shard in _iter_shards(model_chunks):
        tensor = shard.data if what == "param" else _grad_view(shard.data, owners, what)
        if tensor is None:
            continue
        n_pre = shard.prepend_axis_num
        name = shard.key + "".join(f"[{i}]" for i in shard.global_offset[:n_pre])
        local.append((name, tuple(shard.global_shape[n_pre:]),
                      tuple(shard.global_offset[n_pre:]), tensor.detach().float().clone()))
    if dist.is_initialized():
        everything = [None] * dist.get_world_size(group)
        dist.all_gather_object(everything, local, group=group)
    else:
        everything = [local]
    full: dict = {}
    covered: dict = {}
    for pieces in everything:
        for name, gshape, offsets, tensor in pieces:
            target = full.setdefault(name, torch.zeros(gshape))
            mask = covered.setdefault(name, torch.zeros(gshape, dtype=torch.bool))
            index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
            target[index] = tensor
            mask[index] = True
    missing = [name for name, m in covered.items() if not bool(m.all())]
    if missing:
        raise RuntimeError(f"gather_full_tensors: no rank holds parts of {missing[:5]}")
    return full
