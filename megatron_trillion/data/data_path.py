"""The grammar of ``--data-path`` shared by pretraining (indexed prefixes) and SFT (JSONL files)."""
from __future__ import annotations

from typing import Optional, Sequence

from megatron_trillion.errors import UserError


def split_data_path(tokens: Sequence[str], flag: str, what: str,
                    positive_weights: bool = False) -> list[tuple]:
    """``[W] [LANG:]TARGET ...`` -> ``[(weight or None, target, LANG or None), ...]``.

    Megatron-LM's weighted list, plus an optional ``LANG:`` prefix naming a target's language
    (``what`` names a target in errors: "a dataset prefix", "a file"). The caller checks the
    targets and infers a missing language its own way.
    """
    if not tokens:
        raise UserError(f"{flag} is empty")
    entries: list[tuple] = []
    weight: Optional[float] = None
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            value = None
        if value is not None:
            if weight is not None:
                raise UserError(f"{flag}: two weights in a row ({weight} {token})")
            if positive_weights and value <= 0:
                raise UserError(f"{flag}: weights must be > 0, got {token}")
            weight = value
            continue
        lang, sep, target = token.partition(":")
        if not sep or "/" in lang or not lang:
            target, lang = token, None
        entries.append((weight, target, lang))
        weight = None
    if weight is not None:
        raise UserError(f"{flag}: weight {weight} is not followed by {what}")
    return entries
