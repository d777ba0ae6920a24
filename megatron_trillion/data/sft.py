"""Supervised fine-tuning data (``pretrain --sft``): chat JSONL -> packed samples with the loss on
assistant turns only.

Input: Megatron-LM's SFT format, one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

``--data-path [WEIGHT] [LANG:]FILE.jsonl ...`` (language inferred from ``..._<lang>.jsonl``
names, else the file name stands for it; validation loss is reported per language).

Each conversation is rendered with the chat template (``data.chat_template``) and tokenized
whole; ``loss_mask[j]`` is 1 exactly when the *label* at position ``j`` (token ``j + 1``) is an
assistant token (content and end-of-turn), so every other token - system, user, role markers,
padding - carries no loss. Conversations are packed whole into ``--seq-length`` samples by best
fit (longest first, then the bins in a seeded order per epoch); each conversation is its own
attention block (``cu_seqlens``), position ids restart per conversation, and the unfillable tail
of a sample is one padding block with no loss, so no conversation sees another and no token of
one conversation lands in another sample. A conversation longer than ``--seq-length`` is cut at
``--seq-length`` tokens and counted in the log (``--sft-overlong-conversations truncate``) or
refused with its file:line (``error``); one whose prompt alone fills the sequence (no assistant
token left) is dropped and counted.

Several files are blended by whole samples with Megatron's weighted-deficit order (weights
default to each file's number of packed samples). Sample ``i`` depends only on the data, the
template, the tokenizer, ``--seq-length`` and ``--seed``, never on the parallel layout, so the
consumed-samples counter alone restores the position on resume.

Tokenized files are cached (``--data-cache-path``): global rank 0 validates and tokenizes every
file, writes the cache atomically and tells the other ranks; a bad line stops every rank with
``file:line: problem`` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron_trillion.data.chat_template import ROLES, ChatFormat, ChatTemplateError
from megatron_trillion.data.data_path import DataSource, as_data_source
from megatron_trillion.data.jsonl import bad_lines_message, parse_jsonl
from megatron_trillion.errors import UserError

OVERLONG_POLICIES = ("truncate", "error")
_CACHE_VERSION = 1
_LANG_IN_NAME = re.compile(r"_([a-z]{2,3}(?:-[a-z]+)?)\.jsonl$")


class SFTDataError(UserError):
    """Bad SFT input; the message names the file and line of every problem found."""


# --------------------------------------------------------------------------------------------
# --data-path for JSONL


def parse_sft_data_path(tokens: Sequence[str], flag: str = "--data-path") -> list[DataSource]:
    """``[W] [LANG:]FILE.jsonl ...`` -> one ``DataSource`` per file."""
    from megatron_trillion.data.data_path import split_data_path

    entries = []
    for weight, path, lang in split_data_path(tokens, flag, "a file", positive_weights=True):
        if lang is None:
            match = _LANG_IN_NAME.search(os.path.basename(path))
            lang = match.group(1) if match else os.path.basename(path).rsplit(".", 1)[0]
        if not path.endswith(".jsonl"):
            raise UserError(f"{flag}: --sft (and --dpo) reads chat JSONL files (*.jsonl), got "
                            f"{path!r}")
        if not os.path.isfile(path):
            raise UserError(f"{flag}: {path} does not exist")
        entries.append(DataSource(path, lang, weight))
    weighted = [source.weight is not None for source in entries]
    if any(weighted) and not all(weighted):
        raise UserError(f"{flag}: give a weight to every file or to none")
    return entries


# --------------------------------------------------------------------------------------------
# reading and tokenizing one file


def _check_messages(record) -> list[dict]:
    """The conversation of one parsed line, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError('no "messages" field (expected {"messages": [{"role": ..., '
                         '"content": ...}, ...]})')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    has_assistant = False
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {k} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {k}: unknown role {role!r} (expected one of "
                             f"{', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {k} ({role}): \"content\" must be a string")
        if role == "assistant":
            if not content.strip():
                raise ValueError(f"message {k}: empty assistant turn")
            has_assistant = True
    if not has_assistant:
        raise ValueError("no assistant turn (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str):
    """``(line number, messages)`` of every conversation; SFTDataError lists every bad line."""
    good, errors = parse_jsonl(path, _check_messages)
    if errors:
        _raise(errors)
    if not good:
        raise SFTDataError(f"{path}: no conversations in the file")
    return good


def _raise(errors: list[str], what: str = "SFT data") -> None:
    raise SFTDataError(bad_lines_message(what, errors))


@dataclass
class TokenizedFile:
    """One JSONL file's conversations, tokenized: conversation ``c`` is
    ``tokens[offsets[c]:offsets[c + 1]]`` with per-token assistant ``flags``, read from
    ``lines[c]``. At most ``seq_length + 1`` tokens are kept (the label of the last position);
    ``lengths[c]`` is the untruncated length."""

    tokens: np.ndarray
    flags: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    lines: np.ndarray
    dropped: int  # conversations whose assistant tokens all lie beyond --seq-length

    @property
    def num_conversations(self) -> int:
        return len(self.lengths)

    def truncated(self, seq_length: int) -> int:
        return int((self.lengths > seq_length).sum())

    def positions(self, seq_length: int) -> np.ndarray:
        """Sample positions each conversation takes (its length, at most ``seq_length``)."""
        return np.minimum(self.lengths, seq_length)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, tokens=self.tokens, flags=self.flags, offsets=self.offsets,
                 lengths=self.lengths, lines=self.lines, dropped=np.int64(self.dropped))
        os.replace(tmp, path)  # atomic: a reader never sees a partial file

    @classmethod
    def load(cls, path: str) -> "TokenizedFile":
        with np.load(path) as data:
            fields = {k: data[k] for k in data.files}
        fields["dropped"] = int(fields["dropped"])
        return cls(**fields)


