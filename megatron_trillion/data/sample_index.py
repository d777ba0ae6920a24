"""The XLDA sample index: which stream ranges make each packed sample, built in chunks and
cached as memory-mapped ``.npy`` files.

Public interface (used by ``megatron_trillion.data.xlda_packing``, the packed-sample reader)::

    spec = IndexSpec.of(mixture, streams, seq_length, rho, anchor_language, seed, phase_start)
    index = ChunkedSampleIndex(spec, cache_root, first_sample, num_samples)
    index.ensure(sample)                    # build (or find) the chunks up to ``sample``'s
    index.record(sample) -> (sources, starts)   # the sample's one or two streams and offsets
    index.cursors_at(sample)                # every stream's cursor before ``sample``
    index.cross_lingual[k]                  # whether sample first_sample + k mixes languages
    cross_lingual_pieces(seq, starts, ends_a, lo_a, ends_b, lo_b, lengths)   # the piece rule

What a sample is. Sample ``i`` is one or two *streams* (a source's documents in a seeded
per-epoch order, concatenated over epochs, ``DocumentStream``) and the offset in each where it
starts; the pieces follow from the document boundaries: a monolingual sample is ``seq_length``
tokens of one stream; a cross-lingual one alternates its two streams one document (or the
space left) at a time, the first piece at most half the sample (``cross_lingual_pieces``, the
one place this rule lives; the builder and the reader both call it). So a sample is 20 bytes
(two int16 source ids, two int64 offsets), and the mixture sampler's whole state between
samples is the streams' cursors: ``MixtureSampler``'s deficit counters are cursor differences.

Chunks. Samples are built ``chunk_samples`` (default 2**20) at a time from the cursors at the
chunk's start, by a compiled loop (numba; ``_walk``). Chunk ``c`` holds samples
``first_sample + c * chunk_samples + [0, chunk_samples)`` of its phase (fewer for the last one
of a run) in ``samples-<c>.npy``; a full chunk also leaves ``cursors-<c>.npy``, the cursors
after it = the next chunk's start, so a chunk is deterministic given its start and the chain
is resumable anywhere. Content depends on nothing but the spec (not on the sample count, the
data-parallel size or who built it), so a longer run reuses every chunk and concurrent
builders (several ranks, the build tool and a training job) write identical files. Files are
written under a temporary name and renamed: a killed builder leaves no chunk that can be read.

Why a compiled loop. The deficit choice of sample ``i`` depends on the tokens every earlier
sample took, and a cross-lingual piece's length on where the document ends, so the loop is
sequential and not expressible as numpy array operations; in Python it cost ~21 CPU-us per
sample (~3 h for a 2T-token run). numba compiles the same loop to ~0.6 CPU-us per sample end
to end, files included (bench/bench_data_index.py on these 2 cores; ~3 s of compilation once
per machine, then cached), with no compiler needed at install time; megatron-core's own answer
(its C++ ``helpers``) needs a compiler when it is first imported.

Cache layout: ``<cache_root>/xlda-index-<hash>/`` with ``spec.json`` (what the hash covers:
mixture, token counts, the data files' sizes and modification times, packing settings, phase
start, chunk size, format version) and the chunk files. A changed data file changes the hash:
the index is rebuilt in a new directory, never read stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numba
import numpy as np

from megatron_trillion.data.mixture import (
    DeficitTables,
    LanguageMixture,
    MixtureState,
    pick_language_by_deficit,
    pick_source_by_deficit,
    sample_randoms,
)
from megatron_trillion.errors import UserError

__all__ = [
    "DEFAULT_CHUNK_SAMPLES",
    "SAMPLE_DTYPE",
    "DocumentStream",
    "IndexSpec",
    "ChunkedSampleIndex",
    "cross_lingual_pieces",
]

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
DEFAULT_CHUNK_SAMPLES = 1 << 20
# source[1] == -1: monolingual; start[1] is then unused.
SAMPLE_DTYPE = np.dtype([("source", "<i2", (2,)), ("start", "<i8", (2,))])
_RANDOM_BLOCK = 1 << 18  # random numbers are made this many samples at a time (8 MB)


# ---------------------------------------------------------------------------------------------
# streams


class DocumentStream:
    """One source's documents in a seeded per-epoch order, addressed by token offset."""

    _KEEP = 2  # epochs and windows cached for the reader (each ~8-16 bytes per document)

    def __init__(self, sizes: np.ndarray, seed: int, key: str) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        # The key (path basename) rather than the position in the mixture seeds the order, so
        # changing the mixture does not reshuffle a source.
        self._seed = [int(seed), zlib.crc32(key.encode())]
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the background chunk builder shares the caches

    def __getstate__(self) -> dict:  # pickles (DataLoader workers) without caches and lock
        return {**self.__dict__, "_epochs": {}, "_windows": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self._seed + [epoch]).permutation(len(self.sizes))

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative end offsets inside the epoch) of one epoch."""
        with self._lock:
            cached = self._epochs.get(epoch)
        if cached is None:
            order = self._order(epoch)
            cached = (order, np.cumsum(self.sizes[order]))
            with self._lock:
                if len(self._epochs) >= self._KEEP:
                    # Bounded: a small, heavily upsampled source runs through many epochs.
                    self._epochs.pop(next(iter(self._epochs)))
                self._epochs[epoch] = cached
        return cached

    def window(self, first_epoch: int, epochs: int, out: Optional[np.ndarray] = None
               ) -> np.ndarray:
        """Absolute stream offsets of the document ends of epochs ``first_epoch + [0, epochs)``.

        With ``out`` (the index builder's buffer) nothing is cached: the builder's memory is
        its window, whatever the run's length; without, windows are cached for the reader."""
        if out is not None:
            n = len(self.sizes)
            for e in range(epochs):
                np.cumsum(self.sizes[self._order(first_epoch + e)], out=out[e * n:(e + 1) * n])
                out[e * n:(e + 1) * n] += (first_epoch + e) * self.total
            return out
        with self._lock:
            cached = self._windows.get(first_epoch)
        if cached is None or len(cached) != epochs * len(self.sizes):
            cached = np.concatenate([self.epoch(e)[1] + e * self.total
                                     for e in range(first_epoch, first_epoch + epochs)])
            with self._lock:
                if len(self._windows) >= self._KEEP:
                    self._windows.pop(next(iter(self._windows)))
                self._windows[first_epoch] = cached
        return cached

    def segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, bool]]:
        """(document id, offset in document, count, starts_document) covering the range."""
        offset, length = int(offset), int(length)
        while length > 0:
            epoch, rest = divmod(offset, self.total)
            order, ends = self.epoch(epoch)
            position = int(np.searchsorted(ends, rest, side="right"))
            start = int(ends[position] - self.sizes[order[position]])
            inner = rest - start
            count = min(length, int(ends[position]) - rest)
            yield int(order[position]), inner, count, inner == 0
            offset += count
            length -= count


