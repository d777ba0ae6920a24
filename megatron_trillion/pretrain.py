"""Pretraining entry point: ``torchrun --nproc-per-node N -m megatron_trillion.pretrain FLAGS``.

The order is the order of a run: parse and validate every flag (before any process group),
bring up the process groups, build the tokenizer, model chunks, weights, DDP, optimizer,
schedules and data, resume from ``--load``, train, save.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from typing import Optional, Sequence

import torch

from megatron_trillion.errors import UserError
from megatron_trillion.models.presets import model_signature
from megatron_trillion.models.vocab import padded_vocab_size
from megatron_trillion.platform.device import compute_device
from megatron_trillion.platform.warnings import quiet_known_warnings
from megatron_trillion.training.arguments import PretrainConfig, parse_args, to_flat_dict
from megatron_trillion.training.validation import (
    RunShape,
    platform_notes,
    transformer_engine_available,
    validate,
    world_size_from_env,
)


# --------------------------------------------------------------------------------------------
# pieces of setup


def resolve_model_preset(config: PretrainConfig, vocab_size: Optional[int] = None,
                         check: bool = True):
    """The model of the flags: the preset with its overrides, or (no --preset) the model the
    shape flags define. ``check=False`` (up-front validation) leaves the consistency checks to
    ``validate()``, which reports them together with every other conflict."""
    from megatron_trillion.training.model_flags import resolve_model

    return resolve_model(config.model, vocab_size, check=check)


def tokenizer_config(config: PretrainConfig):
    """The run's tokenizer flags, or None when it has no tokenizer (mock data, NullTokenizer)."""
    from megatron_trillion.data.tokenizers import TOKENIZER_TYPE_ALIASES, TokenizerConfig

    data = config.data
    if data.mock_data or data.tokenizer_type == "NullTokenizer":
        return None
    kind = TOKENIZER_TYPE_ALIASES.get(data.tokenizer_type, data.tokenizer_type)
    return TokenizerConfig(tokenizer_type=kind,
                           tokenizer_model=data.tokenizer_model,
                           vocab_file=data.vocab_file, merge_file=data.merge_file)


def build_tokenizer(config: PretrainConfig):
    from megatron_trillion.data.tokenizers import build_tokenizer as build

    tokenizer_flags = tokenizer_config(config)
    return build(tokenizer_flags) if tokenizer_flags is not None else None


def build_transformer_config(config: PretrainConfig, preset, shape: RunShape):
    from megatron.core.transformer.enums import AttnBackend

    from megatron_trillion.models.config import build_transformer_config as build
    from megatron_trillion.models.specs import transformer_engine_available

    train, kernels, model = config.training, config.kernels, config.model
    te = transformer_engine_available()
    kwargs = dict(
        sequence_parallel=config.parallel.sequence_parallel,
        calculate_per_token_loss=True,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        bf16=train.bf16,
        recompute_granularity=train.recompute_granularity,
        recompute_method=train.recompute_method,
        recompute_num_layers=train.recompute_num_layers,
        # Batched p2p posts both directions between the same two ranks in one call; with
        # PP=2 and virtual stages the activation and the gradient travel between the same
        # pair, and gloo (like Megatron-LM's own interleaved default) must keep them on
        # separate calls or they can be matched to the wrong buffer.
        batch_p2p_comm=not (shape.parallel.virtual_pipeline or not torch.cuda.is_available()),
        # Kernel flags (validate() refused those whose kernel is missing here).
        attention_backend=AttnBackend[kernels.attention_backend],
        apply_rope_fusion=te if kernels.apply_rope_fusion is None else kernels.apply_rope_fusion,
        # Only megatron-core's own DotProductAttention uses it; TE's and the XLDA attention
        # (the two built here) do not (platform_notes says so for --no-masked-softmax-fusion).
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=(kernels.gradient_accumulation_fusion
                                      and _gradient_accumulation_fusion_available()),
        cross_entropy_loss_fusion=kernels.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=kernels.cross_entropy_fusion_impl,
        tp_comm_overlap=kernels.tp_comm_overlap,
        # Context parallelism pads every attention block to a multiple of 2 x CP, so the tokens
        # per micro-batch vary: pipeline stages exchange activation shapes first.
        variable_seq_lengths=(shape.parallel.context > 1 and shape.parallel.pipeline > 1),
    )
    if preset.is_moe:
        kwargs.update(moe_grouped_gemm=kernels.moe_grouped_gemm,
                      moe_token_dispatcher_type=model.moe_token_dispatcher_type)
        if model.moe_router_load_balancing_type is not None:
            kwargs["moe_router_load_balancing_type"] = model.moe_router_load_balancing_type
    if kwargs["variable_seq_lengths"] and not preset.is_moe:
        # megatron-core refuses variable lengths with its default (MoE-only) allgather
        # dispatcher even in a dense model; MoE runs choose theirs
        # (--moe-token-dispatcher-type).
        kwargs["moe_token_dispatcher_type"] = "alltoall"
    if train.fp8_format:
        kwargs.update(fp8=train.fp8_format, fp8_amax_history_len=train.fp8_amax_history_len,
                      fp8_amax_compute_algo=train.fp8_amax_compute_algo,
                      fp8_param=train.fp8_param_gather)
    return build(preset, None, **kwargs)


