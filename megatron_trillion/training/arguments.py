"""Command-line flags (Megatron-LM names) -> typed, validated config objects.

Every flag is declared once, as a field of one of the config dataclasses below; the argparse
parser, the config-file loader and the pinned-flags test are all derived from those fields.
Library code receives the dataclasses, never an argparse namespace or a global ``get_args()``.

A config file (``--config FILE``, TOML or JSON) may set any flag: top-level keys are flag names
with or without the dashes (``tensor-model-parallel-size`` or ``tensor_model_parallel_size``);
command-line flags override the file. ``[anneal]`` / ``"anneal"`` holds the anneal section's
keys without their ``anneal-`` prefix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

_NO_DEFAULT = object()


def flag(default: Any, help: str, *, name: Optional[str] = None, **argparse_kwargs: Any) -> Any:
    """A config field that is also a command-line flag (``--field-name`` unless ``name``)."""
    metadata = {"help": help, "flag": name, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class ModelArgs:
    preset: str = flag("tiny-tri-7b", "model preset name (see megatron_trillion.models.presets)")
    num_layers: Optional[int] = flag(None, "override the preset's number of layers")
    hidden_size: Optional[int] = flag(None, "override the preset's hidden size")
    ffn_hidden_size: Optional[int] = flag(None, "override the preset's FFN hidden size")
    num_attention_heads: Optional[int] = flag(None, "override the preset's query heads")
    num_query_groups: Optional[int] = flag(None, "override the preset's KV heads (GQA groups)")
    seq_length: Optional[int] = flag(None, "training sequence length (default: the preset's)")
    rotary_base: Optional[float] = flag(None, "RoPE theta (default: the preset's)")
    num_experts: Optional[int] = flag(None, "override the preset's number of routed experts")
    moe_router_topk: Optional[int] = flag(None, "override the preset's experts per token")
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
        """Preset fields overridden on the command line."""
        names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "seq_length", "rotary_base", "num_experts",
                 "moe_router_topk", "mtp_num_layers", "mtp_loss_scaling_factor",
                 "init_method_std")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class ParallelArgs:
    tensor_model_parallel_size: int = flag(1, "tensor parallel size")
    pipeline_model_parallel_size: int = flag(1, "pipeline parallel size")
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        None, "layers per virtual pipeline stage (interleaved 1F1B)")
    expert_model_parallel_size: int = flag(1, "expert parallel size (MoE)")
    expert_tensor_parallel_size: Optional[int] = flag(None, "tensor parallel size inside experts")
    context_parallel_size: int = flag(1, "context parallel size")
    sequence_parallel: bool = flag(False, "sequence parallelism (needs TP > 1)")
    use_distributed_optimizer: bool = flag(False, "shard optimizer states over DP (ZeRO-1)")
    overlap_grad_reduce: bool = flag(False, "overlap the DP gradient reduce with backward")
    overlap_param_gather: bool = flag(False, "overlap the distributed optimizer's param gather")


@dataclass(frozen=True)
class BatchArgs:
    micro_batch_size: int = flag(1, "samples per micro-batch per data-parallel rank")
    global_batch_size: Optional[int] = flag(
        None, "samples per optimizer step (default: micro-batch x DP)")
    rampup_batch_size: Optional[list] = flag(
        None, "batch ramp-up: <start> <increment> <ramp samples>", nargs=3, type=int)


@dataclass(frozen=True)
class TrainingArgs:
    train_iters: Optional[int] = flag(None, "optimizer steps to train (or --train-samples)")
    train_samples: Optional[int] = flag(None, "samples to train (or --train-iters)")
    seed: int = flag(1234, "seed of initialisation, data order and dropout (layout-invariant)")
    bf16: bool = flag(False, "bf16 mixed precision (GPU)")
    fp8_format: Optional[str] = flag(None, "FP8 training via Transformer Engine",
                                     choices=["hybrid", "e4m3"])
    fp8_amax_history_len: int = flag(1024, "FP8 amax history length")
    fp8_amax_compute_algo: str = flag("max", "FP8 amax compute algorithm",
                                      choices=["max", "most_recent"])
    recompute_granularity: Optional[str] = flag(None, "activation recomputation",
                                                choices=["full", "selective"])
    recompute_method: Optional[str] = flag(None, "how full recompute picks layers",
                                           choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = flag(None, "layers per recompute unit/block")
    clip_grad: float = flag(1.0, "gradient clipping by global norm (0 disables)")
    max_consecutive_nonfinite_steps: int = flag(
        5, "stop after this many consecutive steps with a NaN/inf loss or grad norm")
    exit_interval: Optional[int] = flag(None, "exit after the iteration divisible by this")
    hang_timeout_seconds: Optional[float] = flag(
        None, "hang watchdog: when one iteration (with its eval/save) makes no progress for "
        "this long, every rank dumps its Python stacks and the job exits non-zero")


@dataclass(frozen=True)
class OptimizerArgs:
    optimizer: str = flag("adam", "adam (AdamW) or muon (Muon on matrices, AdamW on the rest)",
                          choices=["adam", "muon"])
    lr: float = flag(3e-4, "peak learning rate (AdamW part under muon)")
    min_lr: float = flag(3e-5, "final learning rate (Trillion: 10% of the peak)")
    muon_lr: float = flag(8e-4, "peak Muon learning rate (Trinity stable phase)")
    weight_decay: float = flag(0.1, "weight decay of the stable phase")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    muon_momentum: float = flag(0.95, "Muon momentum")


@dataclass(frozen=True)
class ScheduleArgs:
    lr_decay_style: str = flag("wsd", "learning-rate schedule",
                               choices=["wsd", "cosine", "linear", "constant"])
    lr_wsd_decay_style: str = flag("inverse-proportional", "shape of the WSD decay stage",
                                   choices=["inverse-proportional", "cosine", "linear"])
    lr_warmup_iters: int = flag(2000, "linear warmup length in iterations")
    lr_wsd_decay_fraction: float = flag(0.1, "WSD decay over this last fraction of training")


@dataclass(frozen=True)
class AnnealArgs:
    anneal_weight_decay: float = flag(0.033, "weight decay from the anneal boundary on")
    anneal_mtp_loss_scaling_factor: float = flag(0.1, "MTP alpha from the anneal boundary on")
    anneal_data_path: Optional[list] = flag(
        None, "data mixture of the anneal phase (same syntax as --data-path)", nargs="+")


@dataclass(frozen=True)
class DataArgs:
    data_path: Optional[list] = flag(
        None, "datasets: [WEIGHT] LANG:PREFIX ... (LANG optional when PREFIX ends in "
        "_<lang>_text_document)", nargs="+")
    valid_data_path: Optional[list] = flag(
        None, "held-out datasets (same syntax); validation loss is reported per language",
        nargs="+")
    mock_data: bool = flag(False, "random token documents in 3 languages instead of --data-path")
    data_cache_path: Optional[str] = flag(None, "where sample indices are cached")
    verify_data: bool = flag(False, "at start-up scan every token of every dataset against the "
                             "vocabulary (default: a sample of documents), with a progress bar")
    tokenizer_type: str = flag("HuggingFaceTokenizer", "tokenizer kind",
                               choices=["HuggingFaceTokenizer", "SentencePieceTokenizer",
                                        "GPT2BPETokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = flag(None, "tokenizer.json / directory / .model file")
    vocab_file: Optional[str] = flag(None, "GPT2 BPE vocab file")
    merge_file: Optional[str] = flag(None, "GPT2 BPE merges file")
    vocab_size: Optional[int] = flag(None, "vocabulary size for --tokenizer-type NullTokenizer")
    attention_masking: str = flag("xlda", "xlda: cross-lingual blocks; document: per document; "
                                  "none: classic packing", choices=["xlda", "document", "none"])
    xlda_mixing_prob: float = flag(0.5, "rho: probability a sequence mixes >= 2 languages")
    anchor_language: str = flag("en", "the language every cross-lingual sequence contains")
    lang_alpha: Optional[float] = flag(None, "alpha of eq. 2 (smoothing towards natural sizes)")
    lang_beta: Optional[list] = flag(None, "beta of eq. 2 as LANG=VALUE ... (sums to 1)",
                                     nargs="+")


@dataclass(frozen=True)
class EvalArgs:
    eval_interval: Optional[int] = flag(None, "validate every N iterations")
    eval_iters: int = flag(2, "micro-batch rounds per validation")


@dataclass(frozen=True)
class LoggingArgs:
    log_interval: int = flag(1, "iterations between log lines")
    tensorboard_dir: Optional[str] = flag(None, "TensorBoard event directory")
    wandb_project: Optional[str] = flag(None, "Weights & Biases project (when wandb is installed)")
    wandb_exp_name: Optional[str] = flag(None, "Weights & Biases run name")
    no_progress_bar: bool = flag(False, "disable the progress bar on rank 0")
    device_peak_tflops: Optional[float] = flag(
        None, "peak dense TFLOP/s of one device for MFU (default: H100 BF16 989 on GPU)")


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
    ckpt_format: str = flag("torch_dist", "checkpoint format", choices=["torch_dist"])
    ckpt_step: Optional[int] = flag(None, "load this iteration from --load instead of the "
                                    "newest (latest_checkpointed_iteration.txt)")
    ckpt_keep_last: Optional[int] = flag(None, "keep only the newest N checkpoints in --save")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run is configured by."""

    model: ModelArgs
    parallel: ParallelArgs
    batch: BatchArgs
    training: TrainingArgs
    optimizer: OptimizerArgs
    schedule: ScheduleArgs
    anneal: AnnealArgs
    data: DataArgs
    eval: EvalArgs
    logging: LoggingArgs
    checkpoint: CheckpointArgs


