"""The grammar of ``--data-path`` shared by pretraining (indexed prefixes) and SFT (JSONL files),
and the :class:`DataSource` each of its entries becomes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_trillion.errors import UserError


@dataclass(frozen=True)
class DataSource:
    """One dataset of one language: a Megatron indexed dataset (``path_prefix`` + ``.bin``/
    ``.idx``), or under ``--sft`` a chat JSONL file (``path_prefix`` is then the file)."""

    path_prefix: str
    language: str
    weight: Optional[float] = None  # relative weight; None = use the dataset's token size
    documents: Optional[tuple[int, int]] = None
    """Only documents [first, end) of the dataset (a --split share); None = all."""


def as_data_source(entry, where: str = "data source") -> DataSource:
    """``entry`` if a ``DataSource``, else one from the tuple form the dataset builders also
    take: ``(weight_or_None, path_prefix, language[, (first_doc, end_doc)])``."""
    if isinstance(entry, DataSource):
        return entry
    if len(entry) not in (3, 4):
        raise ValueError(f"{where} {entry!r}: expected (weight_or_None, path_prefix, "
                         "language[, (first_doc, end_doc)])")
    weight, path_prefix, language, *documents = entry
    return DataSource(path_prefix, language, weight, documents[0] if documents else None)


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