def _gradient_accumulation_fusion_available() -> bool:
    """megatron-core's non-TE linear layers (the output layer) need apex's
    fused_weight_gradient_mlp_cuda for it; Megatron-LM turns the fusion off without it too."""
    import importlib.util

    return torch.cuda.is_available() and \
        importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def initialize_tp_communicators(config: PretrainConfig, preset, shape: RunShape) -> None:
    """--tp-comm-overlap: Transformer Engine's userbuffers for the TP all-gather/reduce-scatter
    overlapped with GEMMs, sized for one micro-batch of this rank's tokens (Megatron-LM's
    _initialize_tp_communicators)."""
    from transformer_engine.pytorch import module as te_module

    tokens = config.batch.micro_batch_size * shape.seq_length // shape.parallel.context
    te_module.base.initialize_ub(
        shape=[tokens, preset.hidden_size], tp_size=shape.parallel.tensor,
        use_fp8=config.training.fp8_format is not None)


def build_model_chunks(config: PretrainConfig, preset, transformer_config, shape: RunShape):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.init import initialize_weights

    stages = shape.parallel.virtual_pipeline or 1
    chunks = [
        build_model(preset, config=transformer_config,
                    vp_stage=(stage if stages > 1 else None),
                    transformer_impl=config.model.transformer_impl,
                    attention_masking=config.data.attention_masking,
                    make_vocab_size_divisible_by=config.model.make_vocab_size_divisible_by)
        for stage in range(stages)
    ]
    initialize_weights(chunks, seed=config.training.seed)
    # Modules megatron-core builds put their parameters on the current CUDA device already;
    # torch-built ones (e.g. torch norms) are created on the host. One move, before DDP
    # allocates its gradient buffers next to the parameters (Megatron-LM's get_model does
    # the same).
    device = compute_device()
    for chunk in chunks:
        chunk.to(device)
    par = config.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not config.training.grad_reduce_in_bf16,
        fp8_param_gather=config.training.fp8_param_gather,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=(par.use_distributed_optimizer
                                   and config.optimizer.optimizer == "adam"),
        check_for_nan_in_grad=False,  # the NaN guard decides what happens to such a step
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    return wrapped


def build_optimizer(config: PretrainConfig, model_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = config.optimizer
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=config.training.clip_grad, bf16=config.training.bf16,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        overlap_param_gather=config.parallel.overlap_param_gather,
        muon_momentum=opt.muon_momentum, muon_fp32_matmul_prec=opt.muon_fp32_matmul_prec,
        decoupled_lr=opt.decoupled_lr, decoupled_min_lr=opt.decoupled_min_lr,
    )
    if opt.optimizer == "muon":
        from megatron_trillion.training.muon import get_muon_optimizer

        return get_muon_optimizer(optimizer_config, model_chunks, muon_lr=opt.muon_lr)
    return get_megatron_optimizer(optimizer_config, model_chunks)


