"""Cost of the start-up data checks, side by side with a full read of the same data.

    python bench/bench_data_checks.py [--big-mb 150] [--docs 20000] [--datasets 4]

Writes, with megatron-core's IndexedDatasetBuilder and a tokenizer record as
tools/preprocess_data.py leaves it: one ~150 MB dataset (uint16 tokens) and 4 datasets of 20,000
documents each. Then measures, per dataset, in one run:
  startup   what every training start does (data/dataset_verify.check_training_datasets): the
            .idx header, the .bin size against the index, the tokenizer record, the token ids of
            64 sampled documents
  verify    the same with --verify-data: every token id scanned through the memory map
  read      a plain full read of the .bin (numpy max over a memory map), for scale
and prints milliseconds and the ratios startup/read and verify/read. The page cache is warm for
all three (each file is read once before timing), so the ratios compare work, not disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_trillion.data.dataset_verify import (  # noqa: E402
    DATASET_RECORD_SUFFIX,
    check_training_datasets,
    dataset_record,
)

VOCAB = 32000
FINGERPRINT = {"tokenizer_type": "HuggingFaceTokenizer", "files": [], "sha256": "0" * 64,
               "vocab_size": VOCAB, "eod": 0, "bos": None, "pad": None}


def _write(prefix: str, docs: int, mean_tokens: int, rng) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    lengths = np.maximum(8, rng.poisson(mean_tokens, size=docs))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for length in lengths:
        builder.add_document(rng.integers(1, VOCAB, size=int(length)), [int(length)])
    builder.finalize(prefix + ".idx")
    with open(prefix + DATASET_RECORD_SUFFIX, "w") as f:
        f.write(dataset_record(FINGERPRINT, docs, int(lengths.sum()), "uint16"))
    return int(lengths.sum())


def _best_ms(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=float, default=150)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--datasets", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        datasets = []
        big_docs = int(args.big_mb * 1e6 / 2 / 1000)
        datasets.append((os.path.join(tmp, "big_en_text_document"), big_docs, 1000))
        for n in range(args.datasets):
            datasets.append((os.path.join(tmp, f"synthetic{n}_ko_text_document"), args.docs, 400))
        print(f"{'dataset':<28}{'docs':>9}{'MB':>8}{'startup ms':>12}{'verify ms':>11}"
              f"{'read ms':>9}{'startup/read':>14}{'verify/read':>13}")
        for prefix, docs, mean in datasets:
            _write(prefix, docs, mean, rng)
            tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r")
            read = _best_ms(lambda: tokens.max())
            spec = [("--data-path", prefix)]
            startup = _best_ms(lambda: check_training_datasets(spec, FINGERPRINT, VOCAB))
            verify = _best_ms(lambda: check_training_datasets(spec, FINGERPRINT, VOCAB,
                                                              full_scan=True))
            report = check_training_datasets(spec, FINGERPRINT, VOCAB)
            assert not report.errors and not report.warnings, report
            size = os.path.getsize(prefix + ".bin") / 1e6
            print(f"{os.path.basename(prefix):<28}{docs:>9}{size:>8.1f}{startup:>12.2f}"
                  f"{verify:>11.1f}{read:>9.1f}{startup / read:>14.3f}{verify / read:>13.2f}")


if __name__ == "__main__":
    main()