def tokenize_file(path: str, chat: ChatFormat, seq_length: int,
                  overlong: str = "truncate") -> TokenizedFile:
    """Validate and tokenize every conversation of ``path`` (SFTDataError on bad lines)."""
    if overlong not in OVERLONG_POLICIES:
        raise UserError(f"--sft-overlong-conversations must be one of {OVERLONG_POLICIES}")
    conversations = read_conversations(path)
    errors: list[str] = []
    tokens, flags, offsets, lengths, lines = [], [], [0], [], []
    dropped = 0
    for number, messages in conversations:
        try:
            ids, assistant = chat.encode(messages)
        except ChatTemplateError as exc:
            errors.append(f"{path}:{number}: {exc}")
            continue
        if not any(assistant[1:]):
            errors.append(f"{path}:{number}: no assistant token after the first position")
            continue
        if len(ids) > seq_length:
            if overlong == "error":
                errors.append(f"{path}:{number}: the conversation has {len(ids)} tokens, more "
                              f"than --seq-length {seq_length} (--sft-overlong-conversations "
                              "error)")
                continue
            if not any(assistant[1:seq_length + 1]):
                dropped += 1  # the prompt alone fills the sequence: no loss left to train on
                continue
        kept = min(len(ids), seq_length + 1)
        tokens.append(np.asarray(ids[:kept], dtype=np.int32))
        flags.append(np.asarray(assistant[:kept], dtype=np.uint8))
        offsets.append(offsets[-1] + kept)
        lengths.append(len(ids))
        lines.append(number)
    if errors:
        _raise(errors)
    if not lengths:
        raise SFTDataError(f"{path}: every conversation's prompt is longer than --seq-length "
                           f"{seq_length}; nothing to train on")
    return TokenizedFile(np.concatenate(tokens), np.concatenate(flags),
                         np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                         np.asarray(lines, dtype=np.int64), dropped)


# --------------------------------------------------------------------------------------------
# packing


