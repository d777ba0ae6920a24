"""Pretraining entry point: ``torchrun --nproc-per-node N -m megatron_trillion.pretrain FLAGS``.

Parses the flags and runs ``training.run.pretrain`` (where a run is set up, trained and saved).
Nothing in the library imports this module; ``pretrain`` and ``parse_args`` are importable from
here too, so ``from megatron_trillion.pretrain import pretrain`` keeps working.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from megatron_trillion.errors import UserError
from megatron_trillion.platform.warnings import quiet_known_warnings
from megatron_trillion.training.arguments import parse_args
from megatron_trillion.training.run import pretrain

__all__ = ["main", "parse_args", "pretrain", "quiet_known_warnings"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """User errors (flags, config files, data paths: ``UserError``) print one line and exit 2;
    any other exception keeps its traceback, on the rank where it happened."""
    quiet_known_warnings()
    try:
        pretrain(parse_args(argv))
    except UserError as exc:
        _report_user_error(exc)
        return 2
    finally:
        from megatron_trillion.platform.distributed import destroy_distributed

        if torch.distributed.is_initialized():
            destroy_distributed()
    return 0


def _report_user_error(exc: UserError) -> None:
    """Every rank finds the same mistake: rank 0 prints it and every rank exits 2, quietly.

    Under torchrun a failed worker makes torchrun print its own failure report (one entry per
    rank) and exit 1; the message also goes into each rank's torchelastic error file, so that
    report names the mistake instead of pointing at how to enable tracebacks.
    """
    message = f"error: {exc}"
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            with open(error_file, "w") as f:
                # torchelastic's own layout (ErrorHandler.record_exception), without a traceback.
                json.dump({"message": {"message": message, "extraInfo": {
                    "py_callstack": message, "timestamp": str(int(time.time()))}}}, f)


if __name__ == "__main__":
    sys.exit(main())
