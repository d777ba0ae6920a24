"""XLDA sample index: the previous one-go Python builder vs the chunked compiled one.

    python bench/bench_data_index.py                     # 1M and 20M samples
    python bench/bench_data_index.py --samples 100000 --old-max-samples 100000

Synthetic corpus: 4 languages x 1M documents with log-normal lengths (median ~665 tokens),
S=4096, rho=0.5, alpha=0.5. Each measurement runs in a fresh process; "peak MB" is that
process's peak resident memory above what it held before building (imports, document sizes);
"bytes/sample" is the cache on disk. The old builder (kept below, verbatim in behaviour: one
Python loop over samples through ``MixtureSampler``, every piece and every source's cursor
after every sample stored, saved as one .npz) is run up to ``--old-max-samples`` and its
per-sample figures projected beyond. The run also checks the two agree sample for sample on
the first samples. The 2T-token projection is for Trillion-7B (2T tokens at S=4096 = 488M
samples).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

LANGUAGES = ("en", "ko", "ja", "zh")
SEQ = 4096
DOCS = 1_000_000
TOKENS_2T = 2_000_000_000_000


def _corpus(seed: int = 0):
    from megatron_trillion.data.mixture import DataSource, LanguageMixture
    from megatron_trillion.data.sample_index import DocumentStream

    rng = np.random.default_rng(seed)
    sizes = [np.maximum(1, rng.lognormal(6.5, 1.0, DOCS)).astype(np.int64) for _ in LANGUAGES]
    sources = tuple(DataSource(f"/synthetic/web_{l}_text_document", l) for l in LANGUAGES)
    mixture = LanguageMixture.from_sources(sources, alpha=0.5,
                                           beta={l: 1 / len(LANGUAGES) for l in LANGUAGES},
                                           source_tokens=[int(s.sum()) for s in sizes])
    streams = [DocumentStream(s, 1234, os.path.basename(src.path_prefix))
               for s, src in zip(sizes, sources)]
    return mixture, streams


# ---------------------------------------------------------------------------------------------
# the previous builder


def _old_document_end(stream, offset: int) -> int:
    epoch, rest = divmod(int(offset), stream.total)
    _, ends = stream.epoch(epoch)
    return int(ends[int(np.searchsorted(ends, rest, side="right"))]) - rest


def old_build(mixture, streams, num_samples: int, rho=0.5, anchor="en", seed=1234):
    """The previous ``build_sample_index``: -> (pieces per sample, arrays as it saved them)."""
    from megatron_trillion.data.mixture import MixtureSampler

    sampler = MixtureSampler(mixture, seed)
    languages = mixture.languages
    partners = [l for l in languages if l != anchor]
    ptr = np.zeros(num_samples + 1, dtype=np.int64)
    cross = np.zeros(num_samples, dtype=bool)
    cursor_after = np.zeros((num_samples, len(streams)), dtype=np.int64)
    src, starts, lengths, blocks = [], [], [], []
    for k in range(num_samples):
        draws = sampler.begin_sample()
        if draws[0] < rho:
            cross[k] = True
            partner = sampler.pick_language(partners, SEQ // 2)
            order = [anchor, partner] if draws[1] < 0.5 else [partner, anchor]
            chosen = [sampler.pick_source(order[0]), sampler.pick_source(order[1])]
            remaining, turn = SEQ, 0
            while remaining > 0:
                source = chosen[turn % 2]
                limit = min(remaining, SEQ // 2) if turn == 0 else remaining
                length = min(limit, _old_document_end(streams[source], sampler.cursor[source]))
                src.append(source)
                starts.append(int(sampler.cursor[source]))
                lengths.append(length)
                blocks.append(turn // 2)
                sampler.record(source, length)
                remaining -= length
                turn += 1
        else:
            source = sampler.pick_source(sampler.pick_language(languages, SEQ))
            src.append(source)
            starts.append(int(sampler.cursor[source]))
            lengths.append(SEQ)
            blocks.append(-1)
            sampler.record(source, SEQ)
        ptr[k + 1] = len(src)
        cursor_after[k] = sampler.cursor
    return dict(sample_ptr=ptr, piece_source=np.asarray(src, dtype=np.int32),
                piece_start=np.asarray(starts, dtype=np.int64),
                piece_length=np.asarray(lengths, dtype=np.int64),
                piece_block=np.asarray(blocks, dtype=np.int32), cross_lingual=cross,
                cursor_after=cursor_after)


# ---------------------------------------------------------------------------------------------
# measurements (each in a fresh process)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _measure(kind: str, num_samples: int, directory: str, queue) -> None:
    mixture, streams = _corpus()
    if kind == "new":
        from megatron_trillion.data.mixture import MixtureState
        from megatron_trillion.data.sample_index import ChunkedSampleIndex, IndexSpec

        spec = IndexSpec.of(mixture, streams, SEQ, 0.5, "en", 1234, MixtureState(1234),
                            check_files=False)
        # Compile (or load numba's on-disk cache) before timing: a one-off per machine.
        ChunkedSampleIndex(spec, os.path.join(directory, "warmup"), 0, 1000).build_all()
    before = _rss_mb()
    began, cpu = time.perf_counter(), time.process_time()
    if kind == "old":
        arrays = old_build(mixture, streams, num_samples)
        path = os.path.join(directory, "old.npz")
        np.savez(path, first_sample=0, **arrays)
        size = os.path.getsize(path)
    else:
        index = ChunkedSampleIndex(spec, directory, 0, num_samples)
        index.build_all()
        size = sum(os.path.getsize(os.path.join(index.directory, f))
                   for f in os.listdir(index.directory))
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    queue.put((seconds, cpu, peak, size))


def measure(kind: str, num_samples: int) -> tuple[float, float, float, float]:
    """(wall us/sample, CPU us/sample, peak MB above baseline, bytes/sample)."""
    with tempfile.TemporaryDirectory() as directory:
        context = mp.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_measure, args=(kind, num_samples, directory, queue))
        process.start()
        seconds, cpu, peak, size = queue.get()
        process.join()
    return seconds / num_samples * 1e6, cpu / num_samples * 1e6, peak, size / num_samples


def check_same_samples(num_samples: int) -> None:
    """The chunked builder reproduces the previous builder's pieces exactly."""
    from megatron_trillion.data.mixture import MixtureState
    from megatron_trillion.data.sample_index import ChunkedSampleIndex, IndexSpec

    mixture, streams = _corpus()
    old = old_build(mixture, streams, num_samples)
    spec = IndexSpec.of(mixture, streams, SEQ, 0.5, "en", 1234, MixtureState(1234),
                        chunk_samples=max(1, num_samples // 3), check_files=False)
    with tempfile.TemporaryDirectory() as directory:
        index = ChunkedSampleIndex(spec, directory, 0, num_samples)
        for k in range(num_samples):
            lo, hi = old["sample_ptr"][k], old["sample_ptr"][k + 1]
            expected = [(int(old["piece_source"][p]), int(old["piece_start"][p]),
                         int(old["piece_length"][p]), int(old["piece_block"][p]))
                        for p in range(lo, hi)]
            if index.pieces(k) != expected:
                raise SystemExit(f"sample {k} differs: old {expected}, new {index.pieces(k)}")
            if k + 1 < num_samples and k % 97 == 0:
                np.testing.assert_array_equal(index.cursors_at(k + 1), old["cursor_after"][k])
    print(f"old and new builders agree on all {num_samples:,} samples (pieces and cursors)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 20_000_000])
    parser.add_argument("--old-max-samples", type=int, default=1_000_000,
                        help="run the old builder up to this many samples; project beyond")
    parser.add_argument("--check-samples", type=int, default=3000)
    args = parser.parse_args()

    check_same_samples(args.check_samples)
    # The old builder's memory grows with the samples: its slope between two runs projects
    # it to sizes not run.
    old_max = args.old_max_samples
    small, old_at_max = measure("old", max(1, old_max // 4)), measure("old", old_max)
    slope = (old_at_max[2] - small[2]) / (old_max - max(1, old_max // 4))

    def old_at(n: int) -> tuple[tuple, str]:
        if n == old_max:
            return old_at_max, ""
        if n < old_max:
            return measure("old", n), ""
        return ((old_at_max[0], old_at_max[1], old_at_max[2] + slope * (n - old_max),
                 old_at_max[3]), f" (projected from {old_max:,})")

    rows = [(n, *old_at(n), measure("new", n)) for n in args.samples]
    print(f"\n{'samples':>12} {'':>4} {'us/sample':>10} {'cpu us/s.':>10} {'peak MB':>9} "
          f"{'bytes/sample':>13}")
    for n, old, note, new in rows:
        print(f"{n:>12,} {'old':>4} {old[0]:>10.2f} {old[1]:>10.2f} {old[2]:>9.0f} "
              f"{old[3]:>13.1f}{note}")
        print(f"{'':>12} {'new':>4} {new[0]:>10.2f} {new[1]:>10.2f} {new[2]:>9.0f} "
              f"{new[3]:>13.1f}")
    n, old, _, new = rows[-1]
    samples_2t = TOKENS_2T // SEQ
    print(f"\nprojected for 2T tokens at S={SEQ} ({samples_2t / 1e6:.0f}M samples, one core, "
          "CPU time):")
    old_peak_2t = old_at_max[2] + slope * (samples_2t - old_max)
    for name, (_, cpu, peak, per_sample), peak_2t in (("old", old, old_peak_2t),
                                                       ("new", new, new[2])):
        print(f"  {name}: {cpu * samples_2t / 1e6 / 60:7.1f} min, peak {peak_2t / 1024:7.1f} GB "
              f"({'grows with samples' if name == 'old' else 'one chunk, flat'}), "
              f"cache {per_sample * samples_2t / 2**30:6.1f} GiB "
              f"({'loaded into RAM on every rank' if name == 'old' else 'memory-mapped'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
