"""The bootstrap of the one-process command-line tools (convert, merge, generate)."""
from __future__ import annotations

import sys
from typing import Callable, Optional


def run_single_process(body: Callable[[], Optional[int]]) -> int:
    """Run ``body`` in a one-rank gloo process group, as a tool's ``main``; returns its exit status.

    megatron-core's checkpoint reader and writer need a process group even in one process.
    Known warnings are quieted before ``body`` imports megatron-core. A ``ValueError`` (a
    ``UserError``, ``CheckpointError``, a converter's bad-input error) prints one line and
    exits 2; any other exception keeps its traceback. The group is torn down either way.
    """
    from megatron_trillion.platform.warnings import quiet_known_warnings

    quiet_known_warnings()
    from megatron_trillion.platform.distributed import (
        destroy_distributed,
        initialize_single_process,
    )

    initialize_single_process()
    try:
        return body() or 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
