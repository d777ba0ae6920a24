"""Preprocessing throughput: ours next to the bare `tokenizers` encode_batch ceiling.

    python bench/bench_preprocess.py [--docs-per-lang 6000] [--workers 2]

Generates an EN/KO/JA JSONL with megatron_trillion.data.sample_corpus, trains a byte-level BPE
on it, then measures in the same run:
  ceiling   tokenizer.encode_batch(all texts) on texts already in memory (JSON parsed outside
            the timing; the library's own threads use every core) -- the practical ceiling
  ours      the full preprocess (read, parse, tokenize in --workers processes, write .bin/.idx,
            summary), as tools/preprocess_data.py --append-eod --workers N runs it
  megatron  Megatron-LM's approach emulated: a Pool.imap over lines in chunks of 32, one
            json.loads + tokenizer.encode per document, IndexedDatasetBuilder.add_document
            (on the first quarter of the documents)
The ceiling is measured before and after ours and averaged, since the machine may be shared.
On a shared machine wall-clock rates swing with other load, so the table also gives tokens per
CPU-second (this process, its threads and its finished child processes), which does not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_trillion.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_trillion.data.sample_corpus import write_sample_corpus  # noqa: E402
from megatron_trillion.data.tokenizer_training import (  # noqa: E402
    TokenizerTrainingConfig,
    train_tokenizer,
)
from megatron_trillion.data.tokenizers import TokenizerConfig  # noqa: E402


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Rate:
    """Tokens per wall-clock second and per CPU-second of one measured call."""

    def __init__(self, fn):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        self.tokens = fn()
        self.wall = self.tokens / (time.perf_counter() - wall)
        self.cpu = self.tokens / max(_cpu_seconds() - cpu, 1e-9)


def _measure_ceiling(tokenizer_dir: Path, texts: list[str], fast: bool = False) -> _Rate:
    """encode_batch (fast=True: encode_batch_fast, no offsets, what our workers call)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    return _Rate(lambda: sum(len(e.ids) for e in encode(texts, add_special_tokens=False)))


class _MegatronStyleEncoder:
    """Per-document encode as Megatron-LM's Encoder.encode does (one call per line)."""

    def __init__(self, tokenizer_dir: str) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = None

    def __call__(self, line: str):
        if self.tokenizer is None:
            from megatron_trillion.data.tokenizers import HuggingFaceTokenizer

            self.tokenizer = HuggingFaceTokenizer(self.tokenizer_dir)
        ids = self.tokenizer.encode(json.loads(line)["text"])
        if ids:
            ids.append(self.tokenizer.eod)
        return ids, [len(ids)] if ids else []


def _megatron_style(corpus: Path, tokenizer_dir: Path, workers: int, out: Path,
                    max_docs: int) -> int:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_trillion.data.tokenizers import HuggingFaceTokenizer

    vocab = HuggingFaceTokenizer(str(tokenizer_dir)).vocab_size
    builder = IndexedDatasetBuilder(str(out) + ".bin", dtype=DType.optimal_dtype(vocab))
    tokens = 0
    pool = multiprocessing.Pool(workers)  # the platform default, as Megatron-LM's tool
    with open(corpus) as fin:
        lines = itertools.islice(fin, max_docs)
        for ids, lengths in pool.imap(_MegatronStyleEncoder(str(tokenizer_dir)), lines, 32):
            builder.add_document(ids, lengths)
            tokens += len(ids)
    pool.close()
    pool.join()
    builder.finalize(str(out) + ".idx")
    return tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs-per-lang", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-megatron", action="store_true", help="skip the emulated baseline")
    parser.add_argument("--work-dir", help="keep files here instead of a temporary directory")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = write_sample_corpus(work / "corpus.jsonl", docs_per_lang=args.docs_per_lang)
        tokenizer_dir = work / "tokenizer"
        train_tokenizer(TokenizerTrainingConfig(
            inputs=(str(corpus),), output_dir=str(tokenizer_dir), max_docs_per_lang=2000,
            budgets={"en": 4000, "ko": 3000, "ja": 3000},
        ))
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        size_mb = corpus.stat().st_size / 1e6

        # Both tools import megatron-core (and torch) once at startup; like Megatron-LM's own
        # "Time to startup", that one-time cost is kept out of the throughput.
        import megatron.core.datasets.indexed_dataset  # noqa: F401

        before = _measure_ceiling(tokenizer_dir, texts)
        config = PreprocessConfig(
            inputs=(str(corpus),), output_prefix=str(work / "ours"),
            tokenizer=TokenizerConfig("HuggingFaceTokenizer", str(tokenizer_dir)),
            append_eod=True, workers=args.workers,
        )
        summaries = []
        ours = _Rate(lambda: summaries.append(preprocess(config)) or summaries[0].tokens)
        summary = summaries[0]
        after = _measure_ceiling(tokenizer_dir, texts)
        fast = _measure_ceiling(tokenizer_dir, texts, fast=True)
        megatron_rate = None
        if not args.no_megatron:
            # its rate is steady, so a quarter of the documents keeps the run short
            megatron_rate = _Rate(lambda: _megatron_style(
                corpus, tokenizer_dir, args.workers, work / "megatron_style", len(texts) // 4))

    ceiling_wall = (before.wall + after.wall) / 2
    ceiling_cpu = (before.cpu + after.cpu) / 2
    print(f"input: {size_mb:.1f} MB JSONL, {summary.docs} docs (en/ko/ja), {summary.tokens} "
          f"tokens, {os.cpu_count()} cores, --workers {args.workers}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'':<34}{'tokens/s':>11}{'ratio':>7}{'tokens/CPU-s':>14}{'ratio':>7}")
    rows = [("encode_batch ceiling (mean of 2)", ceiling_wall, ceiling_cpu),
            ("  ceiling before", before.wall, before.cpu),
            ("  ceiling after", after.wall, after.cpu),
            ("encode_batch_fast (reference)", fast.wall, fast.cpu),
            ("preprocess (ours)", ours.wall, ours.cpu)]
    if megatron_rate is not None:
        rows.append(("Megatron-LM-style (emulated)", megatron_rate.wall, megatron_rate.cpu))
    for name, wall, cpu in rows:
        print(f"{name:<34}{wall:>11,.0f}{wall / ceiling_wall:>7.2f}{cpu:>14,.0f}"
              f"{cpu / ceiling_cpu:>7.2f}")
    if megatron_rate is not None:
        print(f"ours / Megatron-LM-style: {ours.wall / megatron_rate.wall:.2f}x wall, "
              f"{ours.cpu / megatron_rate.cpu:.2f}x CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
