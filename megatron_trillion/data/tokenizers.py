"""Text tokenizers by Megatron-LM's ``--tokenizer-type`` names, without transformers.

Each wrapper exposes ``vocab_size``, ``eod`` (the id ``--append-eod`` writes), ``bos``/``pad``
where the tokenizer defines them, ``encode``/``encode_batch`` and ``decode``. Token ids match
what megatron-core's own tokenizers produce for the same files:

- ``HuggingFaceTokenizer``: a ``tokenizer.json`` (or a directory holding one, plus an optional
  ``tokenizer_config.json`` naming the special tokens). Like megatron-core's HF wrapper,
  ``encode`` does not run the post-processor (no BOS) unless ``include_special_tokens`` is set
  (Megatron-LM's ``--tokenizer-hf-include-special-tokens``); ``vocab_size`` counts added tokens
  (``len(tokenizer)`` in transformers); ``eod`` is the EOS token.
- ``SentencePieceTokenizer``: a SentencePiece ``.model``; ``eod`` is its ``eos_id``.
- ``GPT2BPETokenizer``: GPT-2 style ``vocab.json`` + ``merges.txt``, byte-level BPE with the
  GPT-2 split regex; ``<|endoftext|>`` is the EOD and is recognised in text as a special token.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Protocol, Sequence

from megatron_trillion.errors import UserError

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer")
# Megatron-LM's --tokenizer-type names for a tokenizer read the same way as one of ours:
# its Llama2Tokenizer is a SentencePiece .model.
TOKENIZER_TYPE_ALIASES = {"Llama2Tokenizer": "SentencePieceTokenizer"}

# Tried in order when a tokenizer.json comes without a tokenizer_config.json naming its EOS.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


class TextTokenizer(Protocol):
    """What the data tools, the training loop and generation need from a tokenizer."""

    vocab_size: int
    eod: int
    bos: Optional[int]
    pad: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer to build; field names follow Megatron-LM's flags.

    Attributes:
        tokenizer_type: one of TOKENIZER_TYPES (``--tokenizer-type``).
        tokenizer_model: tokenizer.json / its directory, or a SentencePiece .model
            (``--tokenizer-model``).
        vocab_file: GPT-2 vocab.json (``--vocab-file``).
        merge_file: GPT-2 merges.txt (``--merge-file``).
        include_special_tokens: HuggingFaceTokenizer only: apply the tokenizer's
            post-processor (e.g. prepend BOS) when encoding
            (``--tokenizer-hf-include-special-tokens``).
    """

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    include_special_tokens: bool = False

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> Optional["TokenizerConfig"]:
        """The tokenizer of a checkpoint's saved run configuration (its ``--tokenizer-*``
        flags), or None when the run had none (mock data, NullTokenizer)."""
        kind = run_config.get("tokenizer_type")
        if kind in (None, "NullTokenizer") or not (run_config.get("tokenizer_model")
                                                   or run_config.get("vocab_file")):
            return None
        return cls(tokenizer_type=TOKENIZER_TYPE_ALIASES.get(kind, kind),
                   tokenizer_model=run_config.get("tokenizer_model"),
                   vocab_file=run_config.get("vocab_file"),
                   merge_file=run_config.get("merge_file"))

    def files(self) -> list[str]:
        """The files this tokenizer is read from (for fingerprints and error messages)."""
        return [f for f in (self.tokenizer_model, self.vocab_file, self.merge_file) if f]


def _require_file(path: Optional[str], flag: str, tokenizer_type: str) -> Path:
    if not path:
        raise UserError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or directory")
    return Path(path)


def _first_present(candidates: Sequence[str], token_to_id) -> Optional[int]:
    for token in candidates:
        token_id = token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer:
    """A ``tokenizers`` tokenizer read from tokenizer.json (no transformers needed)."""

    def __init__(self, path: str, include_special_tokens: bool = False) -> None:
        from tokenizers import Tokenizer

        root = _require_file(path, "--tokenizer-model", "HuggingFaceTokenizer")
        json_path = root / "tokenizer.json" if root.is_dir() else root
        if not json_path.is_file():
            raise UserError(f"--tokenizer-model {path}: no tokenizer.json in this directory")
        try:
            self._tokenizer = Tokenizer.from_file(str(json_path))
        except Exception as exc:  # the Rust error says what is wrong with the file
            raise UserError(f"--tokenizer-model {json_path}: not a tokenizer.json ({exc})")
        self.path = str(json_path)
        self.include_special_tokens = include_special_tokens
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

        config = {}
        config_path = json_path.parent / "tokenizer_config.json"
        if config_path.is_file():
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        token_to_id = self._tokenizer.token_to_id

        def named(key: str, candidates: Sequence[str]) -> Optional[int]:
            content = _token_content(config.get(key))
            if content is not None:
                token_id = token_to_id(content)
                if token_id is None:
                    raise UserError(f"{config_path}: {key} {content!r} is not in the vocabulary")
                return token_id
            return _first_present(candidates, token_to_id)

        eod = named("eos_token", _EOS_CANDIDATES)
        if eod is None:
            raise UserError(
                f"--tokenizer-model {path}: cannot tell the end-of-document token; add a "
                f"tokenizer_config.json with \"eos_token\" next to tokenizer.json"
            )
        self.eod = eod
        self.bos = named("bos_token", _BOS_CANDIDATES)
        self.pad = named("pad_token", _PAD_CANDIDATES)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=self.include_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets, which token ids do not depend on.
        encodings = self._tokenizer.encode_batch_fast(
            list(texts), add_special_tokens=self.include_special_tokens
        )
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt, built with ``tokenizers``."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        merges = _require_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        try:
            model = models.BPE.from_file(str(vocab), str(merges))
        except Exception as exc:
            raise UserError(f"--vocab-file {vocab} / --merge-file {merges}: cannot read ({exc})")
        tokenizer = Tokenizer(model)
        # GPT-2's split regex and byte-to-unicode map; no prefix space, as GPT-2 encodes.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        if tokenizer.token_to_id(self.EOD_TOKEN) is None:
            raise UserError(f"--vocab-file {vocab}: has no {self.EOD_TOKEN} entry for the EOD")
        tokenizer.add_special_tokens([AddedToken(self.EOD_TOKEN, special=True, normalized=False)])
        self._tokenizer = tokenizer
        self.path = str(vocab)
        self.include_special_tokens = False
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = tokenizer.token_to_id(self.EOD_TOKEN)
        self.bos = None
        self.pad = None


