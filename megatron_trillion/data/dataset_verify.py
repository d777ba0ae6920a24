"""Checks written .bin/.idx datasets: counts, dtype, index consistency, exact duplicates.

``tools/preprocess_data.py --verify --output-prefix PREFIX`` runs this over every dataset listed
in ``{PREFIX}_summary.json`` (or, without one, every ``{PREFIX}_*.idx``). The index is parsed
here directly from its documented layout (megatron-core's ``_IndexWriter``) so that a damaged
file yields a message instead of an exception deep inside megatron-core, and the token file is
scanned through a memory map in bounded slices.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (indexed_dataset.DType)
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                6: np.float64, 7: np.float32, 8: np.uint16}
_MAX_EXAMPLES = 5
_SCAN_TOKENS = 1 << 24  # tokens per memory-mapped slice when scanning


@dataclass
class DatasetCheck:
    """The result of verifying one dataset."""

    path_prefix: str
    docs: int = 0
    sequences: int = 0
    tokens: int = 0
    dtype: str = ""
    max_token: int = -1
    duplicate_docs: int = 0
    duplicate_examples: list = field(default_factory=list)  # [(doc, earlier doc with same ids)]
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_index(idx_path: str, check: DatasetCheck):
    """Parses the .idx; returns (dtype, sequence_lengths, pointers, document_indices) or None."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(len(_INDEX_HEADER) + 8 + 1 + 16)
    if len(header) < len(_INDEX_HEADER) + 25 or not header.startswith(_INDEX_HEADER):
        check.problems.append(f"{idx_path}: not a megatron-core index (bad header)")
        return None
    offset = len(_INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", header, offset)
    (code,) = struct.unpack_from("<B", header, offset + 8)
    sequence_count, document_count = struct.unpack_from("<QQ", header, offset + 9)
    if version != 1 or code not in _DTYPE_CODES:
        check.problems.append(f"{idx_path}: unknown index version {version} or dtype code {code}")
        return None
    body = offset + 9 + 16
    expected = body + sequence_count * (4 + 8) + document_count * 8
    if size not in (expected, expected + sequence_count):  # + int8 modes when multimodal
        check.problems.append(f"{idx_path}: {size} bytes, expected {expected} for "
                              f"{sequence_count} sequences and {document_count} document indices")
        return None
    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, np.int32, sequence_count, body)
    pointers = np.frombuffer(index, np.int64, sequence_count, body + 4 * sequence_count)
    documents = np.frombuffer(index, np.int64, document_count, body + 12 * sequence_count)
    return _DTYPE_CODES[code], lengths, pointers, documents


def verify_dataset(path_prefix: str, vocab_size: Optional[int] = None,
                   expected_docs: Optional[int] = None,
                   expected_tokens: Optional[int] = None) -> DatasetCheck:
    """Verifies one dataset; every problem found is listed in the result (nothing raises)."""
    check = DatasetCheck(path_prefix)
    idx_path, bin_path = f"{path_prefix}.idx", f"{path_prefix}.bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            check.problems.append(f"{path}: missing")
    if check.problems:
        return check
    parsed = _read_index(idx_path, check)
    if parsed is None:
        return check
    dtype, lengths, pointers, documents = parsed
    itemsize = np.dtype(dtype).itemsize
    check.dtype = np.dtype(dtype).name
    check.sequences = int(lengths.size)
    check.docs = max(int(documents.size) - 1, 0)
    check.tokens = int(lengths.sum(dtype=np.int64))

    if (lengths < 0).any():
        check.problems.append(f"{idx_path}: negative sequence lengths")
    starts = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * itemsize
    if lengths.size and not np.array_equal(pointers, starts):
        check.problems.append(f"{idx_path}: sequence pointers do not follow the lengths")
    if documents.size == 0 or documents[0] != 0 or documents[-1] != lengths.size or (
        np.diff(documents) < 0
    ).any():
        check.problems.append(f"{idx_path}: document indices are not 0..{lengths.size} ascending")
    bin_size = os.path.getsize(bin_path)
    if bin_size != check.tokens * itemsize:
        check.problems.append(f"{bin_path}: {bin_size} bytes, the index describes "
                              f"{check.tokens * itemsize}")
    if vocab_size is not None:
        if vocab_size > np.iinfo(np.uint16).max + 1 and itemsize < 4:
            check.problems.append(f"{bin_path}: dtype {check.dtype} cannot hold a vocabulary "
                                  f"of {vocab_size} (needs int32)")
    if expected_docs is not None and expected_docs != check.docs:
        check.problems.append(f"{idx_path}: {check.docs} documents, the summary says "
                              f"{expected_docs}")
    if expected_tokens is not None and expected_tokens != check.tokens:
        check.problems.append(f"{idx_path}: {check.tokens} tokens, the summary says "
                              f"{expected_tokens}")
    if check.problems:
        return check
    _scan_tokens(bin_path, dtype, lengths, documents, vocab_size, check)
    return check


def _scan_tokens(bin_path, dtype, lengths, documents, vocab_size, check: DatasetCheck) -> None:
    """Max token id and exact-duplicate documents, reading the tokens in bounded slices."""
    if check.tokens == 0:
        return
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    token_starts = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    doc_token_bounds = token_starts[documents]
    # 8-byte digests per document; a digest match is confirmed on the tokens themselves.
    digests = np.empty(check.docs, dtype=np.uint64)
    for d in range(check.docs):
        start, end = int(doc_token_bounds[d]), int(doc_token_bounds[d + 1])
        digest = hashlib.blake2b(tokens[start:end].tobytes(), digest_size=8).digest()
        digests[d] = int.from_bytes(digest, "little")
    for start in range(0, check.tokens, _SCAN_TOKENS):
        check.max_token = max(check.max_token, int(tokens[start:start + _SCAN_TOKENS].max()))
    if vocab_size is not None and check.max_token >= vocab_size:
        check.problems.append(f"{bin_path}: token id {check.max_token} >= vocabulary size "
                              f"{vocab_size}")
    order = np.argsort(digests, kind="stable")
    sorted_digests = digests[order]
    same = np.nonzero(sorted_digests[1:] == sorted_digests[:-1])[0]
    first_of_run: dict = {}
    for position in same:
        earlier, later = int(order[position]), int(order[position + 1])
        first = first_of_run.setdefault(int(sorted_digests[position]), earlier)
        a = tokens[doc_token_bounds[first]:doc_token_bounds[first + 1]]
        b = tokens[doc_token_bounds[later]:doc_token_bounds[later + 1]]
        if np.array_equal(a, b):
            check.duplicate_docs += 1
            if len(check.duplicate_examples) < _MAX_EXAMPLES:
                check.duplicate_examples.append((later, first))


def verify_outputs(output_prefix: str, vocab_size: Optional[int] = None) -> list[DatasetCheck]:
    """Verifies every dataset of a preprocessing run (see the module docstring)."""
    summary_path = f"{output_prefix}_summary.json"
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        vocab = vocab_size if vocab_size is not None else summary.get("vocab_size")
        return [verify_dataset(d["path_prefix"], vocab, d["docs"], d["tokens"])
                for d in summary["datasets"]]
    prefixes = sorted(p[: -len(".idx")] for p in glob.glob(glob.escape(output_prefix) + "_*.idx"))
    if not prefixes:
        raise ValueError(f"--output-prefix {output_prefix}: no {output_prefix}_summary.json and "
                         f"no {output_prefix}_*.idx to verify")
    return [verify_dataset(p, vocab_size) for p in prefixes]
