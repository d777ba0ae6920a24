"""Warnings megatron-core and torch raise on every rank that a user cannot act on."""
from __future__ import annotations

import warnings


def quiet_known_warnings() -> None:
    """megatron-core warns on every rank about what a CPU host lacks (TE, apex) and about a
    `.grad` probe of its own; neither is actionable for a user."""
    for message in (".*Transformer Engine.*", ".*Apex is not installed.*",
                    ".*The .grad attribute of a Tensor that is not a leaf.*",
                    ".*full scope is deprecated.*", ".*Please use DTensor instead.*",
                    ".*`load_state_dict` is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)
    # A CUDA stream-ordering hint (tensor_parallel/layers.py) that a host without CUDA cannot
    # act on; on GPU it stays, and platform.device sets the variable before it could fire.
    import torch

    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    # torch.distributed's own deprecation notices about collectives megatron-core calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
