"""Reading JSONL files one record at a time, every mistake named by ``file:line``."""

from __future__ import annotations

import gzip
import json
from typing import Any, Iterator

from megatron_trillion.errors import UserError


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