def lr_schedule_config(config: PretrainConfig, shape: RunShape):
    """The learning-rate schedule in samples (its WSD decay start is the anneal boundary)."""
    from megatron_trillion.training.schedules import LRScheduleConfig

    return LRScheduleConfig(
        max_lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
        total_steps=shape.lr_decay_samples, warmup_steps=shape.lr_warmup_samples,
        init_lr=config.schedule.lr_warmup_init,
        style=config.schedule.lr_decay_style.lower(),
        wsd_decay_fraction=config.schedule.lr_wsd_decay_fraction,
        wsd_decay_style=config.schedule.lr_wsd_decay_style,
    )


def anneal_data_switch_sample(config: PretrainConfig, shape: RunShape) -> Optional[int]:
    """Consumed samples when training switches to ``--anneal-data-path``: the first step
    boundary at or past the WSD decay start (None: no switch within the run)."""
    lr_config = lr_schedule_config(config, shape)
    if not config.anneal.anneal_data_path or lr_config.style != "wsd":
        return None
    consumed = 0
    while consumed < lr_config.decay_start:
        consumed += shape.batch_schedule.global_batch_size_at(consumed)
    return consumed if consumed < shape.train_samples else None


def build_schedules(config: PretrainConfig, optimizer, shape: RunShape, preset):
    from megatron_trillion.training.schedules import ParamScheduler, anneal_config_for

    lr_config = lr_schedule_config(config, shape)
    anneal = None
    if lr_config.style == "wsd":
        mtp_alpha = preset.mtp_loss_scaling_factor
        anneal = anneal_config_for(
            lr_config,
            weight_decay=(config.optimizer.weight_decay, config.anneal.anneal_weight_decay),
            mtp_loss_scaling=(mtp_alpha, config.anneal.anneal_mtp_loss_scaling_factor
                              if preset.mtp_num_layers else mtp_alpha),
        )
    scheduler = ParamScheduler(optimizer, lr_config, anneal, config.optimizer.weight_decay)
    return scheduler, shape.batch_schedule, anneal


def data_workdir(config: PretrainConfig) -> str:
    """Where generated files (mock data, sample-index caches) go when no path is given."""
    return (config.data.data_cache_path or config.checkpoint.save
            or os.path.join(tempfile.gettempdir(), "megatron-trillion"))


def report_sample_index(dataset, say) -> None:
    index = dataset.index
    say(f" sample index {index.directory}: samples [{index.first_sample}, "
        f"{index.first_sample + index.num_samples}), {index.found} chunk(s) read from the "
        f"cache, {index.built} built")


def data_sources(config: PretrainConfig, vocab_size: int, workdir: str):
    """The train / valid / test sources (``training.data.DataSplits``). ``vocab_size``: the
    tokenizer's (unpadded) size, so mock data is the same at any TP."""
    from megatron_trillion.training.data import (
        DataSplits,
        resolve_data_splits,
        write_mock_datasets,
    )

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
    if masking == "xlda" and len(set(languages)) < 2:
        return "document"
    return masking


def build_chat_format(config: PretrainConfig, tokenizer, log=print):
    """--sft: the chat template (--chat-template, the tokenizer's own, or the default) bound to
    the tokenizer; None without --sft."""
    if not config.data.sft:
        return None
    from megatron_trillion.data.chat_template import ChatFormat, resolve_chat_template

    template, origin = resolve_chat_template(config.data.chat_template,
                                             config.data.tokenizer_model)
    log(f" SFT chat template: {origin}")
    return ChatFormat(template, tokenizer)


def build_sft_dataset(config: PretrainConfig, chat, sources, shape: RunShape, workdir: str,
                      num_samples: int, log=print):
    from megatron_trillion.data.sft import build_sft_dataset as build

    return build(sources, chat, shape.seq_length, num_samples, seed=config.training.seed,
                 overlong=config.data.sft_overlong_conversations,
                 cache_dir=config.data.data_cache_path or os.path.join(workdir, "sft-cache"),
                 log=log)


def build_dataset(config: PretrainConfig, sources, shape: RunShape, eod: int, workdir: str,
                  **changes):
    """The XLDA-packed dataset over ``sources``; ``changes`` override the flags' values."""
    from megatron_trillion.data.xlda_packing import build_xlda_dataset

    kwargs = dataset_kwargs(config, sources, shape, eod, workdir)
    kwargs.update(changes)
    return build_xlda_dataset(**kwargs)


