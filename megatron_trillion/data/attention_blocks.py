"""Attention-block boundaries of one packed sample, per masking mode and XLDA block scope.

A packed sample is a run of *pieces* (contiguous token ranges of one source); each piece
carries a cross-lingual pair id (>= 0) or ``MONOLINGUAL`` (-1). Cross-lingual samples are
built from pieces of alternating languages, ``[EN1][KO1][EN2][KO2]...`` with pair ids
``0 0 1 1 ...``; a monolingual sample is one piece that may span several documents.

What the Trillion report says, and the two readings of it (section 2.2, Figure 2): "the XLDA
mask keeps full self-attention across language blocks which allows tokens from different
language documents to attend to each other", in contrast to "the standard causal mask that
blocks attention across document boundaries".

* ``pair``: one attention block per (anchor document, partner document) pair; in
  ``[EN1][KO1][EN2][KO2]`` EN2 sees neither EN1 nor KO1.
* ``sequence``: the documents of a cross-lingual sequence form one block, so every document
  attends to all earlier ones (EN2 sees EN1 and KO1).

Monolingual samples keep one block per document under either scope: XLDA changes masking only
where the packing made a sequence cross-lingual.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# --attention-masking: what one attention block of a packed sample is. The one definition of
# the modes (the flag's choices, the packing, both core attentions); kept here, below data and
# models alike, because the block boundaries are what a mode means.
MASKING_XLDA = "xlda"
"""Each cross-lingual block (see the scopes below); monolingual samples: each document."""
MASKING_DOCUMENT = "document"
"""Each document (piece of a document)."""
MASKING_NONE = "none"
"""The whole sample: classic causal packing, documents see the ones before them."""
MASKING_MODES = (MASKING_XLDA, MASKING_DOCUMENT, MASKING_NONE)
MASKED_MODES = (MASKING_XLDA, MASKING_DOCUMENT)
"""The modes whose attention must see the block boundaries (THD cu_seqlens): run without
them, a masked model would silently attend across blocks."""

SCOPE_PAIR = "pair"
SCOPE_SEQUENCE = "sequence"
BLOCK_SCOPES = (SCOPE_PAIR, SCOPE_SEQUENCE)
MONOLINGUAL = -1


def block_cu_seqlens(document_cu: Sequence[int], piece_starts: Sequence[int],
                     piece_pairs: Sequence[int], masking: str,
                     scope: str = SCOPE_PAIR) -> np.ndarray:
    """Cumulative block boundaries (int32, ``[0, ..., seq_length]``) of one sample.

    ``document_cu``: document boundaries ``[0, ..., seq_length]``; ``piece_starts``: the token
    offset where each piece begins (ascending, first 0); ``piece_pairs``: each piece's pair id
    or ``MONOLINGUAL``.
    """
    if masking not in MASKING_MODES:
        raise ValueError(f"unknown masking mode {masking!r}; expected one of {MASKING_MODES}")
    if scope not in BLOCK_SCOPES:
        raise ValueError(f"unknown XLDA block scope {scope!r}; expected one of {BLOCK_SCOPES}")
    document_cu = np.asarray(document_cu, dtype=np.int32)
    seq_length = int(document_cu[-1])
    if masking == MASKING_NONE:
        return np.asarray([0, seq_length], dtype=np.int32)
    if masking == MASKING_DOCUMENT:
        return document_cu
    bounds = set()
    ends = list(piece_starts[1:]) + [seq_length]
    previous = None
    for start, end, pair in zip(piece_starts, ends, piece_pairs):
        if pair == MONOLINGUAL:
            bounds.update(int(d) for d in document_cu[:-1] if start <= d < end)
        elif scope == SCOPE_PAIR and pair != previous:
            bounds.add(int(start))
        elif scope == SCOPE_SEQUENCE and previous in (None, MONOLINGUAL):
            bounds.add(int(start))
        previous = pair
    return np.asarray(sorted(bounds) + [seq_length], dtype=np.int32)
