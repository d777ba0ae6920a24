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

from megatron_trillion.errors import UserError

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


def verify_outputs(output_prefix: str, vocab_size: Optional[int] = None,
                   tokenizer_fingerprint: Optional[dict] = None) -> list[DatasetCheck]:
    """Verifies every dataset of a preprocessing run (see the module docstring); with a
    ``tokenizer_fingerprint`` also that each was made with that tokenizer, as training checks."""
    summary_path = f"{output_prefix}_summary.json"
    if tokenizer_fingerprint is not None and vocab_size is None:
        vocab_size = tokenizer_fingerprint["vocab_size"]
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        except ValueError as exc:
            raise UserError(f"{summary_path}: unreadable summary ({exc})") from exc
        vocab = vocab_size if vocab_size is not None else summary.get("vocab_size")
        checks = [verify_dataset(d["path_prefix"], vocab, d["docs"], d["tokens"])
                  for d in summary["datasets"]]
    else:
        prefixes = sorted(p[: -len(".idx")]
                          for p in glob.glob(glob.escape(output_prefix) + "_*.idx"))
        if not prefixes:
            raise UserError(f"--output-prefix {output_prefix}: no {output_prefix}_summary.json "
                            f"and no {output_prefix}_*.idx to verify")
        checks = [verify_dataset(p, vocab_size) for p in prefixes]
    for check in checks:
        if check.sequences:  # the index parsed: compare its record too
            check.problems += _record_problems(check.path_prefix, check.tokens,
                                               tokenizer_fingerprint, vocab_size)[1]
    return checks


# --------------------------------------------------------------------------------------------
# The dataset record and the start-up checks of a training run

# Written by tools/preprocess_data.py next to each {prefix}.bin/.idx. megatron-core's format has
# no room for the tokenizer, so without this file nothing could tell data made with another
# tokenizer of the same size from the right data.
DATASET_RECORD_SUFFIX = ".dataset.json"
DATASET_RECORD_FORMAT = "megatron-trillion-dataset/1"
_SAMPLED_DOCUMENTS = 64  # documents read for the cheap token-range check
_SAMPLED_TOKENS = 1 << 20  # at most this many tokens per dataset for it


def dataset_record(tokenizer_fingerprint: dict, docs: int, tokens: int, dtype: str) -> str:
    return json.dumps({"format": DATASET_RECORD_FORMAT, "tokenizer": tokenizer_fingerprint,
                       "docs": docs, "tokens": tokens, "dtype": dtype}, indent=2)


def read_dataset_record(path_prefix: str) -> Optional[dict]:
    """The record preprocessing wrote for this dataset, or None (e.g. made by Megatron-LM)."""
    path = path_prefix + DATASET_RECORD_SUFFIX
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable dataset record ({exc})")
    if not isinstance(record, dict) or record.get("format") != DATASET_RECORD_FORMAT:
        raise UserError(f"{path}: not a {DATASET_RECORD_FORMAT} record")
    return record


@dataclass
class DataCheckReport:
    """Every problem found over all datasets of a run (errors stop it; warnings are logged)."""

    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    checked: int = 0


