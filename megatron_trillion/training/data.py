"""From ``--data-path`` to this rank's micro-batches of one training step.

``--data-path`` keeps Megatron-LM's forms (``PREFIX``, ``W1 P1 W2 P2``, ``--data-args-path``,
``--split``, ``--train/valid/test-data-path``) and adds the language: ``en:PREFIX``, or inferred
from Megatron-style names ``..._<lang>_<key>_document``; a prefix whose name tells none is one
unnamed language (``und``). Every rank
reads its own micro-batches from the (deterministic, cached) XLDA dataset: global step ``i``
covers samples ``[consumed, consumed + global_batch)``, and DP rank ``r`` takes micro-batch
``k`` = samples ``consumed + k * micro * dp + r * micro + [0, micro)`` — Megatron-LM's order, so
the union over ranks is the same for any data-parallel size.
"""

from __future__ import annotations

import dataclasses
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_trillion.data.languages import UNNAMED_LANGUAGE
from megatron_trillion.data.data_path import DataSource
from megatron_trillion.data.packed_batch import collate_packed
from megatron_trillion.errors import UserError
from megatron_trillion.platform.device import pin_batch

_LANG_IN_NAME = re.compile(r"_([a-z]{2,3}(?:-[a-z]+)?)_[A-Za-z0-9]+_(?:document|sentence)$")


def infer_language(prefix: str) -> Optional[str]:
    match = _LANG_IN_NAME.search(os.path.basename(prefix))
    return match.group(1) if match else None


def parse_data_path(tokens: Sequence[str], flag: str = "--data-path") -> list[DataSource]:
    """``[W] [LANG:]PREFIX ...`` -> one ``DataSource`` per prefix."""
    from megatron_trillion.data.data_path import split_data_path

    entries = []
    for weight, prefix, lang in split_data_path(tokens, flag, "a dataset prefix"):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise UserError(f"{flag}: {prefix + ext} does not exist")
        entries.append(DataSource(prefix, lang or infer_language(prefix) or UNNAMED_LANGUAGE,
                                  weight))
    return entries


def read_data_args_file(path: str) -> list[str]:
    """``--data-args-path``: a file holding the ``--data-path`` value (whitespace-separated)."""
    if not os.path.isfile(path):
        raise UserError(f"--data-args-path {path}: no such file")
    with open(path) as f:
        tokens = f.read().split()
    if not tokens:
        raise UserError(f"--data-args-path {path}: the file is empty")
    return tokens


def parse_split(text: str) -> tuple[float, float, float]:
    """``--split 949,50,1`` (or 99/1/0, missing parts 0) -> normalised (train, valid, test)."""
    cleaned = text.strip().strip("'\"")
    parts = [p for p in re.split(r"[,/]", cleaned) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--split {text!r}: expected comma-separated proportions such as "
                        "949,50,1") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise UserError(f"--split {text!r}: give up to three non-negative proportions "
                        "(train,valid,test) with a positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return tuple(v / total for v in values)


def split_document_ranges(num_documents: int, split: Sequence[float]) -> list[tuple[int, int]]:
    """Megatron-LM's ``get_split_indices``: contiguous document ranges per split."""
    bounds = [0]
    for fraction in split:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    shift = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - shift for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(len(split))]


@dataclass(frozen=True)
class DataSplits:
    """Sources of the train / valid / test datasets (None: no such dataset); a --split share
    is a source with its ``documents`` range."""

    train: Optional[list[DataSource]]
    valid: Optional[list[DataSource]]
    test: Optional[list[DataSource]]

    def languages(self) -> list[str]:
        return sorted({source.language for source in self.train or []})


def _path_parser(data):
    """--sft reads chat JSONL files (whole: --split divides indexed datasets by documents)."""
    if not any(getattr(data, kind, False) for kind in ("sft", "dpo", "grpo")):
        return parse_data_path
    if data.split:
        raise UserError("--split divides indexed datasets; with --sft/--dpo give the held-out "
                        "conversations as --valid-data-path FILE.jsonl")
    from megatron_trillion.data.sft import parse_sft_data_path

    return parse_sft_data_path


