"""Command-line flags (Megatron-LM names) -> typed, validated config objects.

Every flag is declared once, as a field of one of the config dataclasses below; the argparse
parser, the config-file loader and the pinned-flags test are all derived from those fields.
Library code receives the dataclasses, never an argparse namespace or a global ``get_args()``.

A config file (``--config FILE``, TOML or JSON) may set any flag: top-level keys are flag names
with or without the dashes (``tensor-model-parallel-size`` or ``tensor_model_parallel_size``);
command-line flags override the file. ``[anneal]`` / ``"anneal"`` holds the anneal section's
keys without their ``anneal-`` prefix. File values are checked and converted with the same
types as the command line ("2" -> 2, "false" -> False); a value that does not fit is refused
naming the key.

Megatron-LM flags this platform cannot honour are *refused*, not unknown: ``REFUSED_FLAGS`` maps
each to one line saying why and what to use instead, and parsing stops with that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from megatron_trillion.data.attention_blocks import (
    BLOCK_SCOPES,
    MASKING_MODES,
    MASKING_XLDA,
    SCOPE_PAIR,
)
from megatron_trillion.errors import UserError


def flag(default: Any, help: str, *, name: Optional[str] = None, aliases: Sequence[str] = (),
         negative: Optional[str] = None, **argparse_kwargs: Any) -> Any:
    """A config field that is also a command-line flag (``--field-name`` unless ``name``).

    ``aliases``: other spellings Megatron-LM accepts (e.g. ``--override-opt_param-scheduler``).
    ``negative``: a ``--no-...`` flag that sets a boolean field to False (Megatron-LM's
    ``--no-rope-fusion`` style). A bool field defaulting to True is itself a ``--no-...`` flag.
    """
    metadata = {"help": help, "flag": name, "aliases": tuple(aliases), "negative": negative,
                "argparse": argparse_kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class ModelArgs:
    preset: Optional[str] = flag(
        None, "model preset name (see megatron_trillion.models.presets); the shape flags below "
        "may override it and must not contradict it. Without --preset the shape flags define "
        "the model, as in Megatron-LM")
    num_layers: Optional[int] = flag(None, "number of transformer layers")
    hidden_size: Optional[int] = flag(None, "hidden size")
    ffn_hidden_size: Optional[int] = flag(
        None, "FFN hidden size (no preset: Megatron-LM's default, 4 x hidden x 2/3 rounded down "
        "to a multiple of 64 with --swiglu)")
    num_attention_heads: Optional[int] = flag(None, "query heads")
    num_query_groups: Optional[int] = flag(None, "KV heads (GQA groups)")
    group_query_attention: bool = flag(
        False, "grouped-query attention: --num-query-groups KV heads (checked against the preset)")
    kv_channels: Optional[int] = flag(None, "head dimension (default hidden / heads)")
    seq_length: Optional[int] = flag(None, "training sequence length (default: the preset's)")
    max_position_embeddings: Optional[int] = flag(
        None, "longest sequence the model is for; must be >= --seq-length (RoPE has no "
        "position table, so nothing else depends on it)")
    position_embedding_type: Optional[str] = flag(
        None, "position embedding; every model here uses rope",
        choices=["learned_absolute", "rope", "mrope", "relative", "none"])
    no_position_embedding: bool = flag(
        False, "no learned absolute position embedding (always true here: RoPE)")
    rotary_base: Optional[float] = flag(None, "RoPE theta (default: the preset's)")
    rotary_percent: float = flag(1.0, "fraction of each head rotated by RoPE (only 1.0)")
    swiglu: bool = flag(False, "SwiGLU MLP (every model here; required without --preset)")
    normalization: Optional[str] = flag(
        None, "normalization layer (every model here: RMSNorm)", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: Optional[float] = flag(None, "epsilon of the normalization layers")
    disable_bias_linear: bool = flag(
        False, "no biases in linear layers (every model here; required without --preset)")
    untie_embeddings_and_output_weights: bool = flag(
        False, "separate input embedding and output layer weights (checked against the preset; "
        "without --preset, tied unless given, as in Megatron-LM)")
    use_mcore_models: bool = flag(
        False, "megatron-core models (the only implementation here; accepted for old scripts)")
    num_experts: Optional[int] = flag(None, "number of routed experts (MoE)")
    moe_router_topk: Optional[int] = flag(None, "experts per token")
    moe_ffn_hidden_size: Optional[int] = flag(None, "FFN hidden size of each expert")
    moe_router_load_balancing_type: Optional[str] = flag(
        None, "load-balancing loss (default: the preset's; aux_loss when --moe-aux-loss-coeff "
        "> 0, else none)", choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                                    "none"])
    moe_aux_loss_coeff: Optional[float] = flag(None, "weight of the load-balancing loss")
    moe_router_bias_update_style: Optional[str] = flag(
        None, "how the router expert bias moves each step: sign (megatron-core) or smebu "
        "(Trinity's soft-clamped momentum updates; default: the preset's)",
        choices=["sign", "smebu"])
    moe_router_bias_update_rate: Optional[float] = flag(
        None, "expert bias update rate (sign: the step; smebu: lambda; default: the preset's)")
    moe_router_bias_update_momentum: Optional[float] = flag(
        None, "SMEBU momentum beta (default: the preset's)")
    moe_router_bias_update_clamp_scale: Optional[float] = flag(
        None, "SMEBU soft-clamp scale kappa in tanh(kappa * violation) (default: the preset's)")
    moe_token_dispatcher_type: str = flag(
        "alltoall", "how tokens reach their experts (flex needs DeepEP on GPU)",
        choices=["allgather", "alltoall", "flex"])
    mtp_num_layers: Optional[int] = flag(None, "multi-token-prediction layers (preset: 1)")
    mtp_loss_scaling_factor: Optional[float] = flag(
        None, "MTP loss weight alpha in the stable phase (Trillion: 0.2)")
    init_method_std: Optional[float] = flag(None, "std of the normal weight initialisation")
    hidden_dropout: float = flag(0.0, "dropout after attention and MLP")
    attention_dropout: float = flag(0.0, "dropout on attention probabilities")
    transformer_impl: str = flag("auto", "layer spec: transformer_engine on GPU, local on CPU",
                                 choices=["auto", "transformer_engine", "local"])
    make_vocab_size_divisible_by: int = flag(
        128, "pad the vocabulary to a multiple of this times the TP size")

    def preset_overrides(self) -> dict:
        """Preset fields set on the command line."""
        names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "seq_length", "rotary_base", "norm_epsilon",
                 "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff",
                 "moe_router_bias_update_style", "moe_router_bias_update_rate",
                 "moe_router_bias_update_momentum", "moe_router_bias_update_clamp_scale",
                 "mtp_num_layers", "mtp_loss_scaling_factor", "init_method_std")
        overrides = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.untie_embeddings_and_output_weights:
            overrides["untie_embeddings_and_output_weights"] = True
        return overrides


@dataclass(frozen=True)
class KernelArgs:
    """Fused kernels and communication overlap: megatron-core config fields. Each needs what
    its kernel needs (Transformer Engine, CUDA); validation refuses it where that is missing,
    or says once that it has no effect where megatron-core falls back by itself."""

    attention_backend: str = flag(
        "auto", "megatron-core attention backend (TransformerConfig.attention_backend); on CPU "
        "the local XLDA attention is the only one", choices=["auto", "flash", "fused", "unfused",
                                                             "local"])
    apply_rope_fusion: Optional[bool] = flag(
        None, "fused RoPE kernel (TE); default: on when Transformer Engine is present",
        negative="--no-rope-fusion")
    masked_softmax_fusion: bool = flag(
        True, "fused scale+mask+softmax of megatron-core's DotProductAttention (not used by "
        "the TE or XLDA attention built here: accepted, and reported as no effect)")
    gradient_accumulation_fusion: bool = flag(
        True, "fuse weight-gradient accumulation into the GEMM (TE/apex, CUDA)")
    cross_entropy_loss_fusion: bool = flag(
        False, "fused vocab-parallel cross entropy (TransformerConfig.cross_entropy_loss_fusion)")
    cross_entropy_fusion_impl: str = flag(
        "native", "native: megatron-core's torch implementation; te: Transformer Engine's",
        choices=["native", "te"])
    moe_grouped_gemm: bool = flag(False, "grouped GEMM over local experts (TE, CUDA)")
    tp_comm_overlap: bool = flag(
        False, "overlap TP communication with GEMMs (TE userbuffers, CUDA, needs "
        "--sequence-parallel)")


@dataclass(frozen=True)
class ParallelArgs:
    tensor_model_parallel_size: int = flag(1, "tensor parallel size")
    pipeline_model_parallel_size: int = flag(1, "pipeline parallel size")
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        None, "layers per virtual pipeline stage (interleaved 1F1B)")
    expert_model_parallel_size: int = flag(1, "expert parallel size (MoE)")
    expert_tensor_parallel_size: Optional[int] = flag(None, "tensor parallel size inside experts")
    context_parallel_size: int = flag(1, "context parallel size")
    cp_comm_type: str = flag(
        "p2p", "context-parallel attention communication; batches here are packed (THD), for "
        "which Transformer Engine implements only p2p (the ring); the CPU attention gathers "
        "keys and values itself", choices=["p2p", "a2a", "allgather", "all_gather", "a2a+p2p"])
    sequence_parallel: bool = flag(False, "sequence parallelism (needs TP > 1)")
    use_distributed_optimizer: bool = flag(False, "shard optimizer states over DP (ZeRO-1)")
    overlap_grad_reduce: bool = flag(False, "overlap the DP gradient reduce with backward")
    overlap_param_gather: bool = flag(False, "overlap the distributed optimizer's param gather")
    distributed_timeout_minutes: float = flag(
        10.0, "timeout of collectives in the default process group")


@dataclass(frozen=True)
class BatchArgs:
    micro_batch_size: int = flag(1, "samples per micro-batch per data-parallel rank")
    global_batch_size: Optional[int] = flag(
        None, "samples per optimizer step (default: micro-batch x DP)")
    rampup_batch_size: Optional[list] = flag(
        None, "batch ramp-up: <start> <increment> <ramp samples>", nargs=3, type=int)
    step_batch_size_schedule: Optional[str] = flag(
        None, "step-wise global batch size 'THRESHOLD:BS ...' with thresholds in tokens (suffixes "
        "K M B T), e.g. '0:16 2.4B:320'; instead of --global-batch-size")


@dataclass(frozen=True)
class TrainingArgs:
    train_iters: Optional[int] = flag(None, "optimizer steps to train (or --train-samples)")
    train_samples: Optional[int] = flag(None, "samples to train (or --train-iters)")
    seed: int = flag(1234, "seed of initialisation, data order and dropout (layout-invariant)")
    bf16: bool = flag(False, "bf16 mixed precision (GPU)")
    grad_reduce_in_bf16: bool = flag(False, "reduce gradients over DP in bf16 (default fp32)")
    fp8_format: Optional[str] = flag(None, "FP8 training via Transformer Engine",
                                     choices=["hybrid", "e4m3"])
    fp8_amax_history_len: int = flag(1024, "FP8 amax history length")
    fp8_amax_compute_algo: str = flag("max", "FP8 amax compute algorithm",
                                      choices=["max", "most_recent"])
    fp8_param_gather: bool = flag(
        False, "keep FP8 weights and all-gather them in FP8 (TE; needs "
        "--use-distributed-optimizer)")
    calculate_per_token_loss: bool = flag(
        False, "average the loss over tokens, not micro-batches (always the case here)")
    recompute_granularity: Optional[str] = flag(None, "activation recomputation",
                                                choices=["full", "selective"])
    recompute_method: Optional[str] = flag(None, "how full recompute picks layers",
                                           choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = flag(None, "layers per recompute unit/block")
    clip_grad: float = flag(1.0, "gradient clipping by global norm (0 disables)")
    max_consecutive_nonfinite_steps: int = flag(
        5, "stop after this many consecutive steps with a NaN/inf loss or grad norm")
    exit_interval: Optional[int] = flag(None, "exit after the iteration divisible by this")
    exit_duration_in_mins: Optional[float] = flag(
        None, "save (with --save) and exit once the run has taken this many minutes")
    hang_timeout_seconds: Optional[float] = flag(
        None, "hang watchdog: when one iteration (with its eval/save) makes no progress for "
        "this long, every rank dumps its Python stacks and the job exits non-zero")
    manual_gc: bool = flag(
        False, "disable Python's automatic garbage collector; collect at --manual-gc-interval "
        "and around evaluation, in step on every rank")
    manual_gc_interval: int = flag(0, "with --manual-gc: collect every N iterations (0: never)")
    manual_gc_eval: bool = flag(True, "with --manual-gc: collect before and after evaluation")
    empty_unused_memory_level: int = flag(
        0, "release cached CUDA memory: 1 after each step, 2 also after evaluation",
        choices=[0, 1, 2])


@dataclass(frozen=True)
class OptimizerArgs:
    optimizer: str = flag("adam", "adam (AdamW) or muon (Muon on matrices, AdamW on the rest)",
                          choices=["adam", "muon"])
    lr: float = flag(3e-4, "peak learning rate (AdamW part under muon)")
    min_lr: float = flag(3e-5, "final learning rate (Trillion: 10% of the peak)")
    decoupled_lr: Optional[float] = flag(
        None, "peak learning rate of the input embedding and output layer")
    decoupled_min_lr: Optional[float] = flag(
        None, "final learning rate of the input embedding and output layer")
    muon_lr: float = flag(8e-4, "peak Muon learning rate (Trinity stable phase)")
    weight_decay: float = flag(0.1, "weight decay of the stable phase")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    muon_momentum: float = flag(0.95, "Muon momentum")
    muon_fp32_matmul_prec: str = flag(
        "medium", "Newton-Schulz precision: medium (bf16 matmuls) or high/highest (fp32, the "
        "same update at any parallel layout)", choices=["medium", "high", "highest"])


@dataclass(frozen=True)
class ScheduleArgs:
    lr_decay_style: str = flag("wsd", "learning-rate schedule (WSD = wsd)",
                               choices=["wsd", "WSD", "cosine", "linear", "constant"])
    lr_wsd_decay_style: str = flag("inverse-proportional", "shape of the WSD decay stage",
                                   choices=["inverse-proportional", "cosine", "linear"])
    lr_decay_iters: Optional[int] = flag(
        None, "iterations the schedule spans (default --train-iters); fixing it lets a run be "
        "extended with a larger --train-iters without changing its schedule")
    lr_decay_samples: Optional[int] = flag(
        None, "samples the schedule spans (default --train-samples)")
    lr_warmup_iters: int = flag(0, "linear warmup length in iterations")
    lr_warmup_samples: int = flag(0, "linear warmup length in samples")
    lr_warmup_fraction: Optional[float] = flag(
        None, "linear warmup as a fraction of the schedule length")
    lr_warmup_init: float = flag(0.0, "learning rate at the start of the warmup")
    lr_wsd_decay_fraction: float = flag(0.1, "WSD decay over this last fraction of training")
    override_opt_param_scheduler: bool = flag(
        False, "on --load, use this run's schedule flags instead of the checkpoint's (keeping "
        "its position)", name="--override-opt_param-scheduler",
        aliases=["--override-opt-param-scheduler"])
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, "on --load, use the checkpoint's schedule and ignore this run's schedule flags",
        name="--use-checkpoint-opt_param-scheduler",
        aliases=["--use-checkpoint-opt-param-scheduler"])


@dataclass(frozen=True)
class AnnealArgs:
    anneal_weight_decay: float = flag(
        0.033, "weight decay from the anneal boundary on (post-training: --weight-decay, i.e. "
        "no switch, unless given)")
    anneal_mtp_loss_scaling_factor: Optional[float] = flag(
        None, "MTP alpha from the anneal boundary on (default 0.1; post-training: the "
        "preset's, i.e. no switch, unless given)")
    anneal_data_path: Optional[list] = flag(
        None, "data mixture of the anneal phase (same syntax as --data-path)", nargs="+")


@dataclass(frozen=True)
class DataArgs:
    data_path: Optional[list] = flag(
        None, "datasets: PREFIX, or [WEIGHT] [LANG:]PREFIX ... (the language is read from "
        "names like ..._<lang>_text_document, else the prefix is one unnamed language); split "
        "into train/valid/test by --split", nargs="+")
    data_args_path: Optional[str] = flag(
        None, "file holding the --data-path value (for long mixtures)")
    split: Optional[str] = flag(
        None, "train,valid,test proportions of each --data-path dataset's documents, e.g. "
        "949,50,1 (default: all for training)")
    train_data_path: Optional[list] = flag(
        None, "training datasets used whole (instead of --data-path with --split)", nargs="+")
    valid_data_path: Optional[list] = flag(
        None, "held-out datasets (same syntax); validation loss is reported per language",
        nargs="+")
    test_data_path: Optional[list] = flag(
        None, "test datasets (same syntax); checked, and evaluated like --valid-data-path "
        "when no validation data is given", nargs="+")
    mock_data: bool = flag(False, "random token documents in 3 languages instead of --data-path")
    data_cache_path: Optional[str] = flag(
        None, "directory for generated files: sample-index caches and --mock-data")
    verify_data: bool = flag(False, "at start-up scan every token of every dataset against the "
                             "vocabulary (default: a sample of documents), with a progress bar")
    mmap_bin_files: bool = flag(True, "memory-map the .bin files (else read with file I/O)")
    num_workers: int = flag(
        2, "> 0: a background thread reads and packs the next step's micro-batches while this "
        "step trains (one thread whatever N: the packed reads are sequential); 0: read in "
        "the training loop")
    create_attention_mask_in_dataloader: bool = flag(
        True, "accepted for Megatron-LM scripts: no dense mask is ever built here (packed "
        "blocks carry their boundaries)")
    tokenizer_type: str = flag("HuggingFaceTokenizer", "tokenizer kind (Llama2Tokenizer: a "
                               "SentencePiece .model, as SentencePieceTokenizer)",
                               choices=["HuggingFaceTokenizer", "SentencePieceTokenizer",
                                        "Llama2Tokenizer", "GPT2BPETokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = flag(None, "tokenizer.json / directory / .model file")
    tiktoken_pattern: Optional[str] = flag(
        None, "TikTokenizer split pattern (no tokenizer here uses it: reported as no effect)")
    vocab_file: Optional[str] = flag(None, "GPT2 BPE vocab file")
    merge_file: Optional[str] = flag(None, "GPT2 BPE merges file")
    vocab_size: Optional[int] = flag(
        None, "vocabulary size: sets it for NullTokenizer/--mock-data, and must match a real "
        "tokenizer's size")
    attention_masking: str = flag(MASKING_XLDA, "xlda: cross-lingual blocks; document: per "
                                  "document; none: classic packing", choices=list(MASKING_MODES))
    xlda_block_scope: str = flag(
        SCOPE_PAIR, "XLDA attention block of a cross-lingual sequence: pair (each anchor/partner "
        "document pair) or sequence (every document sees all earlier ones); monolingual "
        "sequences keep per-document blocks", choices=list(BLOCK_SCOPES))
    xlda_mixing_prob: float = flag(0.5, "rho: probability a sequence mixes >= 2 languages")
    anchor_language: str = flag("en", "the language every cross-lingual sequence contains")
    lang_alpha: Optional[float] = flag(None, "alpha of eq. 2 (smoothing towards natural sizes)")
    lang_beta: Optional[list] = flag(None, "beta of eq. 2 as LANG=VALUE ... (sums to 1)",
                                     nargs="+")
    sft: bool = flag(False, "supervised fine-tuning: --data-path/--valid-data-path are chat JSONL "
                     "files ({\"messages\": [...]} per line), loss on assistant turns only")
    chat_template: Optional[str] = flag(
        None, "Jinja chat template file for --sft (default: the tokenizer's chat_template, "
        "else a built-in plain-text template)")
    sft_overlong_conversations: str = flag(
        "truncate", "--sft conversations longer than --seq-length: truncate (counted in the "
        "log) or error", choices=["truncate", "error"])
    dpo: bool = flag(False, "direct preference optimisation: --data-path/--valid-data-path are "
                     "preference JSONL files ({\"chosen\": [...], \"rejected\": [...]} or "
                     "{\"prompt\", \"chosen\", \"rejected\"} per line), --load the SFT model")
    grpo: bool = flag(False, "RLVR with GRPO: --data-path files are prompt JSONL ({\"messages\": "
                      "[...] | \"prompt\": ..., \"ground_truth\": ..., \"verifier\": ...} per "
                      "line), rollouts are sampled from the model being trained")


@dataclass(frozen=True)
class DPOArgs:
    dpo_loss: str = flag("norm", "DPO loss: sigmoid (DPO), norm (length-normalised DPO, Tulu "
                         "3's dpo_norm) or ipo", choices=["sigmoid", "norm", "ipo"])
    dpo_beta: float = flag(5.0, "DPO beta (Tulu 3 with --dpo-loss norm: 5)")
    dpo_sft_loss_weight: float = flag(
        0.0, "weight of an added NLL term on the chosen response (per chosen token)")
    dpo_reference_load: Optional[str] = flag(
        None, "reference model checkpoint for the cached log-probabilities (default --load)")
    dpo_max_length_ratio: Optional[float] = flag(
        None, "drop pairs whose longer response has more than this many times the tokens of "
              "the shorter (counted in the log per language)")


@dataclass(frozen=True)
class GRPOArgs:
    grpo_prompts_per_step: Optional[int] = flag(
        None, "prompts per rollout batch (one optimizer step per --grpo-epochs); the global "
        "batch size of a --grpo run, counted in prompts (default --global-batch-size)")
    grpo_samples_per_prompt: int = flag(16, "responses sampled per prompt (the group size G)")
    grpo_max_new_tokens: int = flag(256, "most tokens of a sampled response")
    grpo_temperature: float = flag(1.0, "sampling temperature of the rollouts")
    grpo_top_p: float = flag(1.0, "nucleus sampling threshold of the rollouts")
    grpo_kl_coeff: float = flag(0.0, "weight of the k3 KL penalty against the starting "
                                "weights (0: no reference policy is kept)")
    grpo_clip_low: float = flag(0.2, "lower clip bound of the importance ratio (1 - this)")
    grpo_clip_high: float = flag(0.2, "upper clip bound of the importance ratio (1 + this; "
                                 "DAPO raises it, e.g. 0.28)")
    grpo_epochs: int = flag(1, "optimizer steps on each rollout batch")
    grpo_scale_rewards_by_std: bool = flag(
        False, "divide advantages by the group's reward standard deviation (GRPO's paper; "
        "default: reward minus the group mean only)")
    grpo_truncated_is_cap: Optional[float] = flag(
        None, "truncated importance sampling: weight each token's policy term by "
        "min(p_trainer / p_sampler, CAP), correcting sampler-vs-trainer drift")
    system_prompt_file: Optional[str] = flag(
        None, "system prompt of the rollout prompts that bring none of their own (UTF-8 text)")


@dataclass(frozen=True)
class EvalArgs:
    eval_interval: Optional[int] = flag(None, "validate every N iterations")
    eval_iters: int = flag(2, "micro-batch rounds per validation (0 disables evaluation)")


@dataclass(frozen=True)
class LoggingArgs:
    log_interval: int = flag(1, "iterations between log lines")
    log_throughput: bool = flag(
        False, "log tokens/s and TFLOP/s per GPU (always in the log line here)")
    logging_level: Optional[int] = flag(
        None, "Python logging level of the process (10 debug, 20 info, 30 warning)")
    tensorboard_dir: Optional[str] = flag(None, "TensorBoard event directory")
    wandb_project: Optional[str] = flag(None, "Weights & Biases project (when wandb is installed)")
    wandb_exp_name: Optional[str] = flag(None, "Weights & Biases run name")
    no_progress_bar: bool = flag(False, "disable the progress bar on rank 0")
    device_peak_tflops: Optional[float] = flag(
        None, "peak dense TFLOP/s of one device for MFU (default: H100/H200 BF16 989 on GPU)")
    moe_empty_expert_warning_steps: int = flag(
        100, "warn when an MoE expert receives no token for this many consecutive steps "
        "(0: never)")


@dataclass(frozen=True)
class ProfilingArgs:
    profile: bool = flag(
        False, "profile iterations --profile-step-start..--profile-step-end: with CUDA, "
        "cudaProfilerStart/Stop for nsys; with --use-pytorch-profiler, torch.profiler traces")
    use_pytorch_profiler: bool = flag(
        False, "with --profile: torch.profiler, traces written to --tensorboard-dir (or "
        "--save)/profile")
    profile_step_start: int = flag(10, "first profiled iteration")
    profile_step_end: int = flag(12, "iteration at which profiling stops")
    profile_ranks: list = flag([0], "global ranks to profile", nargs="+", type=int)
    record_memory_history: bool = flag(
        False, "record CUDA allocator history and dump it to --memory-snapshot-path (CUDA)")
    memory_snapshot_path: str = flag("snapshot.pickle", "where --record-memory-history dumps")


@dataclass(frozen=True)
class CheckpointArgs:
    save: Optional[str] = flag(None, "checkpoint directory to save to")
    load: Optional[str] = flag(None, "checkpoint directory to resume from")
    save_interval: Optional[int] = flag(None, "iterations between checkpoints")
    no_load_optim: bool = flag(False, "do not load optimizer state")
    no_load_rng: bool = flag(False, "do not load RNG state")
    finetune: bool = flag(False, "load weights only and start at iteration 0")
    exit_signal_handler: bool = flag(False, "save and exit 0 on SIGTERM/SIGUSR1")
    async_save: bool = flag(False, "write checkpoints in the background (megatron-core "
                            "async torch_dist writer; finished saves are published at the "
                            "next step boundary)")
    ckpt_format: str = flag("torch_dist", "checkpoint format (only torch_dist is written and "
                            "read here; the others are refused)",
                            choices=["torch_dist", "torch", "torch_dcp", "zarr", "fsdp_dtensor"])
    ckpt_step: Optional[int] = flag(None, "load this iteration from --load instead of the "
                                    "newest (latest_checkpointed_iteration.txt)")
    ckpt_keep_last: Optional[int] = flag(None, "keep only the newest N checkpoints in --save")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run is configured by."""

    model: ModelArgs
    kernels: KernelArgs
    parallel: ParallelArgs
    batch: BatchArgs
    training: TrainingArgs
    optimizer: OptimizerArgs
    schedule: ScheduleArgs
    anneal: AnnealArgs
    data: DataArgs
    eval: EvalArgs
    logging: LoggingArgs
    profiling: ProfilingArgs
    checkpoint: CheckpointArgs
    dpo: DPOArgs = DPOArgs()
    grpo: GRPOArgs = GRPOArgs()

    @property
    def kind(self) -> str:
        """What the run trains for: "pretraining", "sft", "dpo" or "grpo"."""
        if self.data.grpo:
            return "grpo"
        return "dpo" if self.data.dpo else "sft" if self.data.sft else "pretraining"


