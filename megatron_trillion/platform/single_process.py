"""The bootstrap every command-line tool (``megatron_trillion.cli``) runs its work through."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from megatron_trillion.errors import UserError


def run_tool(body: Callable[[], Optional[int]], *, process_group: bool = False,
             user_errors: tuple[type[Exception], ...] = (),
             argument_errors: Sequence[str] = ()) -> int:
    """Run a tool's work, ``body``, in this process; returns its exit status (None counts as 0).

    ``argument_errors``: what the tool found wrong with its arguments, all of them; each is
    printed as an ``error:`` line and ``body`` does not run (exit 2).

    Known warnings are quieted before ``body`` imports megatron-core. ``process_group``: ``body``
    runs in a one-rank gloo group, torn down either way (megatron-core's checkpoint reader and
    writer need a group even in one process). A ``UserError``, or one of ``user_errors`` (classes
    a tool knows to be its user's, e.g. a ``--load`` that holds no readable checkpoint), prints
    one ``error:`` line and returns 2; any other exception keeps its traceback.
    """
    from megatron_trillion.platform.warnings import quiet_known_warnings

    if argument_errors:
        for error in argument_errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    quiet_known_warnings()
    if process_group:
        from megatron_trillion.platform.distributed import initialize_single_process

        initialize_single_process()
    try:
        return body() or 0
    except (UserError, *user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if process_group:
            from megatron_trillion.platform.distributed import destroy_distributed

            destroy_distributed()