def build_eval_batches(config: PretrainConfig, sources, shape: RunShape, eod: int,
                       workdir: str, dp_rank: int, chat=None, log=lambda line: None,
                       context_parallel=None) -> dict:
    """Micro-batches of held-out data per language (this rank's share)."""
    from megatron_trillion.training.data import StepBatches

    if config.eval.eval_interval is None or config.eval.eval_iters == 0:
        return {}
    by_language: dict = {}
    for entry in sources:
        by_language.setdefault(entry[2], []).append(entry)
    micro, dp = config.batch.micro_batch_size, shape.data_parallel_size
    samples = config.eval.eval_iters * micro * dp
    batches = {}
    for language, entries in sorted(by_language.items()):
        # One language per dataset: no cross-lingual blocks to form, so XLDA falls back to its
        # per-document blocks.
        masking = config.data.attention_masking
        if chat is not None:
            dataset = build_sft_dataset(config, chat, entries, shape, workdir, samples, log)
        else:
            dataset = build_dataset(config, entries, shape, eod, workdir, num_samples=samples,
                                    rho=0.0, anchor_language=language,
                                    masking="document" if masking == "xlda" else masking)
        batches[language] = StepBatches(dataset, micro, dp_rank, dp,
                                        context_parallel).for_step(0, samples)
    return batches


def make_step_flops(preset):
    from megatron_trillion.training.flops import training_flops

    def step_flops(batches: list) -> float:
        blocks = []
        for batch in batches:
            # Under context parallelism: the whole (unpadded) blocks, of which this rank does
            # 1/CP of the work.
            cu = batch.get("cu_seqlens_blocks", batch["packed_seq_params"].cu_seqlens_q).tolist()
            blocks.append([b - a for a, b in zip(cu[:-1], cu[1:])])
        cp = batches[0].get("context_parallel_size", 1) if batches else 1
        return training_flops(preset, blocks) / cp

    return step_flops


def context_parallel_split(config: PretrainConfig, preset, shape: RunShape):
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


