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
    # torch.distributed's own deprecation notices about collectives megatron-core calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
