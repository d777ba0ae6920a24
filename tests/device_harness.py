"""Make a wrongly placed tensor fail on a CPU-only machine.

On CPU the compute device and host memory are the same, so a batch never moved to the device
or a collective on a tensor created without ``device=`` runs fine here and fails only on the
first GPU node. ``install()`` separates the two again:

* host memory: the model inputs of every micro-batch the data pipeline hands out
  (``StepBatches.for_step``) become :class:`HostTensor`, which the host can read (``tolist``,
  shapes) and copy to the device (``.to(device)``) but nothing can compute with;
* tensors created without an explicit device: inside the training loop the default device is
  ``meta``, so they hold no data and fail wherever they are used;
* every ``torch.distributed`` collective and every ``GPTModel.forward`` checks that each
  tensor it gets is a device tensor: on ``platform.device.compute_device()`` and not host
  memory. A violation raises :class:`Misplaced` naming the call and the argument.

``install()`` returns the counters of checked calls, so a test can assert the checks ran.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch


class Misplaced(AssertionError):
    """A tensor reached the model or a collective from the wrong place."""


class HostTensor(torch.Tensor):
    """Host memory: readable on the host and copyable to the device, nothing else."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.cuda or (func is torch.Tensor.to and _names_device(
                    args[1:], kwargs)):
                # The host-to-device copy. On CPU ``.to("cpu")`` returns the same storage;
                # the copy makes the result device memory, as on a GPU.
                moved = func(*args, **kwargs)
                return moved.clone() if moved.data_ptr() == args[0].data_ptr() else moved
            if name in _HOST_READS or func is torch.Tensor.to:  # .to(dtype): stays on the host
                result = func(*args, **kwargs)
                return result.as_subclass(HostTensor) if torch.is_tensor(result) else result
        raise Misplaced(
            f"torch.{name} on a host (not yet moved) batch tensor: the model inputs must be "
            "moved to the compute device first (platform.device.to_device in forward_step)")


def _names_device(args: tuple, kwargs: dict) -> bool:
    values = [*args, kwargs.get("device")]
    return any(isinstance(v, (torch.device, str, int)) and not isinstance(v, bool)
               for v in values if v is not None)


# Reading on the host and copying: what the data pipeline and the host-side bookkeeping (FLOPs
# from the block lengths, bad-batch records) may do with a batch before it is moved.
_HOST_READS = frozenset({
    "__get__", "__len__", "__repr__", "__format__", "__iter__", "__getitem__", "tolist",
    "numpy", "item", "size", "dim", "numel", "is_pinned", "pin_memory", "reshape", "view",
    "__reduce_ex__", "is_floating_point", "element_size", "stride", "data_ptr",
    "storage_offset", "untyped_storage", "contiguous", "cpu",
})


def as_host(batch: dict) -> dict:
    from megatron_trillion.platform.device import MODEL_INPUT_KEYS

    def host(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.as_subclass(HostTensor)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{
                f.name: host(getattr(value, f.name)) for f in dataclasses.fields(value)
                if torch.is_tensor(getattr(value, f.name))})
        return value

    return {key: host(value) if key in MODEL_INPUT_KEYS else value
            for key, value in batch.items()}


def _tensors(value: Any, where: str):
    if torch.is_tensor(value):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}[{key!r}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name), f"{where}.{f.name}")
    elif hasattr(value, "tensor") and torch.is_tensor(getattr(value, "tensor")):
        yield from _tensors(value.tensor, f"{where}.tensor")  # P2POp


def check_on_device(call: str, args: tuple, kwargs: dict) -> None:
    from megatron_trillion.platform.device import compute_device

    device = compute_device()
    found = [*_tensors(list(args), "args"), *_tensors(kwargs, "kwargs")]
    for where, tensor in found:
        if isinstance(tensor, HostTensor):
            raise Misplaced(f"{call}: {where} is a host batch tensor never moved to {device}")
        if tensor.device != device:
            raise Misplaced(f"{call}: {where} is on {tensor.device}, not the compute device "
                            f"{device} (created without device=?)")


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                "send", "recv", "isend", "irecv", "batch_isend_irecv", "reduce", "gather",
                "scatter")


def install() -> dict:
    """Patch this process (call once, in a spawned test process). Returns check counters."""
    from megatron.core.models.gpt import GPTModel

    from megatron_trillion.training import data, loop

    counts = {"collectives": 0, "forwards": 0, "host batches": 0}
    dist = torch.distributed

    def checked(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            check_on_device(f"torch.distributed.{name}", args, kwargs)
            counts["collectives"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in _COLLECTIVES:
        setattr(dist, name, checked(name, getattr(dist, name)))

    real_forward = GPTModel.forward

    @functools.wraps(real_forward)
    def forward(self, *args, **kwargs):
        check_on_device("GPTModel.forward", args, kwargs)
        counts["forwards"] += 1
        return real_forward(self, *args, **kwargs)

    GPTModel.forward = forward

    real_for_step = data.StepBatches.for_step

    def for_step(self, consumed, global_batch):
        counts["host batches"] += 1
        return [as_host(batch) for batch in real_for_step(self, consumed, global_batch)]

    data.StepBatches.for_step = for_step

    # megatron-core's fallback grad norm without apex/TE (CPU only: GPU images have TE's
    # multi-tensor kernels) builds its result with torch.tensor(list); not this project's.
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl.__module__ == "megatron.core.utils":
        real_l2 = clip_grads.l2_norm_impl

        @functools.wraps(real_l2)
        def host_default_l2(*args, **kwargs):
            with torch.device("cpu"):
                return real_l2(*args, **kwargs)

        clip_grads.l2_norm_impl = host_default_l2

    real_train = loop.train

    @functools.wraps(real_train)
    def train(run):
        with torch.device("meta"):  # a tensor created without device= is unusable here
            return real_train(run)

    loop.train = train
    return counts
