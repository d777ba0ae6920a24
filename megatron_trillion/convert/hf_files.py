"""The files of a Hugging Face model directory: sharded safetensors + index, config.json,
generation_config.json, tokenizer files; and a lazy reader of such a directory."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_trillion.convert.checkpoint_reader import MissingTensorError
from megatron_trillion.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` files of at most
    ``max_shard_bytes`` each (a larger single tensor gets a shard of its own) plus the index
    transformers / vLLM / SGLang read. Holds at most one shard in memory."""

    def __init__(self, directory: str, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise UserError(f"--max-shard-size must be positive, got {max_shard_bytes}")
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        os.makedirs(directory, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # contiguous copies: views into a fused megatron tensor would save the whole buffer
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _temp_name(self, index: int) -> str:
        return os.path.join(self.directory, f".shard-{index:05d}.safetensors.tmp")

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        save_file(self._pending, self._temp_name(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Publish the shards under their final names and write the index; returns the files."""
        self._flush()
        count = len(self._shards)
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._temp_name(i), os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
            files.append(final)
        write_json(os.path.join(self.directory, INDEX),
                   {"metadata": {"total_size": self.total_bytes},
                    "weight_map": dict(sorted(weight_map.items()))})
        return files


def write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=False)
        f.write("\n")


def generation_config(bos: Optional[int], eos: Optional[int]) -> dict:
    config = {"_from_model_config": True}
    if bos is not None:
        config["bos_token_id"] = bos
    if eos is not None:
        config["eos_token_id"] = eos
    return config


def copy_tokenizer_files(run_config: dict, directory: str) -> list[str]:
    """Copy the tokenizer the run trained with (its --tokenizer-* flags) into ``directory``."""
    from megatron_trillion.data.tokenizers import TokenizerConfig

    flags = TokenizerConfig.from_run_config(run_config)
    copied = []
    if flags is None:
        return copied
    kind = flags.tokenizer_type

    def copy(src: str, name: str) -> None:
        shutil.copyfile(src, os.path.join(directory, name))
        copied.append(name)

    if kind == "GPT2BPETokenizer":
        copy(flags.vocab_file, "vocab.json")
        copy(flags.merge_file, "merges.txt")
        return copied
    model = flags.tokenizer_model
    if not model:
        return copied
    if os.path.isdir(model):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(model, name)):
                copy(os.path.join(model, name), name)
        return copied
    if kind == "SentencePieceTokenizer":
        copy(model, "tokenizer.model")
    else:
        copy(model, "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        sibling = os.path.join(os.path.dirname(model), name)
        if os.path.isfile(sibling):
            copy(sibling, name)
    return copied


class HFCheckpointReader:
    """config.json and tensors of a HF directory, read one tensor at a time (safetensors)."""

    def __init__(self, directory: str) -> None:
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"--load {directory}: no config.json (not a Hugging Face model "
                            "directory)")
        with open(config_path, encoding="utf-8") as f:
            self.config = json.load(f)
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            from safetensors import safe_open

            with safe_open(os.path.join(directory, SINGLE), framework="pt") as f:
                self.weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise UserError(f"--load {directory}: no {INDEX} or {SINGLE} (only safetensors "
                            "checkpoints are read)")
        self._open: dict = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map.get(name)
        if file is None:
            raise MissingTensorError(f"{self.directory} has no tensor {name!r} (needed by the "
                                     f"{self.config.get('model_type')!r} mapping)")
        if file not in self._open:
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                raise MissingTensorError(f"{self.directory}: {INDEX} puts {name!r} in {file}, "
                                         "which does not exist")
            self._open[file] = safe_open(path, framework="pt")
        try:
            return self._open[file].get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise MissingTensorError(f"{self.directory}/{file} has no tensor {name!r} although "
                                     f"{INDEX} lists it there ({exc})") from exc