class ExitSignal:
    """SIGTERM / SIGUSR1 (SLURM's pre-timeout signal) -> save at the next step, then exit 0."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = True

    def agreed(self) -> bool:
        """True on every rank once any rank received the signal (a collective)."""
        flag = torch.tensor([1 if self.received else 0], device=compute_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


# --------------------------------------------------------------------------------------------
# the run


def pretrain(config: PretrainConfig, log=print, on_step=None):
    from megatron.core import parallel_state as ps

    from megatron_trillion.models.config import set_mtp_loss_scaling_factor
    from megatron_trillion.models.specs import transformer_engine_available as te_available
    from megatron_trillion.platform.distributed import initialize_distributed
    from megatron_trillion.training import checkpointing
    from megatron_trillion.data.tokenizers import tokenizer_fingerprint
    from megatron_trillion.training.data import StepBatches, check_data_files
    from megatron_trillion.training.housekeeping import Housekeeping
    from megatron_trillion.training.loop import Run, TrainState, train
    from megatron_trillion.training.numerics import NumericsGuard
    from megatron_trillion.training.reporting import MetricWriters

    # 1. everything that can be checked without process groups
    _set_logging_level(config.logging.logging_level)
    tokenizer = build_tokenizer(config)
    if tokenizer is not None and config.data.vocab_size is not None and \
            config.data.vocab_size != tokenizer.vocab_size:
        raise UserError(f"--vocab-size {config.data.vocab_size} differs from the tokenizer's "
                        f"size ({tokenizer.vocab_size}, --tokenizer-model "
                        f"{config.data.tokenizer_model}); drop --vocab-size or fix it")
    tp = config.parallel.tensor_model_parallel_size
    base_vocab = (tokenizer.vocab_size if tokenizer is not None
                  else config.data.vocab_size
                  or resolve_model_preset(config, check=False).vocab_size)
    # The model pads the vocabulary for TP itself and masks the padding out (models.vocab).
    vocab = padded_vocab_size(base_vocab, config.model.make_vocab_size_divisible_by, tp)
    preset = resolve_model_preset(config, base_vocab, check=False)  # validate() checks it
    shape = validate(config, preset, world_size_from_env(), te_available())
    fingerprint = (tokenizer_fingerprint(tokenizer_config(config), tokenizer)
                   if tokenizer is not None else None)
    check_data_files(config, fingerprint, base_vocab,
                     log if int(os.environ.get("RANK", "0")) == 0 else None)

    # 2. process groups, model, optimizer, schedules
    initialize_distributed(shape.parallel, seed=config.training.seed,
                           timeout_minutes=config.parallel.distributed_timeout_minutes,
                           num_layers=preset.num_layers,
                           num_attention_heads=preset.num_attention_heads,
                           num_query_groups=preset.query_groups,
                           num_moe_experts=preset.num_experts)
    rank = torch.distributed.get_rank()
    say = log if rank == 0 else (lambda line: None)
    if rank == 0:
        say(f" building {preset.name}: {preset.num_layers} layers, hidden {preset.hidden_size}, "
            f"vocab {vocab} (tokenizer {base_vocab}); TP {shape.parallel.tensor} x PP "
            f"{shape.parallel.pipeline} x DP {shape.data_parallel_size}"
            + (f" x EP {shape.parallel.expert}" if shape.parallel.expert > 1 else ""))
        for note in platform_notes(config, preset, te_available(), torch.cuda.is_available()):
            say(f" note: {note}")
    if config.kernels.tp_comm_overlap:
        initialize_tp_communicators(config, preset, shape)
    transformer_config = build_transformer_config(config, preset, shape)
    model = build_model_chunks(config, preset, transformer_config, shape)
    _connect_ddp_to_schedule(model, config)
    optimizer = build_optimizer(config, model)
    scheduler, rampup, anneal = build_schedules(config, optimizer, shape, preset)

    # 3. data
    # Where generated files (mock data, sample-index caches) go when no path is given.
    workdir = data_workdir(config)
    eod = tokenizer.eod if tokenizer is not None else 0
    chat = build_chat_format(config, tokenizer, say)
    splits = data_sources(config, base_vocab, workdir)
    sources = splits.train
    languages = splits.languages()
    if chat is None and config.data.attention_masking == "xlda" and len(languages) < 2:
        say(f" data has one language ({languages[0]}): cross-lingual packing has nothing to "
            "mix, so training uses document blocks (as --attention-masking document)")
    state = TrainState()
    guard = NumericsGuard(max_consecutive_bad_steps=config.training.max_consecutive_nonfinite_steps)
    common = None
    if config.checkpoint.load:
        loaded = checkpointing.load_checkpoint(
            config.checkpoint.load, model, optimizer, model_signature(preset),
            load_optimizer=not (config.checkpoint.no_load_optim or config.checkpoint.finetune),
            load_rng=not (config.checkpoint.no_load_rng or config.checkpoint.finetune),
            iteration=config.checkpoint.ckpt_step, log=say)
        if loaded is not None and not config.checkpoint.finetune:
            common = loaded.common
            state.load_state_dict(common["train_state"])
            scheduler.load_state_dict(
                common["scheduler"],
                override=config.schedule.override_opt_param_scheduler,
                use_checkpoint=config.schedule.use_checkpoint_opt_param_scheduler)
            anneal = scheduler.anneal  # the checkpoint's, with --use-checkpoint-opt_param-...
            guard.load_state_dict(common["numerics"])
    if common is not None:  # resuming: the data position must be of the same kind of run
        resumed = common.get("data", {}).get("kind", "pretraining")
        current = "sft" if chat is not None else "pretraining"
        if resumed != current:
            raise UserError(f"--load {config.checkpoint.load} holds a {resumed} run's "
                            f"checkpoint and this is a {current} run: add --finetune to start "
                            "from its weights")
    if chat is not None:  # the position is the consumed-samples count alone
        dataset = build_sft_dataset(config, chat, sources, shape, workdir, shape.train_samples,
                                    say)
    else:
        dataset = _dataset_for(config, sources, shape, eod, workdir, anneal, scheduler, common,
                               say)
        report_sample_index(dataset, say)
    # The ranks of one context-parallel group read the same samples, each keeping its share.
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=False)
    cp_split = context_parallel_split(config, preset, shape)
    batches = StepBatches(dataset, config.batch.micro_batch_size, dp_rank,
                          shape.data_parallel_size, cp_split,
                          prefetch=config.data.num_workers > 0)
    valid_sources = splits.valid or splits.test or []
    eval_batches = build_eval_batches(config, valid_sources, shape, eod, workdir, dp_rank,
                                      chat, say, cp_split) if valid_sources else {}
    if scheduler.mtp_loss_scaling is not None and preset.mtp_num_layers:
        set_mtp_loss_scaling_factor(model, scheduler.mtp_loss_scaling)

    # 4. train
    signals = ExitSignal(config.checkpoint.exit_signal_handler)
    run_config = to_flat_dict(config)
    run_config["tokenizer_fingerprint"] = fingerprint  # export and generation compare against it

    saver = checkpointing.CheckpointSaver(
        config.checkpoint.save, keep_last=config.checkpoint.ckpt_keep_last,
        async_save=config.checkpoint.async_save, log=say) if config.checkpoint.save else None

    def save(train_state: TrainState) -> None:
        if saver.last_saved_iteration == train_state.iteration:
            return  # e.g. a signal arrived right after a --save-interval save
        saver.save(train_state.iteration, model, optimizer,
                   common={"train_state": train_state.state_dict(),
                           "scheduler": scheduler.state_dict(), "numerics": guard.state_dict(),
                           "data": run.train_batches.dataset.state_dict(
                               train_state.consumed_samples),
                           "model": model_signature(preset), "config": run_config,
                           # --sft: export and generation use the template training used
                           **({"chat_template": chat.template} if chat is not None else {})})

    def at_step_boundary() -> bool:
        """Publish finished background saves; True when a signal asks to save and exit."""
        if saver is not None:
            saver.poll()
        interval = config.training.exit_interval
        if interval and run.state.iteration % interval == 0:
            return True  # --exit-interval: same path as a signal (save, then stop)
        if housekeeping.duration_exceeded():
            return True  # --exit-duration-in-mins: the same path
        return config.checkpoint.exit_signal_handler and signals.agreed()

    def on_anneal_switch(switches, train_state: TrainState) -> None:
        if preset.mtp_num_layers and scheduler.mtp_loss_scaling is not None:
            set_mtp_loss_scaling_factor(model, scheduler.mtp_loss_scaling)
        if config.anneal.anneal_data_path:
            previous = run.train_batches
            run.train_batches = StepBatches(
                _anneal_dataset(config, previous.dataset, shape, eod, workdir,
                                train_state.consumed_samples, say),
                config.batch.micro_batch_size, dp_rank, shape.data_parallel_size, cp_split,
                prefetch=config.data.num_workers > 0)
            previous.close()

    housekeeping = Housekeeping(
        config.training, config.profiling, rank=rank, log=say,
        trace_dir=os.path.join(config.logging.tensorboard_dir or config.checkpoint.save
                               or os.getcwd(), "profile"))
    writers = MetricWriters(config.logging.tensorboard_dir, config.logging.wandb_project,
                            config.logging.wandb_exp_name, run_config) if rank == 0 else None
    run = Run(
        model=model, optimizer=optimizer, scheduler=scheduler, rampup=rampup, guard=guard,
        train_batches=batches, train_iters=shape.train_iters,
        # THD: one row of B*S tokens, of which each context-parallel rank holds ~1/CP
        tokens_per_microbatch=config.batch.micro_batch_size * shape.seq_length
        // shape.parallel.context,
        step_flops=make_step_flops(preset),
        world_size=torch.distributed.get_world_size(),
        log_interval=config.logging.log_interval, eval_interval=config.eval.eval_interval,
        eval_batches=eval_batches, on_anneal_switch=on_anneal_switch, anneal=anneal,
        save=save if config.checkpoint.save else None,
        save_interval=config.checkpoint.save_interval,
        exit_requested=at_step_boundary,
        device_peak_tflops=config.logging.device_peak_tflops or _default_peak(),
        writers=writers, progress=not config.logging.no_progress_bar, log=say, state=state,
        on_step=on_step,
        hang_timeout_seconds=config.training.hang_timeout_seconds,
        housekeeping=housekeeping,
        empty_expert_warning_steps=config.logging.moe_empty_expert_warning_steps,
    )
    try:
        final = train(run)
        if saver is not None:
            save(final)  # no-op when the last step already saved
            saver.wait()
    finally:
        run.train_batches.close()
        if writers is not None:
            writers.close()
    return final, run


def _connect_ddp_to_schedule(model: list, config: PretrainConfig) -> None:
    # megatron-core's finalize_model_grads, with the model's own expert-bias rule (SMEBU).
    from megatron_trillion.training.expert_bias import finalize_grads_and_expert_bias

    transformer_config = model[0].config
    transformer_config.finalize_model_grads_func = finalize_grads_and_expert_bias
    if config.parallel.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        transformer_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if config.parallel.overlap_param_gather:
        sync = [chunk.start_param_sync for chunk in model]
        transformer_config.param_sync_func = sync[0] if len(sync) == 1 else sync


def _dataset_for(config, sources, shape, eod, workdir, anneal, scheduler, common, say):
    """The training dataset; after a resume past the anneal boundary, the anneal mixture."""
    from megatron_trillion.data.xlda_packing import resume_xlda_dataset

    in_anneal = (anneal is not None and config.anneal.anneal_data_path
                 and scheduler.num_steps >= anneal.start_step)
    if in_anneal:
        from megatron_trillion.training.data import parse_data_path

        sources = parse_data_path(config.anneal.anneal_data_path, "--anneal-data-path")
    if common is None or "data" not in common:
        return build_dataset(config, sources, shape, eod, workdir)
    kwargs = dataset_kwargs(config, sources, shape, eod, workdir)
    dataset, changes = resume_xlda_dataset(common["data"], common["train_state"][
        "consumed_samples"], **kwargs)
    for change in changes:
        say(f" data mixture changed since the checkpoint: {change}")
    return dataset


def dataset_kwargs(config, sources, shape, eod, workdir) -> dict:
    """``build_xlda_dataset``'s arguments from the flags: training and
    tools/build_data_index.py share them, so both address the same cached index."""
    from megatron_trillion.training.data import parse_lang_beta

    data = config.data
    languages = sorted({entry[2] for entry in sources})
    masking = effective_masking(config, languages)
    single = len(languages) < 2
    return dict(sources=sources, seq_length=shape.seq_length, num_samples=shape.train_samples,
                masking=masking, xlda_block_scope=data.xlda_block_scope,
                # One language: nothing to mix, so no cross-lingual sequences to ask for.
                rho=0.0 if single else data.xlda_mixing_prob,
                anchor_language=languages[0] if single else data.anchor_language,
                alpha=data.lang_alpha,
                beta=parse_lang_beta(data.lang_beta), seed=config.training.seed,
                cache_dir=data.data_cache_path or (os.path.join(workdir, "index-cache")
                                                   if data.mock_data else None),
                eod_token=eod, mmap_bin_files=data.mmap_bin_files)


def _anneal_dataset(config, current, shape, eod, workdir, consumed, say):
    from megatron_trillion.data.xlda_packing import resume_xlda_dataset
    from megatron_trillion.training.data import parse_data_path

    sources = parse_data_path(config.anneal.anneal_data_path, "--anneal-data-path")
    dataset, changes = resume_xlda_dataset(current.state_dict(consumed), consumed,
                                           **dataset_kwargs(config, sources, shape, eod,
                                                             workdir))
    for change in changes:
        say(f" anneal data mixture: {change}")
    report_sample_index(dataset, say)
    return dataset


def _default_peak() -> Optional[float]:
    from megatron_trillion.platform.device import device_peak_tflops

    return device_peak_tflops()


# --------------------------------------------------------------------------------------------
# CLI


def _set_logging_level(level: Optional[int]) -> None:
    """--logging-level: the Python logging level of this process (Megatron-LM's meaning)."""
    if level is not None:
        import logging

        logging.getLogger().setLevel(level)
        logging.getLogger("megatron").setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """User errors (flags, config files, data paths: ``UserError``) print one line and exit 2;
    any other exception keeps its traceback, on the rank where it happened."""
    quiet_known_warnings()
    try:
        pretrain(parse_args(argv))
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from megatron_trillion.platform.distributed import destroy_distributed

        if torch.distributed.is_initialized():
            destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