def pack_conversations(positions: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Best-fit-decreasing packing of conversations into samples of ``capacity`` positions.

    Returns ``(bin_ptr, items)``: sample ``b`` holds conversations ``items[bin_ptr[b]:
    bin_ptr[b + 1]]``. Ties in length are broken by a seeded permutation, so equal-length
    conversations do not always travel together.
    """
    import bisect

    order = np.random.default_rng(seed).permutation(len(positions))
    order = order[np.argsort(-positions[order], kind="stable")]
    remaining: list[tuple[int, int]] = []  # sorted (space left, bin id)
    bins: list[list[int]] = []
    for c in order.tolist():
        size = int(positions[c])
        where = bisect.bisect_left(remaining, (size, -1))
        if where < len(remaining):
            space, b = remaining.pop(where)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(c)
        if space - size > 0:
            bisect.insort(remaining, (space - size, b))
    ptr = np.zeros(len(bins) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(b) for b in bins])
    items = np.asarray([c for b in bins for c in b], dtype=np.int64)
    return ptr, items


def blend_order(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blending: sample ``i`` comes from the source furthest below its weighted
    share so far. Returns (source of each sample, its index within that source)."""
    if len(weights) == 1:
        return np.zeros(num_samples, dtype=np.int32), np.arange(num_samples, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    source = np.empty(num_samples, dtype=np.int32)
    local = np.empty(num_samples, dtype=np.int64)
    counts = np.zeros(len(weights), dtype=np.int64)
    for i in range(num_samples):
        s = int(np.argmax(weights * (i + 1) - counts))
        source[i], local[i] = s, counts[s]
        counts[s] += 1
    return source, local


# --------------------------------------------------------------------------------------------
# the dataset


@dataclass
class SFTSource:
    path: str
    language: str
    weight: Optional[float]
    data: TokenizedFile
    bin_ptr: np.ndarray
    items: np.ndarray

    @property
    def num_bins(self) -> int:
        return len(self.bin_ptr) - 1


class SFTPackedDataset(torch.utils.data.Dataset):
    """Global sample index -> packed sample, the same dict ``XLDAPackedDataset`` returns
    (tokens, labels, loss_mask, position_ids, cu_seqlens_documents/blocks, document_ids,
    index), so ``collate_packed`` and the training loop take it unchanged."""

    def __init__(self, sources: list[SFTSource], seq_length: int, num_samples: int, seed: int,
                 pad_token: int, fingerprint: str) -> None:
        self.sources = sources
        self.seq_length = seq_length
        self.seed = seed
        self.pad_token = pad_token
        self.fingerprint = fingerprint
        weights = [s.weight if s.weight is not None else s.num_bins for s in sources]
        self.blend_source, self.blend_local = blend_order(weights, num_samples)
        self._orders: dict = {}

    def __len__(self) -> int:
        return len(self.blend_source)

    def _bin_order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.pop(next(iter(self._orders)))
            source = self.sources[s]
            rng = np.random.default_rng([self.seed, zlib.crc32(source.path.encode()), epoch])
            self._orders[key] = rng.permutation(source.num_bins)
        return self._orders[key]

    def conversations(self, idx: int) -> tuple[int, np.ndarray]:
        """(source, conversation ids) of sample ``idx``, in their order in the sample."""
        s = int(self.blend_source[idx])
        source = self.sources[s]
        epoch, r = divmod(int(self.blend_local[idx]), source.num_bins)
        b = int(self._bin_order(s, epoch)[r])
        return s, source.items[source.bin_ptr[b]:source.bin_ptr[b + 1]]

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} is outside [0, {len(self)})")
        seq = self.seq_length
        s, conversations = self.conversations(idx)
        data = self.sources[s].data
        tokens = np.full(seq, self.pad_token, dtype=np.int64)
        labels = np.full(seq, self.pad_token, dtype=np.int64)
        loss_mask = np.zeros(seq, dtype=np.float32)
        bounds = [0]
        position = 0
        for c in conversations.tolist():
            stored = data.tokens[data.offsets[c]:data.offsets[c + 1]]
            flags = data.flags[data.offsets[c]:data.offsets[c + 1]]
            used = min(int(data.lengths[c]), seq)
            tokens[position:position + used] = stored[:used]
            # The label of the last position is the next token when the conversation was cut,
            # and nothing (no loss) at its real end: the next conversation is not its future.
            follow = len(stored) - 1
            labels[position:position + follow] = stored[1:]
            loss_mask[position:position + follow] = flags[1:]
            position += used
            bounds.append(position)
        if position < seq:
            bounds.append(seq)  # the padding tail: a block of its own, no loss
        cu = np.asarray(bounds, dtype=np.int32)
        position_ids = np.arange(seq, dtype=np.int64) - np.repeat(cu[:-1], np.diff(cu))
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "cu_seqlens_documents": cu,
            "cu_seqlens_blocks": cu,
            "document_ids": np.stack([np.full(len(conversations), s), conversations],
                                     axis=1).astype(np.int64),
            "index": idx,
        }

    def state_dict(self, consumed_samples: int) -> dict:
        """What the checkpoint stores under "data": the position is the sample count alone."""
        return {"kind": "sft", "fingerprint": self.fingerprint,
                "consumed_samples": int(consumed_samples)}

    def describe(self) -> list[str]:
        """One log line per source: conversations, truncations, drops, packing fill."""
        lines = []
        for s in self.sources:
            positions = s.data.positions(self.seq_length)
            fill = positions.sum() / max(s.num_bins * self.seq_length, 1)
            truncated = s.data.truncated(self.seq_length)
            # the first token of a conversation is never a label
            loss_tokens = int(s.data.flags.sum()) - int(s.data.flags[s.data.offsets[:-1]].sum())
            lines.append(
                f" SFT data {s.language}:{s.path}: {s.data.num_conversations} conversations, "
                f"{int(positions.sum())} tokens, {loss_tokens} with loss; "
                f"{truncated} truncated to --seq-length {self.seq_length}, {s.data.dropped} "
                f"dropped (prompt longer than --seq-length); packed into {s.num_bins} sequences "
                f"({100 * fill:.1f}% filled)")
        return lines


# --------------------------------------------------------------------------------------------
# building (rank 0 tokenizes and caches, every rank packs)


