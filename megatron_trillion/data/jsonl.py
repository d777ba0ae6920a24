"""Reading JSONL files one record at a time, every mistake named by ``file:line``."""

from __future__ import annotations

import gzip
import json
from typing import Any, Callable, Iterator, TypeVar

from megatron_trillion.errors import UserError

T = TypeVar("T")
MAX_REPORTED_LINES = 20


def json_error(exc: json.JSONDecodeError) -> str:
    """``exc`` as "<what> at column N" (some of json's messages already end in "at")."""
    what = exc.msg[:-len(" at")] if exc.msg.endswith(" at") else exc.msg
    return f"{what} at column {exc.colno}"


def read_jsonl(path: str, expected: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (``file:line``, parsed value) of each non-blank line; a ``.gz`` file is read
    decompressed. A file that cannot be opened, invalid UTF-8 or a line that is not JSON is a
    ``UserError`` naming the file (and line); ``expected`` is added to the bad-JSON message
    (e.g. ``"; expected lm-eval --log_samples output"``)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot open ({exc.strerror})") from exc
    with f:
        # Lines are split as bytes and decoded one by one, so bad UTF-8 is named at its line.
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{where}: invalid UTF-8 at byte {exc.start}") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({json_error(exc)}){expected}") from exc
            yield where, record


def parse_jsonl(path: str, parse: Callable[[Any], T]) -> tuple[list[tuple[int, T]], list[str]]:
    """(line number, ``parse(record)``) of each non-blank line of ``path``, and a
    ``file:line: problem`` for each line that is not UTF-8, not JSON, or that ``parse`` rejects
    with a ``ValueError``. Training data is read this way so that one run names every bad line,
    not only the first."""
    good: list[tuple[int, T]] = []
    errors: list[str] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(f"{path}:{number}: invalid UTF-8 at byte {exc.start}")
                continue
            if not text.strip():
                continue
            try:
                good.append((number, parse(json.loads(text))))
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{number}: not valid JSON ({json_error(exc)})")
            except ValueError as exc:
                errors.append(f"{path}:{number}: {exc}")
    return good, errors


def bad_lines_message(what: str, errors: list[str]) -> str:
    """"bad <what>:" and the ``file:line: problem`` lines, the first 20 and a count of the rest."""
    shown = errors[:MAX_REPORTED_LINES]
    more = len(errors) - len(shown)
    return (f"bad {what}:\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else ""))
