"""A run's datasets from its flags: the training mixture (or, with --sft, the packed
conversations), the anneal mixture it switches to (--anneal-data-path) and the validation sets.

``DatasetBuilder`` holds what every one of them is built from (the flags, the run's shape, the
sources, the end-of-document token, the directory for generated files). Training and
``tools/build_data_index.py`` build through it, so both address the same cached sample index.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch

from megatron_trillion.data.attention_blocks import MASKING_DOCUMENT, MASKING_XLDA
from megatron_trillion.data.data_path import DataSource
from megatron_trillion.training.arguments import PretrainConfig
from megatron_trillion.training.data import (
    DataSplits,
    StepBatches,
    parse_data_path,
    parse_lang_beta,
    resolve_data_splits,
    write_mock_datasets,
)
from megatron_trillion.training.validation import RunShape

if TYPE_CHECKING:
    from megatron_trillion.data.chat_template import ChatFormat
    from megatron_trillion.data.context_parallel import ContextParallelSplit
    from megatron_trillion.models.presets import ModelPreset

Log = Callable[[str], None]


def data_workdir(config: PretrainConfig) -> str:
    """Where generated files (mock data, sample-index caches) go when no path is given."""
    return (config.data.data_cache_path or config.checkpoint.save
            or os.path.join(tempfile.gettempdir(), "megatron-trillion"))


def data_sources(config: PretrainConfig, vocab_size: int, workdir: str) -> DataSplits:
    """The train / valid / test sources. ``vocab_size``: the tokenizer's (unpadded) size, so
    mock data is the same at any TP."""
    if config.data.mock_data:
        directory = os.path.join(workdir, "mock-data")
        distributed = torch.distributed.is_initialized()  # not in tools/build_data_index.py
        if not distributed or torch.distributed.get_rank() == 0:
            write_mock_datasets(directory, vocab_size, config.training.seed)
        if distributed:
            torch.distributed.barrier()
        sources = write_mock_datasets(directory, vocab_size, config.training.seed)
        return DataSplits(sources, sources, None)
    return resolve_data_splits(config.data)


def effective_masking(config: PretrainConfig, languages) -> str:
    """--attention-masking, except that cross-lingual packing needs two languages to mix:
    with one, XLDA's blocks are the documents, so the run uses document masking."""
    masking = config.data.attention_masking
    if masking == MASKING_XLDA and len(set(languages)) < 2:
        return MASKING_DOCUMENT
    return masking


def build_chat_format(config: PretrainConfig, tokenizer, log: Log = print
                      ) -> Optional[ChatFormat]:
    """--sft/--dpo: the chat template (--chat-template, the tokenizer's own, or the default)
    bound to the tokenizer; None for pretraining."""
    if config.kind == "pretraining":
        return None
    from megatron_trillion.data.chat_template import ChatFormat, resolve_chat_template

    template, origin = resolve_chat_template(config.data.chat_template,
                                             config.data.tokenizer_model)
    log(f" {config.kind.upper()} chat template: {origin}")
    return ChatFormat(template, tokenizer)


def context_parallel_split(config: PretrainConfig, preset: ModelPreset, shape: RunShape
                           ) -> Optional[ContextParallelSplit]:
    """This rank's ``ContextParallelSplit`` of every micro-batch (None without CP)."""
    from megatron.core import parallel_state as ps

    from megatron_trillion.data.context_parallel import (
        ContextParallelSplit,
        tokens_multiple_per_rank,
    )

    if shape.parallel.context < 2:
        return None
    multiple = tokens_multiple_per_rank(
        fp8=bool(config.training.fp8_format), tensor_parallel=shape.parallel.tensor,
        sequence_parallel=config.parallel.sequence_parallel)
    return ContextParallelSplit(
        shape.parallel.context, ps.get_context_parallel_rank(),
        tokens_per_rank_multiple=multiple, mtp=bool(preset.mtp_num_layers))


def report_sample_index(dataset, log: Log) -> None:
    index = dataset.index
    log(f" sample index {index.directory}: samples [{index.first_sample}, "
        f"{index.first_sample + index.num_samples}), {index.found} chunk(s) read from the "
        f"cache, {index.built} built")