def _index_header(idx_path: str):
    """(dtype, sequence_count, document_count, body offset, problem or None), reading only the
    header and the file size (O(1), whatever the dataset size)."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(len(_INDEX_HEADER) + 25)
    if len(header) < len(_INDEX_HEADER) + 25 or not header.startswith(_INDEX_HEADER):
        return None, 0, 0, 0, (f"{idx_path}: not a megatron-core index (bad header): the file "
                               f"is damaged or not an .idx; re-copy it or re-preprocess")
    offset = len(_INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", header, offset)
    (code,) = struct.unpack_from("<B", header, offset + 8)
    sequences, documents = struct.unpack_from("<QQ", header, offset + 9)
    if version != 1 or code not in _DTYPE_CODES:
        return None, 0, 0, 0, (f"{idx_path}: index version {version} / dtype code {code}, "
                               f"expected version 1 and a code in {sorted(_DTYPE_CODES)}: the "
                               f"header is damaged; re-copy it or re-preprocess")
    body = offset + 25
    expected = body + sequences * 12 + documents * 8
    if size not in (expected, expected + sequences):  # + int8 modes when multimodal
        return None, 0, 0, 0, (f"{idx_path}: {size} bytes, but its header describes {expected} "
                               f"({sequences} sequences, {documents} document indices): the file "
                               f"is truncated or damaged; re-copy it or re-preprocess")
    return _DTYPE_CODES[code], sequences, documents, body, None


def _token_range_check(bin_path: str, tokens: np.ndarray, document_starts: np.ndarray,
                       vocab_size: int, full_scan: bool, progress) -> Optional[str]:
    """Largest token id of a spread sample of documents (all tokens with ``full_scan``).
    ``document_starts`` are token offsets of each document's start, then the total."""
    if full_scan:
        largest = -1
        for start in range(0, tokens.size, _SCAN_TOKENS):
            largest = max(largest, int(tokens[start:start + _SCAN_TOKENS].max()))
            if progress is not None:
                progress(min(start + _SCAN_TOKENS, tokens.size) * tokens.itemsize)
        where = "of all its tokens"
    else:
        documents = document_starts.size - 1
        picks = np.unique(np.linspace(0, documents - 1, min(documents, _SAMPLED_DOCUMENTS))
                          .astype(np.int64))
        largest, budget = -1, _SAMPLED_TOKENS
        for d in picks:
            start, end = int(document_starts[d]), int(document_starts[d + 1])
            end = min(end, start + budget)
            if end > start:
                largest = max(largest, int(tokens[start:end].max()))
                budget -= end - start
            if budget <= 0:
                break
        where = f"of {picks.size} sampled documents (--verify-data scans all)"
    if largest >= vocab_size:
        return (f"{bin_path}: token id {largest} (largest {where}) >= {vocab_size}, this run's "
                f"vocabulary size: the data was made with a larger tokenizer")
    return None


def _record_problems(path_prefix: str, tokens_in_index: int,
                     tokenizer_fingerprint: Optional[dict], vocab_size: Optional[int]):
    """(has a record, problems): the record's token count against the index, and the tokenizer
    it names against the run's."""
    from megatron_trillion.data.tokenizers import fingerprint_differences

    try:
        record = read_dataset_record(path_prefix)
    except UserError as exc:
        return False, [f"{exc}; remove it to accept the data unchecked, or re-preprocess"]
    if record is None:
        return False, []
    problems = []
    idx_path = path_prefix + ".idx"
    if record.get("tokens") is not None and record["tokens"] != tokens_in_index:
        problems.append(f"{idx_path}: {tokens_in_index} tokens, but "
                        f"{path_prefix + DATASET_RECORD_SUFFIX} records {record['tokens']}: "
                        f"the .bin/.idx pair is not the one preprocessing wrote; re-copy all "
                        f"three files")
    recorded = record.get("tokenizer") or {}
    if tokenizer_fingerprint is not None:
        differences = fingerprint_differences(recorded, tokenizer_fingerprint)
        if differences:
            files = ", ".join(recorded.get("files") or []) or "unknown"
            problems.append(
                f"{path_prefix}: preprocessed with another tokenizer ({'; '.join(differences)}, "
                f"data vs this run): the ids would mean other strings. Pass the data's "
                f"tokenizer (--tokenizer-model {files}) or re-preprocess with this one")
    elif vocab_size is not None and (recorded.get("vocab_size") or 0) > vocab_size:
        problems.append(f"{path_prefix}: preprocessed with a {recorded['vocab_size']}-token "
                        f"tokenizer, larger than this run's vocabulary ({vocab_size})")
    return True, problems