# ---------------------------------------------------------------------------------------------
# the compiled rules


@numba.njit(cache=True, nogil=True)
def _document_end(ends, lo, cursor):
    """Offset where the document holding ``cursor`` ends; -1 if the window misses it."""
    if cursor < lo or cursor >= ends[-1]:
        return -1
    return ends[np.searchsorted(ends, cursor, side="right")]


@numba.njit(cache=True, nogil=True)
def cross_lingual_pieces(seq_length, start_a, start_b, ends_a, lo_a, ends_b, lo_b, lengths):
    """Piece lengths of a cross-lingual sample whose two streams start at ``start_a`` (first
    piece) and ``start_b``: pieces alternate a, b, a, ...; each runs to its document's end or
    the space left; the first is at most half the sample so both languages are present.
    ``ends_*`` are windows of a stream's absolute document ends starting at offset ``lo_*``.
    Returns the number of pieces written to ``lengths``; -1 / -2 if the window of stream a / b
    does not reach a cursor (the caller moves the window and asks again)."""
    cursor_a, cursor_b = start_a, start_b
    remaining, turn = seq_length, 0
    while remaining > 0:
        limit = min(remaining, seq_length // 2) if turn == 0 else remaining
        if turn % 2 == 0:
            end = _document_end(ends_a, lo_a, cursor_a)
            if end < 0:
                return -1
            length = min(limit, end - cursor_a)
            cursor_a += length
        else:
            end = _document_end(ends_b, lo_b, cursor_b)
            if end < 0:
                return -2
            length = min(limit, end - cursor_b)
            cursor_b += length
        lengths[turn] = length
        remaining -= length
        turn += 1
    return turn


@numba.njit(cache=True, nogil=True)
def _walk(randoms, rho, seq_length, anchor, language_probabilities, name_rank, source_language,
          source_probabilities, members, member_ptr, language_source_probability,
          partner_mask, all_mask, cursor, phase_start_cursor, language_tokens,
          window_ends, window_ptr, window_lo, out_source, out_start, scratch):
    """Pack ``len(randoms)`` samples from ``cursor`` (updated in place with
    ``language_tokens``). Returns (samples packed, source whose document-end window must move
    before the next sample, or -1 when all were packed)."""
    source_tokens = cursor - phase_start_cursor  # this phase's draws: the in-language deficit
    half = seq_length // 2
    for k in range(len(randoms)):
        if randoms[k, 0] < rho:
            partner = pick_language_by_deficit(language_tokens, language_probabilities,
                                               name_rank, partner_mask, half)
            first, second = (anchor, partner) if randoms[k, 1] < 0.5 else (partner, anchor)
            a = pick_source_by_deficit(source_tokens, source_probabilities,
                                       members[member_ptr[first]:member_ptr[first + 1]],
                                       language_source_probability[first])
            b = pick_source_by_deficit(source_tokens, source_probabilities,
                                       members[member_ptr[second]:member_ptr[second + 1]],
                                       language_source_probability[second])
            n = cross_lingual_pieces(seq_length, cursor[a], cursor[b],
                                     window_ends[window_ptr[a]:window_ptr[a + 1]], window_lo[a],
                                     window_ends[window_ptr[b]:window_ptr[b + 1]], window_lo[b],
                                     scratch)
            if n < 0:
                return k, a if n == -1 else b
            take_a = scratch[0:n:2].sum()
            take_b = scratch[1:n:2].sum()
            out_source[k, 0], out_source[k, 1] = a, b
            out_start[k, 0], out_start[k, 1] = cursor[a], cursor[b]
            cursor[a] += take_a
            source_tokens[a] += take_a
            language_tokens[source_language[a]] += take_a
            cursor[b] += take_b
            source_tokens[b] += take_b
            language_tokens[source_language[b]] += take_b
        else:
            language = pick_language_by_deficit(language_tokens, language_probabilities,
                                                name_rank, all_mask, seq_length)
            s = pick_source_by_deficit(source_tokens, source_probabilities,
                                       members[member_ptr[language]:member_ptr[language + 1]],
                                       language_source_probability[language])
            out_source[k, 0], out_source[k, 1] = s, -1
            out_start[k, 0], out_start[k, 1] = cursor[s], 0
            cursor[s] += seq_length
            source_tokens[s] += seq_length
            language_tokens[source_language[s]] += seq_length
    return len(randoms), -1


# ---------------------------------------------------------------------------------------------
# what shapes the index


def file_fingerprint(path_prefix: str) -> dict:
    """Sizes and modification times of a dataset's files: a change means a different index."""
    out = {}
    for ext in (".bin", ".idx"):
        stat = os.stat(path_prefix + ext)
        out[ext] = [stat.st_size, stat.st_mtime_ns]
    return out


@dataclass
class IndexSpec:
    """Everything that shapes one phase's samples; ``key`` hashes it."""

    mixture: LanguageMixture
    streams: Sequence[DocumentStream]
    seq_length: int
    rho: float
    anchor_language: str
    seed: int
    phase_start: MixtureState
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES
    fingerprints: Optional[list] = None   # file_fingerprint per source (None: no files)

    @classmethod
    def of(cls, mixture, streams, seq_length, rho, anchor_language, seed, phase_start,
           chunk_samples=DEFAULT_CHUNK_SAMPLES, check_files=True) -> "IndexSpec":
        if len(mixture.sources) > np.iinfo(np.int16).max:
            raise UserError(f"{len(mixture.sources)} data sources: the sample index holds at "
                             f"most {np.iinfo(np.int16).max} (its source ids are int16)")
        fingerprints = ([file_fingerprint(s.path_prefix) for s in mixture.sources]
                        if check_files else None)
        return cls(mixture, list(streams), int(seq_length), float(rho), anchor_language,
                   int(seed), phase_start, int(chunk_samples), fingerprints)

    def describe(self) -> dict:
        return {
            "version": INDEX_VERSION,
            "mixture": self.mixture.describe(),
            "files": self.fingerprints,
            "seq_length": self.seq_length,
            "rho": self.rho,
            "anchor_language": self.anchor_language,
            "seed": self.seed,
            "chunk_samples": self.chunk_samples,
            "phase_start": {k: v for k, v in self.phase_start.to_dict().items()
                            if k != "source_probabilities"},
        }

    @property
    def key(self) -> str:
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def start_cursor(self) -> np.ndarray:
        consumed = self.phase_start.consumed_tokens
        return np.asarray([consumed.get(s.path_prefix, 0) for s in self.mixture.sources],
                          dtype=np.int64)

    def window_epochs(self, source: int) -> int:
        # A sample takes at most seq_length tokens from a stream, from an offset in the
        # window's first epoch, so it ends before epoch first + 1 + seq_length // total.
        return 2 + self.seq_length // self.streams[source].total


def _warn_if_shares_missed(spec: IndexSpec, language_tokens: np.ndarray) -> None:
    # Cross-lingual samples give the anchor about half their tokens; if rho is high and the
    # anchor's target share low, monolingual samples cannot compensate. Say so.
    total = int(language_tokens.sum())
    for language, tokens in zip(spec.mixture.languages, language_tokens):
        target = spec.mixture.language_probabilities[language]
        if total and abs(tokens / total - target) > 0.02:
            logger.warning(
                "language %s gets %.3f of the tokens instead of its eq. 2 share %.3f: "
                "rho=%.2f with anchor %s is not reachable for this mixture; lower rho or "
                "raise the anchor's share", language, tokens / total, target, spec.rho,
                spec.anchor_language)


class _Walker:
    """Runs the compiled loop: keeps the deficit tables and each stream's window of
    document ends (moved forward when a cursor leaves it)."""

    def __init__(self, spec: IndexSpec) -> None:
        self.spec = spec
        mixture = spec.mixture
        tables = DeficitTables.of(mixture)
        languages = mixture.languages
        self.tables = tables
        self.members = np.concatenate(tables.members)
        self.member_ptr = np.cumsum([0] + [len(m) for m in tables.members]).astype(np.int64)
        anchor = languages.index(spec.anchor_language) if spec.anchor_language in languages \
            else -1
        self.anchor = anchor
        self.partner_mask = np.asarray([n != anchor for n in range(len(languages))])
        self.all_mask = np.ones(len(languages), dtype=np.bool_)
        sizes = [spec.window_epochs(s) * len(stream.sizes)
                 for s, stream in enumerate(spec.streams)]
        self.window_ptr = np.cumsum([0] + sizes).astype(np.int64)
        self.window_ends = np.empty(int(self.window_ptr[-1]), dtype=np.int64)
        # Nothing loaded yet: a window starting past every offset misses them all.
        self.window_lo = np.full(len(spec.streams), np.iinfo(np.int64).max, dtype=np.int64)
        self.window_epoch = [-1] * len(spec.streams)
        self.scratch = np.empty(max(spec.seq_length, 1), dtype=np.int64)
        self.phase_start_cursor = spec.start_cursor()

    def _move_window(self, source: int, cursor: int) -> None:
        stream = self.spec.streams[source]
        epoch = int(cursor) // stream.total
        if epoch == self.window_epoch[source]:
            raise RuntimeError(f"stream {source}: the window at epoch {epoch} misses offset "
                               f"{cursor}")  # an internal invariant; the sizing above holds it
        stream.window(epoch, self.spec.window_epochs(source),
                      out=self.window_ends[self.window_ptr[source]:self.window_ptr[source + 1]])
        self.window_lo[source] = epoch * stream.total
        self.window_epoch[source] = epoch

    def language_tokens(self, cursor: np.ndarray) -> np.ndarray:
        """The deficit counters at ``cursor``: the phase start's plus this phase's draws."""
        mixture, start = self.spec.mixture, self.spec.phase_start
        tokens = np.asarray([start.tokens_per_language.get(l, 0) for l in mixture.languages],
                            dtype=np.int64)
        np.add.at(tokens, self.tables.source_language, cursor - self.phase_start_cursor)
        return tokens

    def walk(self, first_sample: int, count: int, cursor: np.ndarray,
             out: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``first_sample + [0, count)`` from ``cursor`` -> (records, cursor after)."""
        spec = self.spec
        cursor = np.array(cursor, dtype=np.int64)
        language_tokens = self.language_tokens(cursor)
        records = np.empty(count, dtype=SAMPLE_DTYPE) if out is None else out
        sources = np.empty((min(count, _RANDOM_BLOCK), 2), dtype=np.int16)
        starts = np.empty((min(count, _RANDOM_BLOCK), 2), dtype=np.int64)
        done = 0
        while done < count:
            block = min(_RANDOM_BLOCK, count - done)
            randoms = sample_randoms(spec.seed, first_sample + done, block)
            packed = 0
            while packed < block:
                n, missed = _walk(
                    randoms[packed:], spec.rho, spec.seq_length, self.anchor,
                    self.tables.language_probabilities, self.tables.name_rank,
                    self.tables.source_language, self.tables.source_probabilities,
                    self.members, self.member_ptr, self.tables.language_source_probability,
                    self.partner_mask, self.all_mask, cursor, self.phase_start_cursor,
                    language_tokens, self.window_ends, self.window_ptr, self.window_lo,
                    sources[packed:block], starts[packed:block], self.scratch)
                packed += n
                if missed >= 0:
                    self._move_window(missed, cursor[missed])
            records["source"][done:done + block] = sources[:block]
            records["start"][done:done + block] = starts[:block]
            done += block
        return records, cursor


# ---------------------------------------------------------------------------------------------
# the chunked, cached index


class _CrossLingual:
    """``index.cross_lingual[k]``: whether sample ``first_sample + k`` mixes languages."""

    def __init__(self, index: "ChunkedSampleIndex") -> None:
        self._index = index

    def __getitem__(self, k: int) -> bool:
        sources, _ = self._index.record(self._index.first_sample + int(k))
        return bool(sources[1] >= 0)

    def __len__(self) -> int:
        return self._index.num_samples


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)  # a reader sees the whole file or none


class ChunkedSampleIndex:
    """Samples ``[first_sample, first_sample + num_samples)`` of one mixture phase.

    Chunks are found in, or built into, ``<cache_root>/xlda-index-<spec.key>/`` on first use
    and memory-mapped; ``built`` / ``found`` count chunks built here / read from the cache.
    """

    _OPEN_CHUNKS = 4

    def __init__(self, spec: IndexSpec, cache_root: str, first_sample: int,
                 num_samples: int) -> None:
        self.spec = spec
        self.first_sample = int(first_sample)
        self.num_samples = int(num_samples)
        self.directory = os.path.join(cache_root, f"xlda-index-{spec.key}")
        self.chunk_samples = spec.chunk_samples
        self.built = 0
        self.found = 0
        self._shares_checked = False
        self._chunks: dict[int, np.ndarray] = {}
        self._walker: Optional[_Walker] = None
        self._lock = threading.RLock()   # one builder at a time in this process
        self._prefetch: Optional[threading.Thread] = None
        self.prefetch = False            # build the next chunk in the background when reading
        self.cross_lingual = _CrossLingual(self)
        try:
            os.makedirs(self.directory, exist_ok=True)
            spec_path = os.path.join(self.directory, "spec.json")
            if not os.path.exists(spec_path):
                tmp = f"{spec_path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(spec.describe(), f, indent=1, sort_keys=True)
                os.replace(tmp, spec_path)
        except OSError as exc:
            raise UserError(f"cannot write the sample index cache {self.directory} ({exc}); "
                             "give a writable --data-cache-path") from exc

    def __getstate__(self) -> dict:  # pickles without open files, builder thread or lock
        return {**self.__dict__, "_chunks": {}, "_walker": None, "_lock": None,
                "_prefetch": None, "prefetch": False}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self.cross_lingual = _CrossLingual(self)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    def _chunk_length(self, chunk: int) -> int:
        return min(self.chunk_samples, self.num_samples - chunk * self.chunk_samples)

    def _samples_path(self, chunk: int) -> str:
        return os.path.join(self.directory, f"samples-{chunk:06d}.npy")

    def _cursors_path(self, chunk: int) -> str:
        """Cursors after the full chunk ``chunk``."""
        return os.path.join(self.directory, f"cursors-{chunk:06d}.npy")

    def _check(self, sample: int) -> tuple[int, int]:
        k = int(sample) - self.first_sample
        if not 0 <= k < self.num_samples:
            raise IndexError(f"sample {sample} is outside this index's range "
                             f"[{self.first_sample}, {self.first_sample + self.num_samples})")
        return divmod(k, self.chunk_samples)

    # -- reading ---------------------------------------------------------------------------

    def record(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources [2], starts [2]) of a sample; sources[1] == -1: monolingual."""
        chunk, k = self._check(sample)
        row = self.chunk(chunk)[k]
        return row["source"], row["start"]

    def chunk(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk``'s records, memory-mapped (built first if missing)."""
        records = self._chunks.get(chunk)
        if records is None:
            records = self._open_or_build(chunk)
            if len(self._chunks) >= self._OPEN_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[chunk] = records
            if self.prefetch and chunk + 1 < self.num_chunks:
                self._start_prefetch(chunk + 1)
        return records

    def _open(self, chunk: int) -> Optional[np.ndarray]:
        """The chunk's file if it holds at least the samples this index needs from it."""
        path = self._samples_path(chunk)
        try:
            records = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise UserError(f"sample index chunk {path} is unreadable ({exc}); delete it "
                             "and it is rebuilt") from exc
        if records.dtype != SAMPLE_DTYPE or records.ndim != 1:
            raise UserError(f"sample index chunk {path} has dtype {records.dtype}, shape "
                             f"{records.shape}; expected {SAMPLE_DTYPE} records: delete it")
        if len(records) < self._chunk_length(chunk):
            return None  # built for a shorter run: extended below
        return records

    def _open_or_build(self, chunk: int) -> np.ndarray:
        with self._lock:
            records = self._open(chunk)
            if records is not None:
                self.found += 1
                return records
            start = self._chunk_start(chunk)
            self._build(chunk, start)
            return self._open(chunk)

    def _chunk_start(self, chunk: int) -> np.ndarray:
        """Cursors at the chunk's first sample (building earlier chunks when the cache lacks
        them: the chain is sequential)."""
        known = chunk
        while known > 0 and not os.path.exists(self._cursors_path(known - 1)):
            known -= 1
        cursor = (self.spec.start_cursor() if known == 0
                  else np.load(self._cursors_path(known - 1)))
        for earlier in range(known, chunk):
            cursor = self._build(earlier, cursor, length=self.chunk_samples)
        return cursor

    def _build(self, chunk: int, cursor: np.ndarray, length: Optional[int] = None) -> np.ndarray:
        """Build chunk ``chunk`` from ``cursor``; returns the cursors after it."""
        with self._lock:
            if self._walker is None:
                self._walker = _Walker(self.spec)
            length = self._chunk_length(chunk) if length is None else length
            first = self.first_sample + chunk * self.chunk_samples
            began = time.perf_counter()
            records, after = self._walker.walk(first, length, cursor)
            if length == self.chunk_samples:
                _atomic_save(self._cursors_path(chunk), after)
            _atomic_save(self._samples_path(chunk), records)
            self.built += 1
            if not self._shares_checked:
                self._shares_checked = True
                _warn_if_shares_missed(self.spec, self._walker.language_tokens(after))
            logger.info("sample index %s: built chunk %d (%d samples) in %.1f s",
                        self.directory, chunk, length, time.perf_counter() - began)
            return after

    def _start_prefetch(self, chunk: int) -> None:
        if self._prefetch is not None and self._prefetch.is_alive():
            return
        if os.path.exists(self._samples_path(chunk)):
            return

        def build() -> None:
            try:
                self._open_or_build(chunk)
            except Exception:  # the reader builds it itself when it gets there
                logger.exception("sample index %s: building chunk %d ahead failed",
                                  self.directory, chunk)

        self._prefetch = threading.Thread(target=build, name="sample-index-prefetch",
                                          daemon=True)
        self._prefetch.start()

    # -- building and state ------------------------------------------------------------------

    def ensure(self, sample: int) -> None:
        """Make every chunk up to the one holding ``sample`` exist (or be found)."""
        chunk, _ = self._check(sample)
        for c in range(chunk + 1):
            self.chunk(c)

    def build_all(self, progress=None) -> None:
        """Every chunk of the range (the build tool); ``progress(done, total)`` per chunk."""
        for c in range(self.num_chunks):
            self.chunk(c)
            if progress is not None:
                progress(c + 1, self.num_chunks)

    def cursors_at(self, sample: int) -> np.ndarray:
        """Every stream's cursor before ``sample`` (``first_sample + num_samples`` allowed)."""
        k = int(sample) - self.first_sample
        if not 0 <= k <= self.num_samples:
            raise ValueError(f"sample {sample} is outside this index's range "
                             f"[{self.first_sample}, {self.first_sample + self.num_samples}]")
        chunk, offset = divmod(k, self.chunk_samples)
        with self._lock:
            if chunk > 0 and offset == 0 and os.path.exists(self._cursors_path(chunk - 1)):
                return np.load(self._cursors_path(chunk - 1))
            if offset == 0 and chunk == 0:
                return self.spec.start_cursor()
            if offset == 0:
                chunk, offset = chunk - 1, self.chunk_samples
            start = self._chunk_start(chunk)
            if self._walker is None:
                self._walker = _Walker(self.spec)
            # Replay the chunk's first samples: cheaper than storing cursors per sample.
            _, after = self._walker.walk(self.first_sample + chunk * self.chunk_samples,
                                         offset, start)
            return after

    def mixture_state(self, sample: int) -> MixtureState:
        """The sampler state before ``sample``: the checkpointed data position."""
        cursor = self.cursors_at(sample)
        mixture, start = self.spec.mixture, self.spec.phase_start
        state = MixtureState.from_dict(start.to_dict())
        begin = self.spec.start_cursor()
        for source, now, then in zip(mixture.sources, cursor, begin):
            state.consumed_tokens[source.path_prefix] = int(now)
            state.tokens_per_language[source.language] = (
                state.tokens_per_language.get(source.language, 0) + int(now - then))
        state.samples = int(sample)
        return state

    def pieces(self, sample: int) -> list[tuple[int, int, int, int]]:
        """(source, stream offset, length, block) of each piece; block -1: monolingual."""
        sources, starts = self.record(sample)
        a, b = int(sources[0]), int(sources[1])
        seq = self.spec.seq_length
        if b < 0:
            return [(a, int(starts[0]), seq, -1)]
        windows = []
        for s, start in ((a, int(starts[0])), (b, int(starts[1]))):
            stream = self.spec.streams[s]
            epoch = start // stream.total
            windows += [stream.window(epoch, self.spec.window_epochs(s)), epoch * stream.total]
        lengths = np.empty(seq, dtype=np.int64)
        n = cross_lingual_pieces(seq, int(starts[0]), int(starts[1]), *windows, lengths)
        if n < 0:
            raise RuntimeError(f"sample {sample}: document-end window too short")  # internal
        cursor = [int(starts[0]), int(starts[1])]
        out = []
        for turn in range(n):
            out.append(((a, b)[turn % 2], cursor[turn % 2], int(lengths[turn]), turn // 2))
            cursor[turn % 2] += int(lengths[turn])
        return out