@dataclass(frozen=True)
class DatasetBuilder:
    """Builds the datasets of one run. ``chat``: the --sft chat format (None: pretraining on
    XLDA-packed indexed data)."""

    config: PretrainConfig
    shape: RunShape
    splits: DataSplits
    eod: int
    workdir: str
    chat: Optional[ChatFormat] = None

    @property
    def valid_sources(self) -> list[DataSource]:
        """The held-out sources: --valid-data-path / the --split share, else the test ones."""
        return self.splits.valid or self.splits.test or []

    def anneal_sources(self) -> list[DataSource]:
        return parse_data_path(self.config.anneal.anneal_data_path, "--anneal-data-path")

    def anneal_switch_sample(self) -> Optional[int]:
        """Consumed samples when training switches to ``--anneal-data-path``: the first step
        boundary at or past the WSD decay start (None: no switch within the run)."""
        from megatron_trillion.training.build import lr_schedule_config

        shape = self.shape
        lr_config = lr_schedule_config(self.config, shape)
        if not self.config.anneal.anneal_data_path or lr_config.style != "wsd":
            return None
        consumed = 0
        while consumed < lr_config.decay_start:
            consumed += shape.batch_schedule.global_batch_size_at(consumed)
        return consumed if consumed < shape.train_samples else None

    # XLDA-packed datasets -----------------------------------------------------------------

    def dataset_kwargs(self, sources: list[DataSource]) -> dict:
        """``build_xlda_dataset``'s arguments for ``sources`` from the flags."""
        config, data = self.config, self.config.data
        languages = sorted({source.language for source in sources})
        masking = effective_masking(config, languages)
        single = len(languages) < 2
        return dict(sources=sources, seq_length=self.shape.seq_length,
                    num_samples=self.shape.train_samples,
                    masking=masking, xlda_block_scope=data.xlda_block_scope,
                    # One language: nothing to mix, so no cross-lingual sequences to ask for.
                    rho=0.0 if single else data.xlda_mixing_prob,
                    anchor_language=languages[0] if single else data.anchor_language,
                    alpha=data.lang_alpha,
                    beta=parse_lang_beta(data.lang_beta), seed=config.training.seed,
                    cache_dir=data.data_cache_path or (os.path.join(self.workdir, "index-cache")
                                                       if data.mock_data else None),
                    eod_token=self.eod, mmap_bin_files=data.mmap_bin_files)

    def build(self, sources: list[DataSource], **changes):
        """The XLDA-packed dataset over ``sources``; ``changes`` override the flags' values."""
        from megatron_trillion.data.xlda_packing import build_xlda_dataset

        kwargs = self.dataset_kwargs(sources)
        kwargs.update(changes)
        return build_xlda_dataset(**kwargs)

    @property
    def collate(self):
        """Samples -> one micro-batch (preference pairs carry their pair fields)."""
        if self.config.data.dpo:
            from megatron_trillion.posttraining.dpo import collate_pairs

            return collate_pairs
        from megatron_trillion.data.packed_batch import collate_packed

        return collate_packed

    def _sft_dataset(self, sources: list[DataSource], num_samples: int, log: Log):
        """The packed conversations (--sft) or preference pairs (--dpo) of ``sources``."""
        from megatron_trillion.data.sft import build_sft_dataset

        config = self.config
        if config.data.dpo:
            from megatron_trillion.posttraining.preferences import build_preference_dataset

            return build_preference_dataset(
                sources, self.chat, self.shape.seq_length, num_samples,
                seed=config.training.seed, max_length_ratio=config.dpo.dpo_max_length_ratio,
                cache_dir=config.data.data_cache_path or os.path.join(self.workdir,
                                                                      "sft-cache"),
                log=log)
        return build_sft_dataset(
            sources, self.chat, self.shape.seq_length, num_samples, seed=config.training.seed,
            overlong=config.data.sft_overlong_conversations,
            cache_dir=config.data.data_cache_path or os.path.join(self.workdir, "sft-cache"),
            log=log)

    # what training reads ------------------------------------------------------------------

    def train_dataset(self, checkpoint: Optional[Mapping], past_anneal_boundary: bool,
                      log: Log):
        """The training dataset, continuing ``checkpoint`` (its common state; None: a new
        run); after a resume past the anneal boundary, the anneal mixture."""
        if self.chat is not None:  # the position is the consumed-samples count alone
            return self._sft_dataset(self.splits.train, self.shape.train_samples, log)
        from megatron_trillion.data.xlda_packing import resume_xlda_dataset

        sources = self.splits.train
        if past_anneal_boundary and self.config.anneal.anneal_data_path:
            sources = self.anneal_sources()
        if checkpoint is None or "data" not in checkpoint:
            dataset = self.build(sources)
        else:
            dataset, changes = resume_xlda_dataset(
                checkpoint["data"], checkpoint["train_state"]["consumed_samples"],
                **self.dataset_kwargs(sources))
            for change in changes:
                log(f" data mixture changed since the checkpoint: {change}")
        report_sample_index(dataset, log)
        return dataset

    def anneal_dataset(self, current, consumed: int, log: Log):
        """The anneal mixture, starting from ``current``'s stream positions at ``consumed``."""
        from megatron_trillion.data.xlda_packing import resume_xlda_dataset

        dataset, changes = resume_xlda_dataset(current.state_dict(consumed), consumed,
                                               **self.dataset_kwargs(self.anneal_sources()))
        for change in changes:
            log(f" anneal data mixture: {change}")
        report_sample_index(dataset, log)
        return dataset

    def eval_batches(self, dp_rank: int, log: Log = lambda line: None,
                     context_parallel: Optional[ContextParallelSplit] = None,
                     prepare: Callable = lambda dataset: None) -> dict:
        """Micro-batches of held-out data per language (this rank's share); ``prepare(dataset)``
        runs on each dataset before it is read (DPO: its reference log-probabilities)."""
        config, shape = self.config, self.shape
        if config.eval.eval_interval is None or config.eval.eval_iters == 0:
            return {}
        by_language: dict = {}
        for source in self.valid_sources:
            by_language.setdefault(source.language, []).append(source)
        micro, dp = config.batch.micro_batch_size, shape.data_parallel_size
        samples = config.eval.eval_iters * micro * dp
        batches = {}
        for language, entries in sorted(by_language.items()):
            # One language per dataset: no cross-lingual blocks to form, so XLDA falls back to
            # its per-document blocks.
            masking = config.data.attention_masking
            if self.chat is not None:
                dataset = self._sft_dataset(entries, samples, log)
            else:
                dataset = self.build(entries, num_samples=samples, rho=0.0,
                                     anchor_language=language,
                                     masking=(MASKING_DOCUMENT if masking == MASKING_XLDA
                                              else masking))
            prepare(dataset)
            batches[language] = StepBatches(dataset, micro, dp_rank, dp, context_parallel,
                                            collate=self.collate).for_step(0, samples)
        return batches
