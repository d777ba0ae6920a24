"""megatron-trillion checkpoint -> Hugging Face directory (Llama or AFMoE), streamed.

Reads the checkpoint one layer at a time (:class:`CheckpointReader`), writes sharded safetensors
with an index, ``config.json``, ``generation_config.json`` and the run's tokenizer files. The
MTP layer(s) are not exported (no HF architecture has them; they only serve training). Runs in
one process without a GPU, whatever TP/PP/EP layout saved the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_trillion.convert.architectures import architecture_for
from megatron_trillion.data.tokenizers import (
    TokenizerConfig,
    build_tokenizer,
    tokenizer_drift_warning,
)
from megatron_trillion.models.vocab import is_vocab_parallel_key
from megatron_trillion.convert.hf_files import (
    ShardedSafetensorsWriter,
    copy_tokenizer_files,
    generation_config,
    write_json,
)
from megatron_trillion.data.chat_template import write_chat_template
from megatron_trillion.errors import UserError
from megatron_trillion.platform.output_paths import check_new_output_dir

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3


@dataclass(frozen=True)
class ExportConfig:
    """What to export where.

    Attributes:
        load: the ``--save`` directory of a run (``--load``).
        save: the Hugging Face directory to write (``--save``).
        dtype: "bf16" or "fp32" tensors in the export (``--dtype``).
        iteration: a specific checkpoint instead of the newest (``--ckpt-step``).
        tokenizer_model: tokenizer to ship instead of the run's ``--tokenizer-model``
            (``--tokenizer-model``; e.g. for a run on mock data or a moved tokenizer).
        tokenizer_type: its type (``--tokenizer-type``), default HuggingFaceTokenizer.
        max_shard_bytes: upper bound of one safetensors file (``--max-shard-size``).
    """

    load: str
    save: str
    dtype: str = "bf16"
    iteration: Optional[int] = None
    tokenizer_model: Optional[str] = None
    tokenizer_type: str = "HuggingFaceTokenizer"
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES


@dataclass
class ExportResult:
    architecture: str
    iteration: int
    files: list = field(default_factory=list)
    tokenizer_files: list = field(default_factory=list)
    num_tensors: int = 0
    total_bytes: int = 0


def _tokenizer_config(config: ExportConfig, run_config: dict) -> dict:
    if config.tokenizer_model:
        return {"tokenizer_type": config.tokenizer_type,
                "tokenizer_model": config.tokenizer_model}
    return {k: run_config.get(k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file",
                                           "merge_file")}


def check_vocab(model_vocab: int, tokenizer, where: str, field: str, advice: str) -> None:
    """A tokenizer with more ids than the embedding has rows would index past it."""
    if tokenizer is not None and tokenizer.vocab_size > model_vocab:
        raise UserError(
            f"vocab_size mismatch: the tokenizer {where} has {tokenizer.vocab_size} tokens but "
            f"the model's {field} is {model_vocab}; {advice}")


def export_checkpoint(config: ExportConfig, progress: bool = True,
                      log: Callable[[str], None] = print) -> ExportResult:
    """Export; must run inside an initialised (single-rank is enough) process group."""
    from megatron_trillion.convert.checkpoint_reader import CheckpointReader

    if config.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    dtype = DTYPES[config.dtype]
    check_new_output_dir(config.save)
    reader = CheckpointReader(config.load, config.iteration)
    preset = dataclasses.replace(reader.preset, mtp_num_layers=0)
    arch = architecture_for(preset)
    tok = _tokenizer_config(config, reader.run_config)
    tokenizer_flags = TokenizerConfig.from_run_config(tok)
    tokenizer = build_tokenizer(tokenizer_flags) if tokenizer_flags is not None else None
    if tokenizer is not None:
        drift = tokenizer_drift_warning(reader.run_config, tokenizer_flags, tokenizer)
        if drift:
            log(f" WARNING: {drift}")
    check_vocab(preset.vocab_size, tokenizer, tok.get("tokenizer_model") or tok.get("vocab_file"),
                "vocab_size (rows of embedding.word_embeddings.weight)",
                "export with the tokenizer the model was trained with (--tokenizer-model)")
    rows = reader.shape("embedding.word_embeddings.weight")[0]
    if rows < preset.vocab_size:
        raise UserError(f"embedding.word_embeddings.weight has {rows} rows but the "
                        f"checkpoint's model signature says vocab_size {preset.vocab_size}")

    def get(key: str) -> torch.Tensor:
        # The rows padded for TP are not tokens: HF configs (and vLLM, transformers) must see
        # the tokenizer's own vocabulary size, so they are dropped.
        tensor = reader.get(key)
        return tensor[: preset.vocab_size].clone() if is_vocab_parallel_key(key) else tensor

    os.makedirs(config.save, exist_ok=True)
    writer = ShardedSafetensorsWriter(config.save, config.max_shard_bytes)
    result = ExportResult(architecture=arch.ARCHITECTURE, iteration=reader.iteration)
    steps = arch.export_steps(preset, get)
    bar = _progress_bar(len(steps), f"export {arch.ARCHITECTURE}") if progress else None
    for label, produce in steps:
        if bar is not None:
            bar.set_postfix_str(label)
        for name, tensor in produce():
            writer.add(name, tensor.to(dtype))
            result.num_tensors += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result.files = writer.close()
    result.total_bytes = writer.total_bytes

    bos = tokenizer.bos if tokenizer is not None else None
    eos = tokenizer.eod if tokenizer is not None else None
    hf = arch.hf_config(preset)
    hf.update({"bos_token_id": bos, "eos_token_id": eos, "dtype": _DTYPE_NAMES[dtype],
               "torch_dtype": _DTYPE_NAMES[dtype]})
    write_json(os.path.join(config.save, "config.json"), hf)
    chat = _chat_format(reader.common.get("chat_template"), tokenizer)
    # A chat model stops at its end-of-turn token(s) as well as at EOS.
    stop = chat.end_of_turn_ids() if chat is not None else eos
    write_json(os.path.join(config.save, "generation_config.json"), generation_config(bos, stop))
    result.tokenizer_files = copy_tokenizer_files(tok, config.save) if tokenizer else []
    if chat is not None:
        # The template training rendered with (--sft), so apply_chat_template gives its ids.
        write_chat_template(config.save, chat.template, tokenizer)
        if "tokenizer_config.json" not in result.tokenizer_files:
            result.tokenizer_files.append("tokenizer_config.json")
    if tokenizer is None:
        log(" note: the run used no tokenizer (mock data); pass --tokenizer-model to ship one")
    log(f" exported iteration {reader.iteration} of {reader.preset.name} as "
        f"{arch.ARCHITECTURE}: {result.num_tensors} tensors, {result.total_bytes / 1e6:.1f} MB "
        f"({config.dtype}) in {len(result.files)} shard(s) to {config.save}")
    return result


def _chat_format(template: Optional[str], tokenizer):
    from megatron_trillion.data.chat_template import ChatFormat

    if not template or tokenizer is None or not hasattr(tokenizer, "backend"):
        return None
    return ChatFormat(template, tokenizer)


def _progress_bar(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True)