GROUPS = {
    "model": ModelArgs, "kernels": KernelArgs, "parallel": ParallelArgs, "batch": BatchArgs,
    "training": TrainingArgs, "optimizer": OptimizerArgs, "schedule": ScheduleArgs,
    "anneal": AnnealArgs, "data": DataArgs, "eval": EvalArgs, "logging": LoggingArgs,
    "profiling": ProfilingArgs, "checkpoint": CheckpointArgs, "dpo": DPOArgs,
    "grpo": GRPOArgs,
}

# Post-training is not pretraining: what SFT and DPO default to where the flag is not given
# (Tulu 3's recipes: linear decay to 0 after a warmup fraction; DPO without weight decay). The
# WSD anneal switch of pretraining (weight decay, MTP alpha) applies only when asked for.
POST_TRAINING_DEFAULTS = {
    "sft": {"lr_decay_style": "linear", "min_lr": 0.0, "lr_warmup_fraction": 0.03},
    "dpo": {"lr_decay_style": "linear", "min_lr": 0.0, "lr_warmup_fraction": 0.1,
            "weight_decay": 0.0},
    # open-instruct's GRPO: a constant learning rate, no weight decay
    "grpo": {"lr_decay_style": "constant", "min_lr": 0.0, "lr_warmup_fraction": 0.0,
             "weight_decay": 0.0},
}
_WARMUP_FLAGS = ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction")


