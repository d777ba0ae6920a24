"""How the data pipeline spells a missing language, and "all languages together".

Documents, datasets and report lines do not always have a language of their own. Each place
that must spell that in its own format (an in-memory key, a file name, a JSON report, an ISO
code) uses one of the constants below, so the forms differ only where their formats need it:

* :data:`NO_LANGUAGE` (``""``) - in memory: the language of a document read without
  ``--lang-key`` (preprocessing).
* :data:`NO_LANGUAGE_FILE_TAG` (``"_"``) - on disk: the language part of a preprocessing shard
  file name for such documents (a name part cannot be empty).
* :data:`ALL_LANGUAGES` (``"all"``) - a report key for figures over every document whatever
  its language: preprocessing summaries and quality cut points of data without ``--lang-key``,
  the merges of a tokenizer trained without per-language budgets, the validation loss over the
  whole held-out set in the ablation table.
* :data:`UNNAMED_LANGUAGE` (``"und"``) - training: the language of a ``--data-path`` prefix
  that neither a ``LANG:`` prefix nor its file name gives.

``None`` keeps its usual meaning, "not given": the ``LANG:`` part of a ``--data-path`` entry
before the language is inferred, the language part of a preprocessed dataset's name (left out),
and the language filter of tokenizer training (none: every document).
"""

from __future__ import annotations

NO_LANGUAGE = ""
"""In memory: a document read without --lang-key."""

NO_LANGUAGE_FILE_TAG = "_"
"""On disk: a shard file name's language part for :data:`NO_LANGUAGE` documents."""

ALL_LANGUAGES = "all"
"""Report key: figures over every document, whatever its language."""

UNNAMED_LANGUAGE = "und"
"""Training: a --data-path prefix whose language nothing tells (ISO 639-2 "undetermined")."""


def file_tag(language: str) -> str:
    """The language part of a shard file name (never empty)."""
    return NO_LANGUAGE_FILE_TAG if language == NO_LANGUAGE else language


def report_key(language: str) -> str:
    """The key of a language's figures in a report (:data:`ALL_LANGUAGES` without one)."""
    return ALL_LANGUAGES if language == NO_LANGUAGE else language