def check_dataset(path_prefix: str, tokenizer_fingerprint: Optional[dict], vocab_size: int,
                  full_scan: bool = False, progress=None) -> tuple[list, bool]:
    """Start-up check of one dataset: (problems, has a record). See check_training_datasets."""
    idx_path, bin_path = f"{path_prefix}.idx", f"{path_prefix}.bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        return [f"{p}: missing" for p in missing], False
    dtype, sequences, documents, body, problem = _index_header(idx_path)
    if problem:
        return [problem], False
    itemsize = np.dtype(dtype).itemsize
    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, np.int32, sequences, body)
    pointers = np.frombuffer(index, np.int64, sequences, body + 4 * sequences)
    doc_index = np.frombuffer(index, np.int64, documents, body + 12 * sequences)
    described = int(pointers[-1]) + int(lengths[-1]) * itemsize if sequences else 0
    bin_size = os.path.getsize(bin_path)
    problems = []
    if bin_size != described:
        cause = ("truncated (an interrupted copy?)" if bin_size < described
                 else "longer than its index says")
        return [f"{bin_path}: {bin_size} bytes, but {idx_path} describes {described} bytes "
                f"({described // itemsize} {np.dtype(dtype).name} tokens): the .bin is {cause} "
                f"or the pair comes from two different datasets; re-copy both files (or "
                f"re-preprocess)"], False
    if full_scan:
        starts = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * itemsize
        if sequences and not np.array_equal(pointers, starts):
            problems.append(f"{idx_path}: sequence pointers do not follow the lengths: the index "
                            f"is damaged; re-copy it or re-preprocess")
        if documents == 0 or doc_index[0] != 0 or doc_index[-1] != sequences or (
                np.diff(doc_index) < 0).any():
            problems.append(f"{idx_path}: document indices are not 0..{sequences} ascending: the "
                            f"index is damaged; re-copy it or re-preprocess")
    if vocab_size > np.iinfo(np.uint16).max + 1 and itemsize < 4:
        problems.append(f"{bin_path}: dtype {np.dtype(dtype).name} cannot hold ids of a "
                        f"{vocab_size}-token vocabulary: the data was made with a smaller "
                        f"tokenizer")
    record_found, found = _record_problems(path_prefix, described // itemsize,
                                           tokenizer_fingerprint, vocab_size)
    problems += found
    if sequences and not any(p.startswith(bin_path) for p in problems):
        # Document starts from the sequence pointers (bytes): O(documents), no pass over lengths.
        first_sequences = np.clip(doc_index[:-1], 0, sequences - 1) if documents > 1 else \
            np.zeros(1, np.int64)
        document_starts = np.append(pointers[first_sequences] // itemsize, described // itemsize)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        out_of_range = _token_range_check(bin_path, tokens, document_starts, vocab_size, full_scan,
                                          progress)
        if out_of_range:
            problems.append(out_of_range + "; re-preprocess with this run's tokenizer or pass "
                            "the data's (--tokenizer-model)")
    return problems, record_found


def check_training_datasets(prefixes, tokenizer_fingerprint: Optional[dict], vocab_size: int,
                            full_scan: bool = False, progress_factory=None) -> DataCheckReport:
    """Checks every dataset a run reads before it trains: the ``.idx`` header, the ``.bin`` size
    against what the ``.idx`` describes, the tokenizer the data was made with against the run's
    (from the ``.dataset.json`` record preprocessing writes), and the token ids of a sample of
    documents (all of them with ``full_scan``) against the vocabulary. ``prefixes`` are
    ``(flag, path prefix)`` pairs; every problem is listed, prefixed with its flag.
    ``progress_factory(path, total_bytes)`` returns a callable given the bytes scanned so far.
    """
    report = DataCheckReport()
    unrecorded = []
    seen = set()
    for flag_name, prefix in prefixes:
        if prefix in seen:
            continue
        seen.add(prefix)
        progress = None
        if full_scan and progress_factory is not None and os.path.isfile(prefix + ".bin"):
            progress = progress_factory(prefix, os.path.getsize(prefix + ".bin"))
        problems, recorded = check_dataset(prefix, tokenizer_fingerprint, vocab_size, full_scan,
                                           progress)
        report.checked += 1
        report.errors += [f"{flag_name}: {p}" for p in problems]
        if not recorded and not problems:
            unrecorded.append(prefix)
    if unrecorded:
        shown = ", ".join(unrecorded[:3]) + (f" and {len(unrecorded) - 3} more"
                                             if len(unrecorded) > 3 else "")
        report.warnings.append(
            f"{len(unrecorded)} dataset(s) have no {DATASET_RECORD_SUFFIX} record of their "
            f"tokenizer (made by Megatron-LM's tools?): {shown}. Only their token ids were "
            f"checked against the vocabulary (a sample; --verify-data checks all); make sure "
            f"they were preprocessed with this run's tokenizer")
    return report