def _with_post_training_defaults(given: dict) -> dict:
    """``given`` (the flags and config keys a user set) plus the post-training defaults of its
    run kind for the ones not set."""
    kind = ("grpo" if given.get("grpo") else "dpo" if given.get("dpo")
            else "sft" if given.get("sft") else None)
    if kind is None:
        return given
    out = dict(given)
    for key, value in POST_TRAINING_DEFAULTS[kind].items():
        if key == "lr_warmup_fraction" and any(k in given for k in _WARMUP_FLAGS):
            continue  # a warmup given in iterations or samples replaces the fraction
        out.setdefault(key, value)
    # no anneal switch unless asked: the anneal weight decay is the stable one
    out.setdefault("anneal_weight_decay", out.get("weight_decay", OptimizerArgs.weight_decay))
    if kind == "grpo" and out.get("grpo_prompts_per_step") is not None:
        # A GRPO step's global batch is its prompts: one number, two spellings.
        given_batch = out.get("global_batch_size")
        if given_batch is not None and given_batch != out["grpo_prompts_per_step"]:
            raise UserError(f"--grpo-prompts-per-step {out['grpo_prompts_per_step']} and "
                            f"--global-batch-size {given_batch} differ: a --grpo run's global "
                            "batch is its prompts per step; give one")
        out["global_batch_size"] = out["grpo_prompts_per_step"]
    return out