def resolve_data_splits(data) -> DataSplits:
    """The datasets of ``DataArgs`` (not --mock-data) by Megatron-LM's rules: ``--data-path``
    (or ``--data-args-path``) is split per dataset by ``--split`` (all for training when not
    given); ``--train/--valid/--test-data-path`` are used whole. Raises UserError."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    parse_data_path = _path_parser(data)
    if data.data_path and data.data_args_path:
        raise UserError("give --data-path or --data-args-path, not both")
    blend = read_data_args_file(data.data_args_path) if data.data_args_path else data.data_path
    if blend and data.train_data_path:
        raise UserError("--train-data-path replaces --data-path (and --split): give one of them")
    if data.split and not blend:
        raise UserError("--split divides --data-path / --data-args-path; with "
                        "--train-data-path the datasets are used whole")
    if not blend and not data.train_data_path:
        raise UserError("give --data-path (or --data-args-path, --train-data-path, or "
                        "--mock-data for a synthetic run)")
    valid = parse_data_path(data.valid_data_path, "--valid-data-path") \
        if data.valid_data_path else None
    test = parse_data_path(data.test_data_path, "--test-data-path") \
        if data.test_data_path else None
    if data.train_data_path:
        return DataSplits(parse_data_path(data.train_data_path, "--train-data-path"),
                          valid, test)
    flag = "--data-args-path" if data.data_args_path else "--data-path"
    entries = parse_data_path(blend, flag)
    if not data.split:
        return DataSplits(entries, valid, test)
    fractions = parse_split(data.split)
    shares: list[list[DataSource]] = [[], [], []]
    for source in entries:
        # Sequences are the stream's documents (one per document from preprocess_data).
        documents = len(IndexedDataset(source.path_prefix, mmap=False).sequence_lengths)
        for k, (first, end) in enumerate(split_document_ranges(documents, fractions)):
            if end > first:
                shares[k].append(dataclasses.replace(source, documents=(first, end)))
    for k, name in ((1, "--valid-data-path"), (2, "--test-data-path")):
        given = valid if k == 1 else test
        if shares[k] and given:
            raise UserError(f"--split {data.split} gives a {name.split('-')[2]} share of "
                            f"--data-path and {name} is given too: use one")
    if not shares[0]:
        raise UserError(f"--split {data.split} leaves no training documents")
    return DataSplits(shares[0], shares[1] or valid, shares[2] or test)


def parse_lang_beta(items: Optional[Sequence[str]]) -> Optional[dict]:
    if not items:
        return None
    beta = {}
    for item in items:
        lang, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--lang-beta expects LANG=VALUE items, got {item!r}")
        try:
            beta[lang] = float(value)
        except ValueError as exc:
            raise ValueError(f"--lang-beta {item!r}: {value!r} is not a number") from exc
    return beta


MOCK_FORMAT_VERSION = 1
"""Bump when the generator below changes: old caches are then left alone, not reused."""

MOCK_LANGUAGES = ("en", "ko", "ja")
"""The languages of --mock-data (validation checks --lang-beta etc. against them)."""


def write_mock_datasets(root: str, vocab_size: int, seed: int,
                        languages: Sequence[str] = MOCK_LANGUAGES,
                        docs_per_language: int = 400) -> list[DataSource]:
    """Random-token documents per language (``--mock-data``): distinct token ranges per
    language and a repeating structure so a model can learn something.

    The files go to a subdirectory of ``root`` named by everything that shapes them (vocabulary
    size, seed, languages, documents per language, generator version), so runs with another
    vocabulary never read each other's tokens. The subdirectory is written under a temporary
    name and renamed into place whole: a reader sees all files or none, and concurrent writers
    (or a killed one) cannot leave a half-written set behind. Safe to call on every rank; the
    caller lets one rank write first to avoid duplicate work.
    """
    import shutil
    import tempfile

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if vocab_size < 2:
        raise UserError(f"--mock-data needs a vocabulary of at least 2 tokens, got {vocab_size}")
    languages = list(languages)
    key = (f"v{MOCK_FORMAT_VERSION}-vocab{vocab_size}-seed{seed}-docs{docs_per_language}-"
           + "-".join(languages))
    directory = os.path.join(root, key)
    prefixes = [os.path.join(directory, f"mock_{lang}_text_document") for lang in languages]
    entries = [DataSource(prefix, lang) for prefix, lang in zip(prefixes, languages)]
    if os.path.isdir(directory):
        return entries

    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
    try:
        rng = np.random.default_rng(seed)
        dtype = np.int32 if vocab_size > 65500 else np.uint16
        span = max(1, (vocab_size - 1) // len(languages))
        for n, lang in enumerate(languages):
            prefix = os.path.join(staging, f"mock_{lang}_text_document")
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
            low = 1 + (n * span) % (vocab_size - 1)
            for _ in range(docs_per_language):
                length = int(rng.integers(8, 200))
                period = int(rng.integers(2, 6))
                base = rng.integers(low, min(low + span, vocab_size), size=period)
                doc = np.resize(base, length).astype(np.int64)
                doc[-1] = 0  # EOD
                builder.add_document(doc, [length])
            builder.finalize(prefix + ".idx")
        try:
            os.rename(staging, directory)
        except OSError:
            if not os.path.isdir(directory):  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries


def microbatch_indices(consumed: int, global_batch: int, micro_batch: int, dp_rank: int,
                       dp_size: int) -> list[list[int]]:
    """Global sample indices of each of this rank's micro-batches for one step."""
    step = micro_batch * dp_size
    if global_batch % step:
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch x DP "
                         f"({micro_batch} x {dp_size})")
    return [
        list(range(consumed + k * step + dp_rank * micro_batch,
                   consumed + k * step + (dp_rank + 1) * micro_batch))
        for k in range(global_batch // step)
    ]


class StepBatches:
    """Reads this rank's collated micro-batches of a step from a packed dataset.

    With ``prefetch`` (``--num-workers`` > 0), a background thread reads and packs the next
    step's micro-batches (assuming the same global batch size) while this step trains; a step
    whose batch size changed (a ramp-up) is read directly. One thread: the packed dataset's
    stream caches are not shared between threads, and one reader already hides the reads.

    ``dp_rank``/``dp_size`` exclude context parallelism: the ranks of one CP group read the same
    samples and ``context_parallel`` (a ``data.context_parallel.ContextParallelSplit``, None
    without CP) keeps this rank's share of every micro-batch.
    """

    def __init__(self, dataset, micro_batch: int, dp_rank: int, dp_size: int,
                 context_parallel=None, prefetch: bool = False, collate=collate_packed) -> None:
        self.dataset = dataset
        self.collate = collate  # samples -> one micro-batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.context_parallel = context_parallel
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._ahead = None  # ((consumed, global_batch), Future)

    def over(self, dataset) -> "StepBatches":
        """A reader of ``dataset`` for the same rank, sizes and prefetching (the anneal
        switch's new mixture)."""
        return StepBatches(dataset, self.micro_batch, self.dp_rank, self.dp_size,
                           self.context_parallel, prefetch=self.prefetch, collate=self.collate)

    def _read(self, consumed: int, global_batch: int) -> list[dict]:
        batches = [
            self.collate([self.dataset[i] for i in indices])
            for indices in microbatch_indices(consumed, global_batch, self.micro_batch,
                                              self.dp_rank, self.dp_size)
        ]
        if self.context_parallel is not None:
            batches = [self.context_parallel(batch) for batch in batches]
        return [pin_batch(batch) for batch in batches]

    def for_step(self, consumed: int, global_batch: int) -> list[dict]:
        if self._pool is None:
            return self._read(consumed, global_batch)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (consumed, global_batch):
            batches = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # the reader is single-threaded: let it finish first
            batches = self._read(consumed, global_batch)
        following = (consumed + global_batch, global_batch)
        if following[0] + global_batch <= len(self.dataset):
            self._ahead = (following, self._pool.submit(self._read, *following))
        return batches

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._ahead = None

def check_data_files(config, tokenizer_fingerprint: Optional[dict], vocab_size: int,
                     log=print) -> None:
    """Before the first step (and before any process group: every rank checks the same files and
    fails the same way, so none waits for another): every dataset of ``--data-path`` (or
    ``--data-args-path``), ``--train/valid/test-data-path`` and ``--anneal-data-path`` is whole, consistent with its index and made
    with this run's tokenizer (data/dataset_verify.py). Raises ConfigError listing every problem;
    logs warnings (datasets without a tokenizer record)."""
    from megatron_trillion.data.dataset_verify import check_training_datasets
    from megatron_trillion.training.validation import ConfigError

    prefixes = []
    data = config.data
    blend = read_data_args_file(data.data_args_path) if data.data_args_path else data.data_path
    for flag_name, tokens in (("--data-args-path" if data.data_args_path else "--data-path",
                               blend),
                              ("--train-data-path", data.train_data_path),
                              ("--valid-data-path", data.valid_data_path),
                              ("--test-data-path", data.test_data_path),
                              ("--anneal-data-path", config.anneal.anneal_data_path)):
        # --sft/--dpo read chat JSONL, validated line by line when its dataset is built
        if tokens and not config.data.mock_data and config.kind == "pretraining":
            prefixes += [(flag_name, source.path_prefix)
                         for source in parse_data_path(tokens, flag_name)]
    if not prefixes:
        return
    progress_factory = None
    if config.data.verify_data:
        from tqdm import tqdm

        def progress_factory(prefix: str, total: int):
            bar = tqdm(total=total, unit="B", unit_scale=True, leave=False,
                       desc=f"verify {os.path.basename(prefix)}", disable=log is None)
            return lambda done: bar.update(done - bar.n)

    report = check_training_datasets(prefixes, tokenizer_fingerprint, vocab_size,
                                     full_scan=config.data.verify_data,
                                     progress_factory=progress_factory)
    if report.errors:
        raise ConfigError(report.errors)
    for warning in report.warnings:
        if log is not None:
            log(f" WARNING: {warning}")
