"""Small Megatron indexed datasets (one per language) for the XLDA data tests."""

from __future__ import annotations

import os

import numpy as np

EOD = 0


def write_language_dataset(directory: str, language: str, num_docs: int, seed: int,
                           min_len: int = 3, max_len: int = 40, vocab: int = 1000) -> str:
    """Random-token documents, each ending in EOD; returns the path prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, f"corpus_{language}_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        length = int(rng.integers(min_len, max_len + 1))
        doc = np.append(rng.integers(1, vocab, size=length - 1), EOD).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [length])
    builder.finalize(prefix + ".idx")
    return prefix


def write_empty_dataset(directory: str, language: str) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, f"empty_{language}_text_document")
    IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32).finalize(prefix + ".idx")
    return prefix