class SentencePieceTokenizer:
    """A SentencePiece model; ids as megatron-core's (non-legacy) SentencePiece wrapper."""

    def __init__(self, model_file: str, num_threads: int = 1) -> None:
        import sentencepiece

        path = _require_file(model_file, "--tokenizer-model", "SentencePieceTokenizer")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:
            raise UserError(f"--tokenizer-model {path}: not a SentencePiece model ({exc})")
        self.path = str(path)
        self.num_threads = num_threads
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise UserError(f"--tokenizer-model {path}: the model defines no EOS piece for EOD")
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def build_tokenizer(config: TokenizerConfig) -> TextTokenizer:
    """Builds the tokenizer named by ``config.tokenizer_type``; ValueError names the bad flag."""
    kind = config.tokenizer_type
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(config.tokenizer_model, config.include_special_tokens)
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(config.tokenizer_model)
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(config.vocab_file, config.merge_file)
    raise UserError(f"--tokenizer-type {kind!r} is not supported; choose one of {TOKENIZER_TYPES}")


def _content_digest(path: str) -> str:
    """sha256 of what a tokenizer file means: JSON files are hashed in canonical form (sorted
    keys, no whitespace), so a re-saved or copied tokenizer.json keeps its fingerprint."""
    target = Path(path)
    if target.is_dir():
        target = target / "tokenizer.json"
    data = target.read_bytes()
    if target.suffix == ".json":
        try:
            data = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode("utf-8")
        except ValueError:
            pass  # not JSON after all: hash the bytes
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(config: TokenizerConfig, tokenizer: TextTokenizer) -> dict:
    """What identifies the ids a tokenizer produces: its files' content hash, vocabulary size
    and special-token ids. Recorded with every preprocessed dataset and checkpoint, and
    compared at start-up so data is never trained under a tokenizer it was not made with."""
    digest = hashlib.sha256()
    for path in config.files():
        digest.update(_content_digest(path).encode())
    return {
        "tokenizer_type": config.tokenizer_type,
        "files": [os.path.abspath(p) for p in config.files()],
        "sha256": digest.hexdigest(),
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "bos": None if tokenizer.bos is None else int(tokenizer.bos),
        "pad": None if tokenizer.pad is None else int(tokenizer.pad),
    }


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences between two tokenizer fingerprints (empty when they match)."""
    found = []
    for key, label in (("vocab_size", "vocabulary size"), ("eod", "EOD id"),
                       ("bos", "BOS id"), ("pad", "PAD id")):
        if key in recorded and recorded.get(key) != current.get(key):
            found.append(f"{label} {recorded.get(key)} vs {current.get(key)}")
    if recorded.get("sha256") and recorded.get("sha256") != current.get("sha256"):
        found.append(f"tokenizer content sha256 {recorded['sha256'][:12]} vs "
                     f"{current['sha256'][:12]}")
    return found


def tokenizer_drift_warning(run_config: dict, config: TokenizerConfig,
                            tokenizer: TextTokenizer) -> Optional[str]:
    """A warning when ``tokenizer`` is not the one the checkpoint's run recorded (another file,
    or the same path changed since), else None. Checkpoints from before the record: None."""
    recorded = run_config.get("tokenizer_fingerprint")
    if not recorded:
        return None
    differences = fingerprint_differences(recorded, tokenizer_fingerprint(config, tokenizer))
    if not differences:
        return None
    return (f"the tokenizer {', '.join(config.files())} is not the one this checkpoint was "
            f"trained with ({'; '.join(differences)}; trained with "
            f"{', '.join(recorded.get('files') or [])}): its ids may mean other strings")
