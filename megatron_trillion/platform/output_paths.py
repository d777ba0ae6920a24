"""Whether a directory a run or a tool will write into can be used, checked before any work.

A run that finds out at its first save that ``--save`` is a file, or on a read-only file
system, has lost its training time; a tool that writes into a directory holding something
else (a run's checkpoints) silently replaces it. These checks run up front, without creating
anything.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_trillion.errors import UserError


def writable_dir_problem(path: str, flag: str) -> Optional[str]:
    """Why ``path`` cannot be a directory to write into (created if missing), or None.

    ``flag`` names it in the message (``--save``). A missing directory is fine when its nearest
    existing ancestor is a directory this process may write into.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} is a file, not a directory"
    existing = path  # the nearest existing ancestor, spelled as the user did
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep))
    existing = existing or "."
    if not os.path.isdir(existing):
        return f"{flag} {path} cannot be created: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = ("" if os.path.normpath(existing) == os.path.normpath(path)
                 else f" ({existing}, where it is created)")
        return (f"{flag} {path} is not writable{where}: a read-only file system or no "
                "permission")
    return None


def check_writable_dir(path: str, flag: str) -> None:
    """Raise a ``UserError`` for :func:`writable_dir_problem`."""
    problem = writable_dir_problem(path, flag)
    if problem:
        raise UserError(problem)


def check_new_output_dir(path: str, flag: str = "--save") -> None:
    """A tool's output directory: writable, and new or empty.

    Writing into a non-empty one would mix with (or replace) what it holds - into a run's
    ``--save`` directory, a new ``latest_checkpointed_iteration.txt`` would make its next
    resume start from the tool's output instead of the run's newest checkpoint.
    """
    check_writable_dir(path, flag)
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"{flag} {path} exists and is not empty (writing there would mix with "
                        "or replace what it holds, e.g. a run's checkpoints); choose a new "
                        "directory, or remove this one first")
