"""XLDA packing: fixed-length training samples of contiguous documents from several languages.

Public interface (what the training loop calls)::

    dataset = build_xlda_dataset(
        sources=[(weight_or_None, path_prefix, language), ...],
        seq_length=4096, num_samples=total_train_samples,
        masking="xlda",            # "xlda" | "document" | "none" (the ablation switch)
        rho=0.5, anchor_language="en", alpha=None, beta=None, seed=1234,
        cache_dir=None,            # default: <dir of first source>/xlda_index_cache
        start_state=None)          # a MixtureState dict: continue from it (anchor switch)
    sample = dataset[i]            # dict of numpy arrays, see XLDAPackedDataset.__getitem__
    dataset.state_dict(consumed_samples)        # -> checkpoint["data"]
    dataset = resume_xlda_dataset(checkpoint["data"], consumed_samples, **same kwargs)
    for indices in PretrainingIndexSampler(len(dataset), consumed, micro_batch, dp_rank, dp_size)
    # then megatron_trillion.data.packed_batch.collate_packed([dataset[i] for i in indices])

How a sample is made (the sample index, built once per configuration and cached as .npz):

* Every source is a *stream*: its documents in a seeded per-epoch permutation, concatenated
  over epochs. Samples take contiguous token ranges ("pieces") from streams, so every token of
  every document appears, in order, exactly once per epoch; a document longer than the space
  left is split and its remainder opens a later sample from that stream. EOD tokens (written by
  ``tools/preprocess_data.py``) are kept. Each piece also reads the stream's next token as the
  label of its last position, so labels are the true continuation even across splits.
* With probability ``rho`` (a per-sample-index Bernoulli, see ``MixtureSampler``) a sample is
  *cross-lingual*: documents of the anchor language alternate with documents of one partner
  language; the first piece is capped at S/2 so both languages are always present. Each
  consecutive (document, document) pair of different languages is one cross-lingual attention
  block. Otherwise the sample is monolingual: one piece from one source.
* Languages are chosen by token deficit against eq. 2 (``megatron_trillion.data.mixture``).

Masking modes only change the block boundaries derived from a sample (the sample index and the
tokens are identical, so ablations differ in one flag): "none" - the whole sample is one block;
"document" - each document (piece of a document) is a block; "xlda" - each cross-lingual pair is
a block, and documents of monolingual samples are blocks of their own. Position ids restart at
each block, matching RoPE over the block cu_seqlens.

Determinism: the index depends only on the configuration (sources and their sizes, mixture,
seq_length, rho, anchor, seed, number of samples, start state), not on the data-parallel size;
sample ``i`` is the same on every rank and every run, and the consumed-samples counter alone
restores the position. megatron-core's ``BlendedMegatronDatasetBuilder``/``GPTDataset`` blend
whole samples of single datasets, which cannot express samples that mix datasets, so the index
is built here; documents are read with megatron-core's ``IndexedDataset`` (its C++ ``helpers``
extension is not needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_trillion.data.mixture import (
    LanguageMixture,
    MixtureSampler,
    MixtureState,
    describe_mixture_change,
    parse_sources,
)

__all__ = [
    "MASKING_MODES",
    "PackingConfig",
    "DocumentStream",
    "SampleIndex",
    "build_sample_index",
    "XLDAPackedDataset",
    "build_xlda_dataset",
    "resume_xlda_dataset",
    "PretrainingIndexSampler",
]

logger = logging.getLogger(__name__)

MASKING_MODES = ("xlda", "document", "none")
_INDEX_VERSION = 1
_MONOLINGUAL = -1  # piece block id: every document of the piece is its own block (xlda mode)


@dataclass(frozen=True)
class PackingConfig:
    """How samples are packed. Every field except ``masking``/loss options keys the cache."""

    seq_length: int
    masking: str = "xlda"            # "xlda" | "document" | "none"
    rho: float = 0.5                 # probability that a sample is cross-lingual
    anchor_language: str = "en"      # the language every cross-lingual sample contains
    seed: int = 1234
    eod_token: Optional[int] = None  # with mask_eod_loss: no loss on predicting after EOD
    mask_eod_loss: bool = False      # Megatron-LM's --eod-mask-loss

    def validate(self, mixture: LanguageMixture) -> None:
        if self.seq_length < 2:
            raise ValueError(f"--seq-length must be >= 2 for packing, got {self.seq_length}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"unknown masking mode {self.masking!r}; "
                             f"expected one of {MASKING_MODES}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"mixing probability rho must be in [0, 1], got {self.rho}")
        if self.mask_eod_loss and self.eod_token is None:
            raise ValueError("mask_eod_loss needs eod_token (the tokenizer's EOD id)")
        if self.rho > 0:
            probs = mixture.language_probabilities
            if self.anchor_language not in probs:
                raise ValueError(
                    f"anchor language {self.anchor_language!r} has no data source "
                    f"(languages: {sorted(probs)}); set the anchor language or rho=0")
            if probs[self.anchor_language] <= 0:
                raise ValueError(f"anchor language {self.anchor_language!r} has probability "
                                 "0 in the mixture but rho > 0")
            if not any(p > 0 for l, p in probs.items() if l != self.anchor_language):
                raise ValueError("rho > 0 needs at least one non-anchor language with a "
                                 f"positive probability (languages: {dict(probs)})")


# ---------------------------------------------------------------------------------------------
# streams


class DocumentStream:
    """One source's documents in a seeded per-epoch order, addressed by token offset."""

    _KEEP_EPOCHS = 4

    def __init__(self, sizes: np.ndarray, seed: int, key: str) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        # The key (path basename) rather than the position in the mixture seeds the order, so
        # changing the mixture does not reshuffle a source.
        self._seed = [int(seed), zlib.crc32(key.encode())]
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative end offsets) of one epoch."""
        if epoch not in self._epochs:
            if len(self._epochs) >= self._KEEP_EPOCHS:
                # Bounded: a small, heavily upsampled source runs through many epochs.
                del self._epochs[next(iter(self._epochs))]
            order = np.random.default_rng(self._seed + [epoch]).permutation(len(self.sizes))
            self._epochs[epoch] = (order, np.cumsum(self.sizes[order]))
        return self._epochs[epoch]

    def tokens_to_document_end(self, offset: int) -> int:
        epoch, rest = divmod(int(offset), self.total)
        _, ends = self.epoch(epoch)
        position = int(np.searchsorted(ends, rest, side="right"))
        return int(ends[position]) - rest

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
# the sample index


@dataclass
class SampleIndex:
    """Pieces of samples ``first_sample .. first_sample + num_samples - 1``.

    Sample ``first_sample + k`` is pieces ``sample_ptr[k]:sample_ptr[k+1]``; piece ``p`` is
    ``piece_length[p]`` tokens of stream ``piece_source[p]`` from offset ``piece_start[p]``,
    in attention block ``piece_block[p]`` (-1: each document its own block).
    ``cursor_after[k]`` is every source's stream cursor after sample k (the mixture state).
    """

    first_sample: int
    sample_ptr: np.ndarray
    piece_source: np.ndarray
    piece_start: np.ndarray
    piece_length: np.ndarray
    piece_block: np.ndarray
    cross_lingual: np.ndarray
    cursor_after: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.sample_ptr) - 1

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **{k: (np.asarray(v)) for k, v in self.__dict__.items()})
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a partial file

    @classmethod
    def load(cls, path: str) -> "SampleIndex":
        with np.load(path) as data:
            fields = {k: data[k] for k in data.files}
        fields["first_sample"] = int(fields["first_sample"])
        return cls(**fields)


def build_sample_index(mixture: LanguageMixture, streams: Sequence[DocumentStream],
                       config: PackingConfig, num_samples: int,
                       start: Optional[MixtureState] = None) -> SampleIndex:
    """Pack samples ``start.samples .. num_samples - 1`` (all of them without a start state)."""
    sampler = MixtureSampler(mixture, config.seed, start=start)
    first = sampler.samples
    if num_samples <= first:
        raise ValueError(f"num_samples={num_samples} but the mixture state is already at sample "
                         f"{first}; raise --train-samples/--train-iters")
    seq = config.seq_length
    anchor = config.anchor_language
    languages = mixture.languages
    partners = [l for l in languages if l != anchor]
    count = num_samples - first
    ptr = np.zeros(count + 1, dtype=np.int64)
    cross = np.zeros(count, dtype=bool)
    cursor_after = np.zeros((count, len(streams)), dtype=np.int64)
    src, starts, lengths, blocks = [], [], [], []
    for k in range(count):
        draws = sampler.begin_sample()
        if draws[0] < config.rho:
            cross[k] = True
            partner = sampler.pick_language(partners, seq // 2)
            order = [anchor, partner] if draws[1] < 0.5 else [partner, anchor]
            chosen = [sampler.pick_source(order[0]), sampler.pick_source(order[1])]
            remaining, turn = seq, 0
            while remaining > 0:
                source = chosen[turn % 2]
                # The first piece leaves room for the other language.
                limit = min(remaining, seq // 2) if turn == 0 else remaining
                length = min(limit, streams[source].tokens_to_document_end(sampler.cursor[source]))
                src.append(source)
                starts.append(int(sampler.cursor[source]))
                lengths.append(length)
                blocks.append(turn // 2)
                sampler.record(source, length)
                remaining -= length
                turn += 1
        else:
            language = sampler.pick_language(languages, seq)
            source = sampler.pick_source(language)
            src.append(source)
            starts.append(int(sampler.cursor[source]))
            lengths.append(seq)
            blocks.append(_MONOLINGUAL)
            sampler.record(source, seq)
        ptr[k + 1] = len(src)
        cursor_after[k] = sampler.cursor
    _warn_if_shares_missed(mixture, sampler, config)
    return SampleIndex(first, ptr, np.asarray(src, dtype=np.int32),
                       np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                       np.asarray(blocks, dtype=np.int32), cross, cursor_after)


def _warn_if_shares_missed(mixture: LanguageMixture, sampler: MixtureSampler,
                           config: PackingConfig) -> None:
    # Cross-lingual samples give the anchor about half their tokens; if rho is high and the
    # anchor's target share low, monolingual samples cannot compensate. Say so.
    total = sum(sampler.language_tokens.values())
    for language, target in mixture.language_probabilities.items():
        realised = sampler.language_tokens[language] / total
        if abs(realised - target) > 0.02:
            logger.warning(
                "language %s gets %.3f of the tokens instead of its eq. 2 share %.3f: "
                "rho=%.2f with anchor %s is not reachable for this mixture; lower rho or "
                "raise the anchor's share", language, realised, target, config.rho,
                config.anchor_language)


# ---------------------------------------------------------------------------------------------
# the dataset


class XLDAPackedDataset(torch.utils.data.Dataset):
    """Global sample index -> packed sample. Valid indices: ``[first_sample, len(self))``."""

    def __init__(self, mixture: LanguageMixture, config: PackingConfig, index: SampleIndex,
                 streams: Sequence[DocumentStream], start_state: MixtureState,
                 cache_path: Optional[str] = None, mmap_bin_files: bool = True) -> None:
        self.mixture = mixture
        self.mmap_bin_files = mmap_bin_files
        self.config = config
        self.index = index
        self.streams = list(streams)
        self.start_state = start_state
        self.cache_path = cache_path
        self._datasets: list = [None] * len(mixture.sources)

    def __len__(self) -> int:
        return self.index.first_sample + self.index.num_samples

    def _reader(self, source: int):
        # Opened lazily so the dataset pickles cheaply into DataLoader workers.
        if self._datasets[source] is None:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            self._datasets[source] = IndexedDataset(self.mixture.sources[source].path_prefix,
                                                    mmap=self.mmap_bin_files)
        return self._datasets[source]

    def _read(self, source: int, offset: int, length: int) -> tuple[np.ndarray, list, list]:
        """Tokens of a stream range, offsets (in the range) where documents start, doc ids."""
        reader = self._reader(source)
        parts, doc_starts, doc_ids, position = [], [], [], 0
        # Stream document ids count from the source's first document (a --split share).
        first = (self.mixture.sources[source].documents or (0, 0))[0]
        for document, inner, count, starts_document in self.streams[source].segments(offset,
                                                                                     length):
            parts.append(np.asarray(reader.get(first + document, offset=inner, length=count),
                                    dtype=np.int64))
            doc_starts.append(position)
            doc_ids.append(document)
            position += count
        return np.concatenate(parts), doc_starts, doc_ids

    def pieces(self, idx: int) -> range:
        k = self._local(idx)
        return range(int(self.index.sample_ptr[k]), int(self.index.sample_ptr[k + 1]))

    def _local(self, idx: int) -> int:
        idx = int(idx)
        if idx < 0:
            idx += len(self)
        k = idx - self.index.first_sample
        if idx >= len(self) or k < 0:
            raise IndexError(
                f"sample {idx} is outside this dataset's range [{self.index.first_sample}, "
                f"{len(self)})" + (" (it belongs to an earlier mixture phase)" if k < 0 else ""))
        return k

    def __getitem__(self, idx: int) -> dict:
        """One sample: tokens, labels, loss_mask, position_ids [S]; cu_seqlens of documents
        and of attention blocks (int32); document_ids [docs, 2] = (source, document)."""
        seq = self.config.seq_length
        tokens = np.empty(seq, dtype=np.int64)
        labels = np.empty(seq, dtype=np.int64)
        doc_bounds: list[int] = []
        block_bounds: list[int] = [0]
        document_ids: list[tuple[int, int]] = []
        position = 0
        previous_block = None
        for p in self.pieces(idx):
            source = int(self.index.piece_source[p])
            length = int(self.index.piece_length[p])
            block = int(self.index.piece_block[p])
            # One token more: the label of the piece's last position.
            read, doc_starts, doc_ids = self._read(source, int(self.index.piece_start[p]),
                                                   length + 1)
            tokens[position:position + length] = read[:length]
            labels[position:position + length] = read[1:length + 1]
            starts = [position + s for s in doc_starts if s < length]
            doc_bounds.extend(starts)
            document_ids.extend((source, d) for s, d in zip(doc_starts, doc_ids) if s < length)
            if block == _MONOLINGUAL or block != previous_block:
                block_bounds.extend(starts if block == _MONOLINGUAL else [position])
            previous_block = block
            position += length
        doc_cu = np.asarray(sorted(set(doc_bounds)) + [seq], dtype=np.int32)
        if self.config.masking == "none":
            block_cu = np.asarray([0, seq], dtype=np.int32)
        elif self.config.masking == "document":
            block_cu = doc_cu
        else:
            block_cu = np.asarray(sorted(set(block_bounds)) + [seq], dtype=np.int32)
        block_lengths = np.diff(block_cu)
        position_ids = np.arange(seq, dtype=np.int64) - np.repeat(block_cu[:-1], block_lengths)
        loss_mask = np.ones(seq, dtype=np.float32)
        if self.config.mask_eod_loss:
            loss_mask[tokens == self.config.eod_token] = 0.0
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "cu_seqlens_documents": doc_cu,
            "cu_seqlens_blocks": block_cu,
            "document_ids": np.asarray(document_ids, dtype=np.int64).reshape(-1, 2),
            "index": int(idx),
        }

    # -- checkpointable state ------------------------------------------------------------------

    def mixture_state(self, consumed_samples: int) -> MixtureState:
        """The sampler state after ``consumed_samples`` samples (stream cursors, RNG position)."""
        consumed_samples = int(consumed_samples)
        k = consumed_samples - self.index.first_sample
        if k < 0 or k > self.index.num_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is outside this dataset's "
                             f"range [{self.index.first_sample}, {len(self)}]")
        state = MixtureState.from_dict(self.start_state.to_dict())
        if k == 0:
            return _with_probabilities(state, self.mixture)
        cursors = self.index.cursor_after[k - 1]
        start = [state.consumed_tokens.get(s.path_prefix, 0) for s in self.mixture.sources]
        for source, cursor, begin in zip(self.mixture.sources, cursors, start):
            state.consumed_tokens[source.path_prefix] = int(cursor)
            state.tokens_per_language[source.language] = (
                state.tokens_per_language.get(source.language, 0) + int(cursor) - begin)
        state.samples = consumed_samples
        return _with_probabilities(state, self.mixture)

    def state_dict(self, consumed_samples: int) -> dict:
        """What the checkpoint stores under "data"."""
        return {"phase_start": _with_probabilities(self.start_state, self.mixture).to_dict(),
                "current": self.mixture_state(consumed_samples).to_dict(),
                "consumed_samples": int(consumed_samples)}


def _with_probabilities(state: MixtureState, mixture: LanguageMixture) -> MixtureState:
    state = MixtureState.from_dict(state.to_dict())
    state.source_probabilities = {s.path_prefix: float(p) for s, p in
                                  zip(mixture.sources, mixture.source_probabilities)}
    return state


# ---------------------------------------------------------------------------------------------
# building (with the cache) and resuming


def _index_key(mixture: LanguageMixture, config: PackingConfig, num_samples: int,
               start: MixtureState) -> tuple[str, str]:
    description = {
        "version": _INDEX_VERSION,
        "mixture": mixture.describe(),
        "seq_length": config.seq_length,
        "rho": config.rho,
        "anchor_language": config.anchor_language,
        "seed": config.seed,
        "num_samples": int(num_samples),
        "start": {k: v for k, v in start.to_dict().items() if k != "source_probabilities"},
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], text


def _sizes(path_prefix: str, documents: Optional[tuple[int, int]] = None) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(path_prefix, mmap=False)
    # Copy: the lengths view dies with the dataset's .idx memory map.
    sizes = np.array(dataset.sequence_lengths, dtype=np.int64)
    return sizes if documents is None else sizes[documents[0]:documents[1]]


def build_xlda_dataset(sources: Sequence[tuple], seq_length: int, num_samples: int, *,
                       masking: str = "xlda", rho: float = 0.5, anchor_language: str = "en",
                       alpha: Optional[float] = None, beta: Optional[Mapping[str, float]] = None,
                       seed: int = 1234, cache_dir: Optional[str] = None,
                       start_state: Optional[Mapping] = None, eod_token: Optional[int] = None,
                       mask_eod_loss: bool = False, mmap_bin_files: bool = True
                       ) -> XLDAPackedDataset:
    """The training dataset: ``sources`` = ``[(weight_or_None, path_prefix, language), ...]``.

    Builds (on global rank 0; other ranks wait at a barrier and load) or loads the cached sample
    index for samples ``[start_state.samples or 0, num_samples)``.
    """
    parsed = parse_sources(sources)
    mixture = LanguageMixture.from_sources(parsed, alpha=alpha, beta=beta)
    config = PackingConfig(seq_length=int(seq_length), masking=masking, rho=float(rho),
                           anchor_language=anchor_language, seed=int(seed),
                           eod_token=eod_token, mask_eod_loss=mask_eod_loss)
    config.validate(mixture)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    start = MixtureState.from_dict(start_state) if start_state is not None \
        else MixtureState(config.seed)
    streams = [DocumentStream(_sizes(s.path_prefix, s.documents), config.seed,
                              os.path.basename(s.path_prefix)) for s in parsed]
    key, description = _index_key(mixture, config, num_samples, start)
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(
        parsed[0].path_prefix)), "xlda_index_cache")
    path = os.path.join(cache_dir, f"{key}.npz")

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if rank == 0 and not os.path.exists(path):
        index = build_sample_index(mixture, streams, config, int(num_samples), start)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            index.save(path)
            with open(os.path.join(cache_dir, f"{key}.json"), "w") as f:
                f.write(description)
        except OSError as exc:  # read-only data directory: still usable, just not cached
            logger.warning("could not cache the XLDA sample index in %s (%s); pass cache_dir",
                           cache_dir, exc)
            path = None
    else:
        index = None
    if distributed:
        torch.distributed.barrier()
    if index is None:
        if path is None or not os.path.exists(path):
            index = build_sample_index(mixture, streams, config, int(num_samples), start)
        else:
            index = SampleIndex.load(path)
    return XLDAPackedDataset(mixture, config, index, streams, start, cache_path=path,
                             mmap_bin_files=mmap_bin_files)


def resume_xlda_dataset(data_state: Mapping, consumed_samples: int, **kwargs) -> tuple[
        XLDAPackedDataset, list[str]]:
    """Rebuild the dataset for a resumed run from ``checkpoint["data"]``.

    Same mixture as the checkpointed phase: the phase is rebuilt identically (cache hit) and
    ``consumed_samples`` continues it exactly. Changed mixture (e.g. the anneal switch): a new
    phase starts from the checkpointed stream cursors, so no source repeats or skips data.
    Returns the dataset and the list of mixture changes (empty if none) for the log.
    """
    consumed_samples = int(consumed_samples)
    if int(data_state.get("consumed_samples", consumed_samples)) != consumed_samples:
        raise ValueError(f"checkpoint data state is at sample {data_state['consumed_samples']} "
                         f"but consumed_samples={consumed_samples}")
    phase_start = MixtureState.from_dict(data_state["phase_start"])
    mixture = LanguageMixture.from_sources(parse_sources(kwargs["sources"]),
                                           alpha=kwargs.get("alpha"), beta=kwargs.get("beta"))
    changes = describe_mixture_change(phase_start, mixture)
    if not changes:
        dataset = build_xlda_dataset(start_state=phase_start.to_dict(), **kwargs)
    else:
        dataset = build_xlda_dataset(start_state=data_state["current"], **kwargs)
        for change in changes:
            logger.info("data mixture changed at sample %d: %s", consumed_samples, change)
    return dataset, changes


# ---------------------------------------------------------------------------------------------
# which global samples a data-parallel rank reads


class PretrainingIndexSampler:
    """Micro-batches of global sample indices for one DP rank (Megatron-LM's pretraining
    sampler): each global step of ``micro_batch_size * dp_size`` consecutive samples is split
    into contiguous per-rank slices, starting at ``consumed_samples``. The union over ranks is
    the same sequence for any DP size."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("--micro-batch-size and the data-parallel size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in "
                             f"[0, {data_parallel_size})")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the dataset's "
                             f"{total_samples} samples")
        self.total = int(total_samples)
        self.consumed = int(consumed_samples)
        self.micro = int(micro_batch_size)
        self.rank = int(data_parallel_rank)
        self.size = int(data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.size
        first = self.consumed
        while first + step <= self.total:
            lo = first + self.rank * self.micro
            yield list(range(lo, lo + self.micro))
            first += step

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.size)