def flag_name(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    if _is_bool(f) and f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def _is_bool(f: dataclasses.Field) -> bool:
    return str(f.type) in ("bool", "Optional[bool]") or f.type in (bool, Optional[bool])


# --------------------------------------------------------------------------------------------
# Megatron-LM flags that are refused: one line each, why and what to use instead.

_FSDP = ("Megatron-FSDP is not supported here; shard optimizer state with "
         "--use-distributed-optimizer (ZeRO-1) and drop the FSDP flags")
_LOSS_SCALE = "loss scaling belongs to --fp16, which is not supported; use --bf16 (no scaling)"

REFUSED_FLAGS: dict[str, tuple[int, str]] = {
    # flag: (number of values it takes, reason and alternative)
    "--fp16": (0, "fp16 training is not supported (it needs loss scaling and overflow "
                  "handling this trainer does not have); use --bf16"),
    "--loss-scale": (1, _LOSS_SCALE),
    "--initial-loss-scale": (1, _LOSS_SCALE),
    "--min-loss-scale": (1, _LOSS_SCALE),
    "--loss-scale-window": (1, _LOSS_SCALE),
    "--hysteresis": (1, _LOSS_SCALE),
    "--use-megatron-fsdp": (0, _FSDP),
    "--use-torch-fsdp2": (0, _FSDP),
    "--data-parallel-sharding-strategy": (1, _FSDP),
    "--use-nccl-ub": (0, "NCCL user buffers are only wired for Megatron-FSDP, which is not "
                         "supported here; drop the flag"),
    "--fsdp-double-buffer": (0, _FSDP),
    "--fsdp-manual-registration": (0, _FSDP),
    "--init-model-with-meta-device": (0, "meta-device initialisation is for Megatron-FSDP; "
                                         "weights here are initialised layout-invariantly on "
                                         "their device; drop the flag"),
    "--no-check-for-nan-in-loss-and-grad": (
        0, "NaN/inf steps are always detected here (from the loss and grad norm the step "
           "computes anyway) and skipped; drop the flag (see --max-consecutive-nonfinite-steps)"),
    "--apply-layernorm-1p": (0, "zero-centred (1 + gamma) norms are not in the Trillion/Llama "
                                "architectures nor their HF export; drop the flag"),
    "--use-flash-attn": (0, "deprecated in Megatron-LM; use --attention-backend flash"),
    "--batch-size": (1, "removed in Megatron-LM; use --micro-batch-size"),
    "--warmup": (1, "removed in Megatron-LM; use --lr-warmup-iters or --lr-warmup-fraction"),
    "--checkpoint-activations": (0, "removed in Megatron-LM; use --recompute-granularity full"),
}


# Values of accepted flags that are refused the same way: {field: {value: reason}}.
_CKPT = ("only megatron-core's torch_dist checkpoints are written and read here (resharding, "
         "async save, HF export build on it); use --ckpt-format torch_dist")
_CP_COMM = ("every batch here is packed (THD: XLDA or document blocks as cu_seqlens) and "
            "Transformer Engine's context parallelism for THD is only its p2p ring; use "
            "--cp-comm-type p2p")
REFUSED_VALUES: dict[str, dict[Any, str]] = {
    "cp_comm_type": {"a2a": _CP_COMM, "allgather": _CP_COMM, "all_gather": _CP_COMM,
                     "a2a+p2p": _CP_COMM},
    "ckpt_format": {"torch": _CKPT, "torch_dcp": _CKPT, "zarr": _CKPT,
                    "fsdp_dtensor": _CKPT + " (fsdp_dtensor is Megatron-FSDP's, not supported)"},
}


class _Refused(argparse.Action):
    """Records a refused flag; ``parse_args`` raises one UserError listing them all."""

    def __call__(self, parser, namespace, values, option_string=None):
        refused = getattr(namespace, "_refused", None) or []
        refused.append(f"{option_string}: {REFUSED_FLAGS[option_string][1]}")
        setattr(namespace, "_refused", refused)


# --------------------------------------------------------------------------------------------
# parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-trillion-pretrain",
        description="Pretrain a Trillion-family model (Megatron-LM flag names).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="TOML or JSON file with flag values (CLI overrides it)")
    for group_name, cls in GROUPS.items():
        group = parser.add_argument_group(group_name)
        for f in dataclasses.fields(cls):
            kwargs = dict(f.metadata["argparse"])
            # argparse %-formats help strings; a literal % must not reach it.
            kwargs["help"] = f.metadata["help"].replace("%", "%%")
            kwargs["dest"] = f.name
            kwargs["default"] = argparse.SUPPRESS
            if _is_bool(f):
                kwargs["action"] = "store_false" if f.default is True else "store_true"
            elif "type" not in kwargs:
                kwargs["type"] = _scalar_type(f)
            group.add_argument(flag_name(f), *f.metadata["aliases"], **kwargs)
            if f.metadata["negative"]:
                group.add_argument(f.metadata["negative"], dest=f.name, action="store_false",
                                   default=argparse.SUPPRESS,
                                   help=f"turn {flag_name(f)} off")
    refused = parser.add_argument_group(
        "refused Megatron-LM flags (recognised; each stops with why and what to use instead)")
    for name, (nargs, reason) in REFUSED_FLAGS.items():
        refused.add_argument(name, nargs=nargs, action=_Refused, default=argparse.SUPPRESS,
                             help=reason.replace("%", "%%"), dest="_refused",
                             metavar="VALUE" if nargs else None)
    return parser


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    """The parser, built once per process (parsing does not change it)."""
    return build_parser()


def _scalar_type(f: dataclasses.Field):
    text = str(f.type)
    if "list" in text:
        return str
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if name in text:
            return kind
    return str


# --------------------------------------------------------------------------------------------
# config files: the same types and choices as the command line


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` from a config file as the command line would have parsed it."""
    key = f"{where}: key {flag_name(f).lstrip('-')!r}"
    if value is None:
        return None
    if _is_bool(f):
        if isinstance(value, bool):
            result = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            result = value.strip().lower() in _TRUE
        elif isinstance(value, int) and value in (0, 1):
            result = bool(value)
        else:
            raise UserError(f"{key} must be true or false, got {value!r}")
        # A --no-X key holds the field's value inverted only when spelled that way: keys are
        # field names (the value), so `masked_softmax_fusion = false` means what it says.
        return result
    kwargs = f.metadata["argparse"]
    convert = kwargs.get("type") or _scalar_type(f)
    nargs = kwargs.get("nargs")
    if nargs is not None:
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserError(f"{key} must be a list (or a space-separated string), "
                            f"got {value!r}")
        items = [_convert_scalar(convert, item, key) for item in items]
        if isinstance(nargs, int) and len(items) != nargs:
            raise UserError(f"{key} takes {nargs} values, got {len(items)}")
        _check_choices(kwargs, items, key)
        return items
    result = _convert_scalar(convert, value, key)
    _check_choices(kwargs, [result], key)
    return result


def _convert_scalar(convert, value: Any, key: str) -> Any:
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise UserError(f"{key} must be a {convert.__name__}, got {value!r}")
    if convert is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{key} must be an int, got {value!r}")
        return int(value)
    try:
        return convert(value if convert is not str else str(value))
    except (TypeError, ValueError):
        raise UserError(f"{key} must be a {convert.__name__}, got {value!r}") from None


def _check_choices(kwargs: dict, values: list, key: str) -> None:
    choices = kwargs.get("choices")
    for value in values:
        if choices is not None and value not in choices:
            raise UserError(f"{key} must be one of {list(choices)}, got {value!r}")


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a table/object of flag values")
    flat = {}
    for key, value in data.items():
        if key == "anneal" and isinstance(value, dict):
            for sub, v in value.items():
                flat["anneal_" + sub.replace("-", "_")] = v
        else:
            flat[key.lstrip("-").replace("-", "_")] = value
    return flat


def _fields_by_key() -> dict:
    """Config-file keys -> field: the field name, and a ``no_...`` flag's own spelling (whose
    value is then inverted, as the flag would set it)."""
    keys = {}
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            keys[f.name] = (f, False)
            for name in (flag_name(f), *f.metadata["aliases"]):
                keys.setdefault(name.lstrip("-").replace("-", "_"), (f, False))
            if f.metadata["negative"]:
                keys[f.metadata["negative"].lstrip("-").replace("-", "_")] = (f, True)
            if _is_bool(f) and f.default is True and not f.metadata["flag"]:
                keys["no_" + f.name] = (f, True)
    return keys


def parse_args(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    """Parse flags (and ``--config``) into a :class:`PretrainConfig`; raise UserError on misuse
    (argparse itself exits 2 on an unknown flag or a malformed value)."""
    namespace = _parser().parse_args(argv)
    values = vars(namespace)
    refused = values.pop("_refused", None)
    if refused:
        raise UserError("refused flag" + ("s" if len(refused) > 1 else "") + ":\n  "
                        + "\n  ".join(refused))
    config_path = values.pop("config", None)
    merged = {}
    if config_path:
        keys = _fields_by_key()
        raw = _read_config_file(config_path)
        unknown = sorted(k for k in raw if k not in keys)
        refused_keys = sorted(k for k in unknown if "--" + k.replace("_", "-") in REFUSED_FLAGS)
        if refused_keys:
            raise UserError("; ".join(
                f"--config {config_path}: key {k!r}: "
                f"{REFUSED_FLAGS['--' + k.replace('_', '-')][1]}" for k in refused_keys))
        if unknown:
            raise UserError(f"--config {config_path}: unknown keys {unknown}")
        for key, value in raw.items():
            f, inverted = keys[key]
            coerced = _coerce(f, value, f"--config {config_path}")
            merged[f.name] = (not coerced) if inverted and coerced is not None else coerced
    merged.update(values)
    merged = _with_post_training_defaults(merged)
    refused = [f"--{name.replace('_', '-')} {merged[name]}: {reasons[merged[name]]}"
               for name, reasons in REFUSED_VALUES.items() if merged.get(name) in reasons]
    if refused:
        raise UserError("refused flag value:\n  " + "\n  ".join(refused))
    groups = {}
    for group_name, cls in GROUPS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        groups[group_name] = cls(**{k: v for k, v in merged.items() if k in names})
    return PretrainConfig(**groups)


def to_flat_dict(config: PretrainConfig) -> dict:
    """The whole run config as ``{field: value}`` (for logs and checkpoints)."""
    out = {}
    for group_name in GROUPS:
        out.update(dataclasses.asdict(getattr(config, group_name)))
    return out


def accepted_flags() -> list[str]:
    """Every option string the parser accepts (aliases and ``--no-`` forms included)."""
    names = ["--config"]
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            names += [flag_name(f), *f.metadata["aliases"]]
            if f.metadata["negative"]:
                names.append(f.metadata["negative"])
    return names


def refused_flags() -> list[str]:
    return list(REFUSED_FLAGS)
