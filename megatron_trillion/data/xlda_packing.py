"""XLDA packing: fixed-length training samples of contiguous documents from several languages.

Public interface (what the training loop calls)::

    dataset = build_xlda_dataset(
        sources=[DataSource(path_prefix, language, weight=None), ...],   # data_path.py
        seq_length=4096, num_samples=total_train_samples,
        masking="xlda",            # "xlda" | "document" | "none" (the ablation switch)
        xlda_block_scope="pair",   # "pair" | "sequence" (data/attention_blocks.py)
        rho=0.5, anchor_language="en", alpha=None, beta=None, seed=1234,
        cache_dir=None,            # --data-cache-path (default: next to the first source)
        start_state=None)          # a MixtureState dict: continue from it (anneal switch)
    sample = dataset[i]            # dict of numpy arrays, see XLDAPackedDataset.__getitem__
    dataset.state_dict(consumed_samples)        # -> checkpoint["data"]
    dataset = resume_xlda_dataset(checkpoint["data"], consumed_samples, **same kwargs)
    for indices in PretrainingIndexSampler(len(dataset), consumed, micro_batch, dp_rank, dp_size)
    # then megatron_trillion.data.packed_batch.collate_packed([dataset[i] for i in indices])

How a sample is made (the sample index: ``megatron_trillion.data.sample_index`` builds it in
chunks, caches them as memory-mapped .npy files and says which stream ranges form a sample; this
module reads those ranges and derives tokens, labels and attention blocks):

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
"document" - each document (piece of a document) is a block; "xlda" - each cross-lingual pair
(``xlda_block_scope="pair"``) or the whole cross-lingual sample (``"sequence"``) is a block, and
documents of monolingual samples are blocks of their own (``attention_blocks.block_cu_seqlens``).
Position ids restart at each block, matching RoPE over the block cu_seqlens.

Determinism: the index depends only on the configuration (sources, their sizes and files,
mixture, seq_length, rho, anchor, seed, phase start state), not on the data-parallel size or the
number of samples (a longer run extends it); sample ``i`` is the same on every rank and every
run, and the consumed-samples counter alone restores the position. megatron-core's
``BlendedMegatronDatasetBuilder``/``GPTDataset`` blend whole samples of single datasets, which
cannot express samples that mix datasets, so the index is built here; documents are read with megatron-core's ``IndexedDataset`` (its C++ ``helpers``
extension is not needed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_trillion.data.attention_blocks import (
    BLOCK_SCOPES,
    MASKING_MODES,
    MASKING_XLDA,
    SCOPE_PAIR,
    block_cu_seqlens,
)
from megatron_trillion.data.data_path import DataSource
from megatron_trillion.data.mixture import (
    LanguageMixture,
    MixtureState,
    describe_mixture_change,
    parse_sources,
)
from megatron_trillion.data.sample_index import (
    DEFAULT_CHUNK_SAMPLES,
    ChunkedSampleIndex,
    DocumentStream,
    IndexSpec,
)

__all__ = [
    "MASKING_MODES",
    "PackingConfig",
    "XLDAPackedDataset",
    "build_xlda_dataset",
    "resume_xlda_dataset",
    "PretrainingIndexSampler",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingConfig:
    """How samples are packed. Every field except ``masking``, ``xlda_block_scope`` and the
    loss options keys the cache (those only change what is derived from a cached sample)."""

    seq_length: int
    masking: str = MASKING_XLDA          # one of MASKING_MODES (data/attention_blocks.py)
    xlda_block_scope: str = SCOPE_PAIR   # one of BLOCK_SCOPES
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
        if self.xlda_block_scope not in BLOCK_SCOPES:
            raise ValueError(f"unknown XLDA block scope {self.xlda_block_scope!r}; "
                             f"expected one of {BLOCK_SCOPES}")
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
# the dataset


class XLDAPackedDataset(torch.utils.data.Dataset):
    """Global sample index -> packed sample. Valid indices: ``[first_sample, len(self))``."""

    def __init__(self, mixture: LanguageMixture, config: PackingConfig,
                 index: ChunkedSampleIndex, streams: Sequence[DocumentStream],
                 start_state: MixtureState, mmap_bin_files: bool = True) -> None:
        self.mixture = mixture
        self.mmap_bin_files = mmap_bin_files
        self.config = config
        self.index = index
        self.streams = list(streams)
        self.start_state = start_state
        self._datasets: list = [None] * len(mixture.sources)

    @property
    def cache_path(self) -> str:
        return self.index.directory

    def __len__(self) -> int:
        return self.index.first_sample + self.index.num_samples

    def __getstate__(self) -> dict:
        # Opened lazily so the dataset pickles cheaply into DataLoader workers.
        return {**self.__dict__, "_datasets": [None] * len(self._datasets)}

    def _reader(self, source: int):
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
        for document, inner, count, _ in self.streams[source].segments(offset, length):
            parts.append(np.asarray(reader.get(first + document, offset=inner, length=count),
                                    dtype=np.int64))
            doc_starts.append(position)
            doc_ids.append(document)
            position += count
        return np.concatenate(parts), doc_starts, doc_ids

    def _global(self, idx: int) -> int:
        idx = int(idx)
        if idx < 0:
            idx += len(self)
        if idx >= len(self) or idx < self.index.first_sample:
            raise IndexError(
                f"sample {idx} is outside this dataset's range [{self.index.first_sample}, "
                f"{len(self)})" + (" (it belongs to an earlier mixture phase)"
                                   if 0 <= idx < self.index.first_sample else ""))
        return idx

    def pieces(self, idx: int) -> list[tuple[int, int, int, int]]:
        """(source, stream offset, length, block) of each piece of sample ``idx``."""
        return self.index.pieces(self._global(idx))

    def __getitem__(self, idx: int) -> dict:
        """One sample: tokens, labels, loss_mask, position_ids [S]; cu_seqlens of documents
        and of attention blocks (int32); document_ids [docs, 2] = (source, document)."""
        seq = self.config.seq_length
        tokens = np.empty(seq, dtype=np.int64)
        labels = np.empty(seq, dtype=np.int64)
        doc_bounds: list[int] = []
        piece_starts: list[int] = []
        piece_pairs: list[int] = []
        document_ids: list[tuple[int, int]] = []
        position = 0
        for source, start, length, block in self.pieces(idx):
            # One token more: the label of the piece's last position.
            read, doc_starts, doc_ids = self._read(source, start, length + 1)
            tokens[position:position + length] = read[:length]
            labels[position:position + length] = read[1:length + 1]
            starts = [position + s for s in doc_starts if s < length]
            doc_bounds.extend(starts)
            document_ids.extend((source, d) for s, d in zip(doc_starts, doc_ids) if s < length)
            piece_starts.append(position)
            piece_pairs.append(block)
            position += length
        doc_cu = np.asarray(sorted(set(doc_bounds)) + [seq], dtype=np.int32)
        block_cu = block_cu_seqlens(doc_cu, piece_starts, piece_pairs, self.config.masking,
                                    self.config.xlda_block_scope)
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
        if not self.index.first_sample <= consumed_samples <= len(self):
            raise ValueError(f"consumed_samples={consumed_samples} is outside this dataset's "
                             f"range [{self.index.first_sample}, {len(self)}]")
        return _with_probabilities(self.index.mixture_state(consumed_samples), self.mixture)

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


def _sizes(path_prefix: str, documents: Optional[tuple[int, int]] = None) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(path_prefix, mmap=False)
    # Copy: the lengths view dies with the dataset's .idx memory map.
    sizes = np.array(dataset.sequence_lengths, dtype=np.int64)
    return sizes if documents is None else sizes[documents[0]:documents[1]]


def default_cache_dir(sources: Sequence[DataSource]) -> str:
    """Next to the first data prefix, as megatron-core does without --data-cache-path."""
    first = parse_sources(sources)[0].path_prefix
    return os.path.join(os.path.dirname(os.path.abspath(first)), "xlda_index_cache")


def build_xlda_dataset(sources: Sequence[DataSource], seq_length: int, num_samples: int, *,
                       masking: str = MASKING_XLDA, rho: float = 0.5,
                       anchor_language: str = "en",
                       alpha: Optional[float] = None, beta: Optional[Mapping[str, float]] = None,
                       seed: int = 1234, cache_dir: Optional[str] = None,
                       start_state: Optional[Mapping] = None, eod_token: Optional[int] = None,
                       mask_eod_loss: bool = False, mmap_bin_files: bool = True,
                       chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
                       ready_sample: Optional[int] = None,
                       xlda_block_scope: str = SCOPE_PAIR) -> XLDAPackedDataset:
    """The training dataset over ``sources`` (or their tuple form, see ``parse_sources``).

    Samples ``[start_state.samples or 0, num_samples)``. The chunk holding ``ready_sample``
    (default: the first sample) and the ones before it are found in the cache or built (on
    global rank 0 while the other ranks wait at a barrier); later chunks are built when first
    read (global rank 0 builds the next one in the background).
    """
    parsed = parse_sources(sources)
    mixture = LanguageMixture.from_sources(parsed, alpha=alpha, beta=beta)
    config = PackingConfig(seq_length=int(seq_length), masking=masking, rho=float(rho),
                           anchor_language=anchor_language, seed=int(seed),
                           eod_token=eod_token, mask_eod_loss=mask_eod_loss,
                           xlda_block_scope=xlda_block_scope)
    config.validate(mixture)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    start = MixtureState.from_dict(start_state) if start_state is not None \
        else MixtureState(config.seed)
    if start.seed != config.seed:
        raise ValueError(f"resuming a data mixture with --seed {config.seed} but the "
                         f"checkpoint was written with seed {start.seed}")
    if int(num_samples) <= start.samples:
        raise ValueError(f"num_samples={num_samples} but the mixture state is already at sample "
                         f"{start.samples}; raise --train-samples/--train-iters")
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be >= 1, got {chunk_samples}")
    streams = [DocumentStream(_sizes(s.path_prefix, s.documents), config.seed,
                              os.path.basename(s.path_prefix)) for s in parsed]
    spec = IndexSpec.of(mixture, streams, config.seq_length, config.rho,
                        config.anchor_language, config.seed, start, chunk_samples)
    index = ChunkedSampleIndex(spec, cache_dir or default_cache_dir(sources), start.samples,
                               int(num_samples) - start.samples)
    ready = start.samples if ready_sample is None else min(int(ready_sample),
                                                           int(num_samples) - 1)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if rank == 0:
        index.ensure(ready)
    if distributed:
        torch.distributed.barrier()
        if rank != 0:
            index.ensure(ready)
    index.prefetch = rank == 0
    return XLDAPackedDataset(mixture, config, index, streams, start,
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
        dataset = build_xlda_dataset(start_state=phase_start.to_dict(),
                                     ready_sample=consumed_samples, **kwargs)
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