def _file_key(path: str, chat: ChatFormat, seq_length: int, overlong: str) -> str:
    stat = os.stat(path)
    tokenizer_file = getattr(chat.tokenizer, "path", None)
    tokenizer_files = []
    if tokenizer_file and os.path.exists(tokenizer_file):
        tokenizer_stat = os.stat(tokenizer_file)
        tokenizer_files.append((os.path.abspath(tokenizer_file), tokenizer_stat.st_size,
                                tokenizer_stat.st_mtime_ns))
    text = json.dumps({"version": _CACHE_VERSION, "path": os.path.abspath(path),
                       "size": stat.st_size, "mtime": stat.st_mtime_ns,
                       "template": chat.template, "variables": chat.variables,
                       "tokenizer": tokenizer_files, "seq_length": seq_length,
                       "overlong": overlong}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _tokenize_all(files: list[str], chat: ChatFormat, seq_length: int, overlong: str,
                  cache_dir: Optional[str]) -> list[TokenizedFile]:
    out = []
    for path in files:
        cached = None
        if cache_dir:
            cached = os.path.join(cache_dir, f"sft-{_file_key(path, chat, seq_length, overlong)}"
                                  ".npz")
            if os.path.isfile(cached):
                out.append(TokenizedFile.load(cached))
                continue
        data = tokenize_file(path, chat, seq_length, overlong)
        if cached:
            os.makedirs(cache_dir, exist_ok=True)
            data.save(cached)
        out.append(data)
    return out


def rank_zero_first(read: Callable[[], list], what: str) -> list:
    """``read()`` on global rank 0 first (it validates and writes the caches), then on the
    other ranks (which then find the caches); a failure on rank 0 is raised on every rank.
    Collective when torch.distributed is initialised."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    failure = None
    result = None
    if rank == 0 or not distributed:
        try:
            result = read()
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of any failure
            failure = exc
    if distributed:
        # The other ranks wait here for rank 0: tell them how it went.
        message = [None if failure is None else (isinstance(failure, UserError), str(failure))]
        torch.distributed.broadcast_object_list(message, src=0)
        if rank != 0 and message[0] is not None:
            is_user_error, text = message[0]
            if is_user_error:
                raise SFTDataError(text)
            raise RuntimeError(f"global rank 0 failed to tokenize {what}: {text}")
    if failure is not None:
        raise failure
    return result if result is not None else read()


def pack_sources(sources: Sequence[DataSource], tokenized: Sequence[TokenizedFile],
                 seq_length: int, seed: int, kind: Optional[str] = None
                 ) -> tuple[list[SFTSource], str]:
    """Each file's conversations packed into samples (a seed per file), and a fingerprint of the
    source list (``kind`` tells datasets of other objectives over the same files apart)."""
    built = []
    for source, data in zip(sources, tokenized):
        ptr, items = pack_conversations(data.positions(seq_length), seq_length,
                                        seed + zlib.crc32(source.path_prefix.encode()))
        built.append(SFTSource(source.path_prefix, source.language, source.weight, data, ptr,
                               items))
    described = [[s.weight, os.path.abspath(s.path_prefix), s.language] for s in sources]
    fingerprint = hashlib.sha256(json.dumps(
        described if kind is None else [kind, described]).encode()).hexdigest()[:16]
    return built, fingerprint


def pad_id(chat: ChatFormat) -> int:
    """The id padding fills a sample's tail with: the tokenizer's pad, else its end of document."""
    return chat.tokenizer.pad if chat.tokenizer.pad is not None else chat.tokenizer.eod


def build_sft_dataset(sources: Sequence[DataSource], chat: ChatFormat, seq_length: int,
                      num_samples: int, *, seed: int = 1234, overlong: str = "truncate",
                      cache_dir: Optional[str] = None,
                      log: Callable[[str], None] = lambda line: None) -> SFTPackedDataset:
    """The SFT dataset over ``sources`` (``path_prefix``: the JSONL file; or the tuples
    ``(weight or None, path, language)``).

    Collective when torch.distributed is initialised: global rank 0 tokenizes (or reads the
    cache) first; a data error there is raised on every rank.
    """
    sources = [as_data_source(source) for source in sources]
    files = [source.path_prefix for source in sources]
    tokenized = rank_zero_first(
        lambda: _tokenize_all(files, chat, seq_length, overlong, cache_dir), "the SFT data")
    built, fingerprint = pack_sources(sources, tokenized, seq_length, seed)
    dataset = SFTPackedDataset(built, seq_length, int(num_samples), seed, pad_id(chat),
                               fingerprint)
    for line in dataset.describe():
        log(line)
    return dataset
