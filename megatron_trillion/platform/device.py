"""The device rule: which device this rank computes on, and how host data gets there.

    compute_device()        # cuda:<current device> when CUDA is available, else the CPU
    to_device(batch)        # a micro-batch's model inputs moved there once (non_blocking)
    pin_batch(batch)        # page-locked host copies, so the move above can overlap compute

Every tensor that reaches the model, a collective or the optimizer is created on
``compute_device()`` or moved there by ``to_device``; with NCCL a collective on a CPU tensor
fails (or, for some ops, silently runs on the host). Host-side data (sample indices, document
ids, the block lengths the FLOP count reads) stays on the host.

megatron-core has no single helper for this: it calls ``torch.cuda.current_device()`` at each
site, which is right on GPU and (through ``platform.cpu_compat``) the CPU without CUDA. This
module says the same thing once for this project's own tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

# Keys of a collated micro-batch (``data.packed_batch.collate_packed``) the model reads; the
# rest (``document_ids``, ``indices``, ``cu_seqlens_documents``) are host-side bookkeeping.
MODEL_INPUT_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "packed_seq_params",
                    # preference pairs (posttraining.dpo): what the loss function reads
                    "response_ids", "reference")


def compute_device() -> torch.device:
    """The device this rank computes on: the local CUDA device (set by
    ``platform.distributed.initialize_distributed`` from LOCAL_RANK), or the CPU."""
    from megatron_trillion.platform import cpu_compat

    if cpu_compat.cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _move(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        # non_blocking only overlaps with compute when the source is pinned; from pageable
        # memory it is an ordinary synchronous copy, so it is always safe to ask for.
        return value.to(device, non_blocking=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # PackedSeqParams: cu_seqlens tensors move, max_seqlen stays a Python int (TE takes it
        # as a host value; reading it from a device tensor would sync every layer).
        changes = {f.name: _move(getattr(value, f.name), device)
                   for f in dataclasses.fields(value) if torch.is_tensor(getattr(value, f.name))}
        return dataclasses.replace(value, **changes) if changes else value
    return value


def to_device(batch: dict, device: torch.device | None = None) -> dict:
    """``batch`` with its model inputs (``MODEL_INPUT_KEYS``) on ``device`` (default: the
    compute device); other entries are passed through untouched."""
    device = compute_device() if device is None else device
    return {key: (_move(value, device) if key in MODEL_INPUT_KEYS else value)
            for key, value in batch.items()}


def _pin(value: Any) -> Any:
    if torch.is_tensor(value):
        return value if value.is_pinned() else value.pin_memory()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _pin(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if torch.is_tensor(getattr(value, f.name))}
        return dataclasses.replace(value, **changes) if changes else value
    return value


def pin_batch(batch: dict) -> dict:
    """Page-locked copies of ``batch``'s model inputs when CUDA is available (pinning needs a
    CUDA driver); unchanged otherwise."""
    from megatron_trillion.platform import cpu_compat

    if not cpu_compat.cuda_available():
        return batch
    return {key: (_pin(value) if key in MODEL_INPUT_KEYS else value)
            for key, value in batch.items()}


def require_single_device_connection(tensor_parallel: int, context_parallel: int,
                                     environ: Any = None) -> str | None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` where megatron-core relies on it.

    With TP or CP > 1 megatron-core overlaps a layer's communication with its computation
    (sequence-parallel all-gather / reduce-scatter, async TP all-reduce, TE's TP comm overlap)
    and counts on the GPU running kernels in the order they were queued, which holds only with
    one hardware queue (``tensor_parallel/layers.py``; Megatron-LM's argument check asks the
    same). The variable is read when the CUDA context is created, so this runs before the
    first CUDA call. Returns a line for the log when it set or disagrees with the variable.
    """
    import os

    environ = os.environ if environ is None else environ
    if tensor_parallel <= 1 and context_parallel <= 1:
        return None
    current = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if current is None:
        environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        return ("set CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor/context parallel communication "
                "overlaps compute and relies on in-order kernels)")
    if current != "1":
        return (f"warning: CUDA_DEVICE_MAX_CONNECTIONS={current}; megatron-core expects 1 with "
                "--tensor-model-parallel-size or --context-parallel-size > 1 (kernels may run "
                "out of order with their communication)")
    return None


# Dense BF16 tensor-core peak of one device (TFLOP/s), by a substring of its CUDA name: the
# figure MFU is measured against. H200 has H100's compute (more, faster memory).
_PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0))


def device_peak_tflops(name: str | None = None) -> float | None:
    """Peak dense BF16 TFLOP/s of the device called ``name`` (default: this rank's CUDA device);
    None when unknown (pass --device-peak-tflops) or without CUDA."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, peak in _PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None
