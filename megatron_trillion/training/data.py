"""From ``--data-path`` to this rank's micro-batches of one training step.

``--data-path`` keeps Megatron-LM's ``[WEIGHT] PREFIX ...`` syntax and adds the language:
``en:PREFIX``, or inferred from Megatron-style names ``..._<lang>_<key>_document``. Every rank
reads its own micro-batches from the (deterministic, cached) XLDA dataset: global step ``i``
covers samples ``[consumed, consumed + global_batch)``, and DP rank ``r`` takes micro-batch
``k`` = samples ``consumed + k * micro * dp + r * micro + [0, micro)`` — Megatron-LM's order, so
the union over ranks is the same for any data-parallel size.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import numpy as np

from megatron_trillion.data.packed_batch import collate_packed

_LANG_IN_NAME = re.compile(r"_([a-z]{2,3}(?:-[a-z]+)?)_[A-Za-z0-9]+_(?:document|sentence)$")


def infer_language(prefix: str) -> Optional[str]:
    match = _LANG_IN_NAME.search(os.path.basename(prefix))
    return match.group(1) if match else None


def parse_data_path(tokens: Sequence[str], flag: str = "--data-path") -> list[tuple]:
    """``[W] [LANG:]PREFIX ...`` -> ``[(weight or None, prefix, language), ...]``."""
    if not tokens:
        raise ValueError(f"{flag} is empty")
    entries, weight = [], None
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            value = None
        if value is not None:
            if weight is not None:
                raise ValueError(f"{flag}: two weights in a row ({weight} {token})")
            weight = value
            continue
        lang, sep, prefix = token.partition(":")
        if not sep or "/" in lang or not lang:
            prefix, lang = token, infer_language(token)
            if lang is None:
                raise ValueError(
                    f"{flag}: cannot tell the language of {token!r}; write it as LANG:PREFIX "
                    "(e.g. en:/data/web_en_text_document)")
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"{flag}: {prefix + ext} does not exist")
        entries.append((weight, prefix, lang))
        weight = None
    if weight is not None:
        raise ValueError(f"{flag}: weight {weight} is not followed by a dataset prefix")
    return entries


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


def write_mock_datasets(directory: str, vocab_size: int, seed: int,
                        languages: Sequence[str] = ("en", "ko", "ja"),
                        docs_per_language: int = 400) -> list[tuple]:
    """Random-token documents per language (``--mock-data``): distinct token ranges per
    language and a repeating structure so a model can learn something."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.int32 if vocab_size > 65500 else np.uint16
    entries = []
    span = max(2, (vocab_size - 1) // len(languages))
    for n, lang in enumerate(languages):
        prefix = os.path.join(directory, f"mock_{lang}_text_document")
        if not os.path.exists(prefix + ".idx"):
            builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=dtype)
            for _ in range(docs_per_language):
                length = int(rng.integers(8, 200))
                period = int(rng.integers(2, 6))
                base = rng.integers(1 + n * span, 1 + (n + 1) * span, size=period)
                doc = np.resize(base, length).astype(np.int64)
                doc[-1] = 0  # EOD
                builder.add_document(doc, [length])
            builder.finalize(prefix + ".idx.tmp")
            os.replace(prefix + ".bin.tmp", prefix + ".bin")
            os.replace(prefix + ".idx.tmp", prefix + ".idx")
        entries.append((None, prefix, lang))
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
    """Reads this rank's collated micro-batches of a step from a packed dataset."""

    def __init__(self, dataset, micro_batch: int, dp_rank: int, dp_size: int) -> None:
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def for_step(self, consumed: int, global_batch: int) -> list[dict]:
        return [
            collate_packed([self.dataset[i] for i in indices])
            for indices in microbatch_indices(consumed, global_batch, self.micro_batch,
                                              self.dp_rank, self.dp_size)
        ]


def check_data_files(config, tokenizer_fingerprint: Optional[dict], vocab_size: int,
                     log=print) -> None:
    """Before the first step (and before any process group: every rank checks the same files and
    fails the same way, so none waits for another): every dataset of ``--data-path``,
    ``--valid-data-path`` and ``--anneal-data-path`` is whole, consistent with its index and made
    with this run's tokenizer (data/dataset_verify.py). Raises ConfigError listing every problem;
    logs warnings (datasets without a tokenizer record)."""
    from megatron_trillion.data.dataset_verify import check_training_datasets
    from megatron_trillion.training.validation import ConfigError

    prefixes = []
    for flag_name, tokens in (("--data-path", config.data.data_path),
                              ("--valid-data-path", config.data.valid_data_path),
                              ("--anneal-data-path", config.anneal.anneal_data_path)):
        if tokens and not config.data.mock_data:
            prefixes += [(flag_name, entry[1]) for entry in parse_data_path(tokens, flag_name)]
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