GROUPS = {
    "model": ModelArgs, "parallel": ParallelArgs, "batch": BatchArgs, "training": TrainingArgs,
    "optimizer": OptimizerArgs, "schedule": ScheduleArgs, "anneal": AnnealArgs,
    "data": DataArgs, "eval": EvalArgs, "logging": LoggingArgs, "checkpoint": CheckpointArgs,
}


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


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
            kwargs["help"] = f.metadata["help"]
            kwargs["dest"] = f.name
            kwargs["default"] = argparse.SUPPRESS
            if f.type in (bool, "bool"):
                kwargs["action"] = "store_true"
            elif "type" not in kwargs:
                kwargs["type"] = _scalar_type(f)
            group.add_argument(flag_name(f), **kwargs)
    return parser


def _scalar_type(f: dataclasses.Field):
    text = str(f.type)
    if "list" in text:
        return str
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if name in text:
            return kind
    return str


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table/object of flag values")
    flat = {}
    for key, value in data.items():
        if key == "anneal" and isinstance(value, dict):
            for sub, v in value.items():
                flat["anneal_" + sub.replace("-", "_")] = v
        else:
            flat[key.lstrip("-").replace("-", "_")] = value
    return flat


def parse_args(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    """Parse flags (and ``--config``) into a :class:`PretrainConfig`; raise ValueError on misuse."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    config_path = values.pop("config", None)
    merged = _read_config_file(config_path) if config_path else {}
    known = {f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"--config {config_path}: unknown keys {unknown}")
    merged.update(values)
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
    return ["--config"] + [flag_name(f) for cls in GROUPS.values() for f in dataclasses.fields(cls)]
