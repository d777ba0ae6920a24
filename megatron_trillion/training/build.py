"""A run's objects from its flags: the tokenizer, the model (preset, ``TransformerConfig``,
DDP-wrapped chunks wired to the pipeline schedule), the optimizer and the learning-rate / anneal
schedules.

Pretraining (``training.run``) builds them here, and so do the tools and tests that must build
exactly what a run builds (``tools/build_data_index.py``, the planner's tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megatron_trillion.platform.device import compute_device
from megatron_trillion.training.arguments import PretrainConfig
from megatron_trillion.training.validation import RunShape

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer

    from megatron_trillion.data.tokenizers import TokenizerConfig
    from megatron_trillion.models.presets import ModelPreset
    from megatron_trillion.training.schedules import (
        AnnealConfig,
        BatchSizeSchedule,
        LRScheduleConfig,
        ParamScheduler,
    )


# --------------------------------------------------------------------------------------------
# tokenizer and model preset


def resolve_model_preset(config: PretrainConfig, vocab_size: Optional[int] = None,
                         check: bool = True) -> ModelPreset:
    """The model of the flags: the preset with its overrides, or (no --preset) the model the
    shape flags define. ``check=False`` (up-front validation) leaves the consistency checks to
    ``validate()``, which reports them together with every other conflict."""
    from megatron_trillion.training.model_flags import resolve_model

    return resolve_model(config.model, vocab_size, check=check)


def tokenizer_config(config: PretrainConfig) -> Optional[TokenizerConfig]:
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


# --------------------------------------------------------------------------------------------
# model


def build_transformer_config(config: PretrainConfig, preset: ModelPreset, shape: RunShape):
    from megatron.core.transformer.enums import AttnBackend

    from megatron_trillion.models.config import build_transformer_config as build
    from megatron_trillion.models.specs import transformer_engine_available

    train, kernels, model = config.training, config.kernels, config.model
    te = transformer_engine_available()
    kwargs = dict(
        sequence_parallel=config.parallel.sequence_parallel,
        cp_comm_type=config.parallel.cp_comm_type,
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


def initialize_tp_communicators(config: PretrainConfig, preset: ModelPreset,
                                shape: RunShape) -> None:
    """--tp-comm-overlap: Transformer Engine's userbuffers for the TP all-gather/reduce-scatter
    overlapped with GEMMs, sized for one micro-batch of this rank's tokens (Megatron-LM's
    _initialize_tp_communicators)."""
    from transformer_engine.pytorch import module as te_module

    tokens = config.batch.micro_batch_size * shape.seq_length // shape.parallel.context
    te_module.base.initialize_ub(
        shape=[tokens, preset.hidden_size], tp_size=shape.parallel.tensor,
        use_fp8=config.training.fp8_format is not None)


def build_model_chunks(config: PretrainConfig, preset: ModelPreset, transformer_config,
                       shape: RunShape) -> list:
    """The model chunks (one per virtual pipeline stage), initialised, on the compute device,
    each wrapped in megatron-core's DistributedDataParallel."""
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


def connect_ddp_to_schedule(model: list, config: PretrainConfig) -> None:
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


# --------------------------------------------------------------------------------------------
# optimizer and schedules


def build_optimizer(config: PretrainConfig, model_chunks: list) -> MegatronOptimizer:
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


def lr_schedule_config(config: PretrainConfig, shape: RunShape,
                       check: bool = True) -> LRScheduleConfig:
    """The learning-rate schedule in samples (its WSD decay start is the anneal boundary).
    ``check=False``: unchecked, for validation to list its ``errors()``."""
    from megatron_trillion.training.schedules import LRScheduleConfig

    return LRScheduleConfig(
        max_lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
        total_steps=shape.lr_decay_samples, warmup_steps=shape.lr_warmup_samples,
        init_lr=config.schedule.lr_warmup_init,
        style=config.schedule.lr_decay_style.lower(),
        wsd_decay_fraction=config.schedule.lr_wsd_decay_fraction,
        wsd_decay_style=config.schedule.lr_wsd_decay_style,
        check=check,
    )


def build_schedules(
    config: PretrainConfig, optimizer: MegatronOptimizer, shape: RunShape, preset: ModelPreset,
) -> tuple[ParamScheduler, BatchSizeSchedule, Optional[AnnealConfig]]:
    """(the learning-rate / weight-decay scheduler, the batch-size schedule, the anneal
    stages of a WSD run or None)."""
    from megatron_trillion.training.schedules import ParamScheduler, anneal_config_for

    lr_config = lr_schedule_config(config, shape)
    anneal = None
    if lr_config.style == "wsd":
        mtp_alpha = preset.mtp_loss_scaling_factor
        anneal_alpha = config.anneal.anneal_mtp_loss_scaling_factor
        if anneal_alpha is None:  # pretraining's two-stage anneal; post-training: no switch
            anneal_alpha = 0.1 if config.kind == "pretraining" else mtp_alpha
        anneal = anneal_config_for(
            lr_config,
            weight_decay=(config.optimizer.weight_decay, config.anneal.anneal_weight_decay),
            mtp_loss_scaling=(mtp_alpha, anneal_alpha if preset.mtp_num_layers else mtp_alpha),
        )
    scheduler = ParamScheduler(optimizer, lr_config, anneal, config.optimizer.weight_decay)
    return scheduler, shape.batch_schedule, anneal


def describe_schedule(config: PretrainConfig, shape: RunShape, anneal) -> str:
    """The first log lines' account of the schedule a run uses (post-training runs default to
    their recipes' schedules, not pretraining's WSD with its anneal switch)."""
    lr = lr_schedule_config(config, shape)
    warmup = shape.lr_warmup_samples
    text = (f" schedule ({config.kind}): lr {config.optimizer.lr:g} -> {config.optimizer.min_lr:g}"
            f" by {lr.style} decay over {shape.lr_decay_samples} samples, warmup {warmup} "
            f"samples, weight decay {config.optimizer.weight_decay:g}")
    if anneal is None or (anneal.weight_decay[0] == anneal.weight_decay[1]
                          and anneal.mtp_loss_scaling[0] == anneal.mtp_loss_scaling[1]
                          and not config.anneal.anneal_data_path):
        return text + ", no anneal switch"
    return (text + f"; anneal switch at the WSD decay start: weight decay "
            f"{anneal.weight_decay[0]:g} -> {anneal.weight_decay[1]:g}, MTP alpha "
            f"{anneal.mtp_loss_scaling[0]:g} -> {anneal.mtp_loss_scaling[1]:g}"
            + (", --anneal-data-path mixture" if config.anneal.anneal_data_path else ""))
