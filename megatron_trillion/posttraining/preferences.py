"""Preference pairs for DPO: JSONL -> tokenized pairs -> packed samples of whole pairs.

Two line shapes (the common ones)::

    {"chosen": [messages], "rejected": [messages]}       # Tulu 3: two whole conversations
    {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}  # TRL

A pair is (shared prompt turns, chosen response, rejected response); both conversations are
rendered with the SFT chat template and the loss counts the final assistant turn only. Language:
``LANG:FILE`` or a ``_<lang>.jsonl`` name (``--data-path`` grammar of --sft). A bad line (invalid
JSON/UTF-8, no shared prompt, an empty response, chosen identical to rejected, a final turn that
is not the assistant's) stops the run before anything is written, naming every ``file:line``.

Stored per file as an SFT ``TokenizedFile`` with two conversations per pair (2k chosen, 2k+1
rejected), so the SFT cache, packing and blending are reused: pairs are packed whole (their two
blocks' lengths together) by the same best fit, blended by whole samples, and sample ``i`` depends
only on the data, template, tokenizer, ``--seq-length`` and ``--seed``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_trillion.data.chat_template import ChatFormat, ChatTemplateError
from megatron_trillion.data.data_path import DataSource, as_data_source
from megatron_trillion.data.jsonl import parse_jsonl
from megatron_trillion.data.sft import (
    SFTDataError,
    SFTPackedDataset,
    TokenizedFile,
    _raise,
    pack_sources,
    pad_id,
)

_CACHE_VERSION = 1


@dataclass(frozen=True)
class Pair:
    line: int
    prompt: list  # messages
    chosen: str
    rejected: str


def _messages(value, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f'"{what}" must be a string or a list of messages')
    out = []
    for k, message in enumerate(value, start=1):
        if not isinstance(message.get("content"), str) or message.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError(f'"{what}" message {k}: needs a role (system/user/assistant) and '
                             "string content")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def parse_pair(record) -> tuple[list, str, str]:
    """(prompt messages, chosen text, rejected text) of one parsed line, or ValueError."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ValueError('expected {"chosen": ..., "rejected": ...} (with "prompt" or as two '
                         "whole conversations)")
    chosen = _messages(record["chosen"], "chosen")
    rejected = _messages(record["rejected"], "rejected")
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt")
        chosen, rejected = prompt + chosen, prompt + rejected
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise ValueError(f"the {name} conversation does not end with an assistant turn")
        if not conversation[-1]["content"].strip():
            raise ValueError(f"the {name} response is empty")
    prompt = chosen[:-1]
    if not prompt or rejected[:-1] != prompt:
        raise ValueError("chosen and rejected do not share their prompt turns")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise ValueError("chosen and rejected responses are identical")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def read_pairs(path: str) -> list[Pair]:
    """Every pair of ``path``; SFTDataError lists every bad line (up to 20) as file:line."""
    good, errors = parse_jsonl(path, parse_pair)
    if errors:
        _raise(errors, "preference data")
    if not good:
        raise SFTDataError(f"{path}: no preference pairs in the file")
    return [Pair(number, *parsed) for number, parsed in good]


def length_ratio(chosen_tokens: int, rejected_tokens: int) -> float:
    """Longer over shorter response length (the length filter's measure)."""
    return max(chosen_tokens, rejected_tokens) / max(1, min(chosen_tokens, rejected_tokens))


@dataclass
class TokenizedPairs(TokenizedFile):
    """``TokenizedFile`` with conversations 2k (chosen) and 2k+1 (rejected) of pair k;
    ``dropped``: pairs too long for one sample, ``filtered``: pairs the length ratio removed."""

    filtered: int = 0

    def positions(self, seq_length: int) -> np.ndarray:
        """Sample positions each pair takes (both blocks)."""
        return self.lengths[0::2] + self.lengths[1::2]

    def truncated(self, seq_length: int) -> int:
        return 0  # pairs are never cut: a longer one is dropped

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, tokens=self.tokens, flags=self.flags, offsets=self.offsets,
                 lengths=self.lengths, lines=self.lines, dropped=np.int64(self.dropped),
                 filtered=np.int64(self.filtered))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "TokenizedPairs":
        with np.load(path) as data:
            fields = {k: data[k] for k in data.files}
        fields["dropped"], fields["filtered"] = int(fields["dropped"]), int(fields["filtered"])
        return cls(**fields)


def tokenize_pairs(path: str, chat: ChatFormat, seq_length: int,
                   max_length_ratio: Optional[float] = None) -> TokenizedPairs:
    errors: list[str] = []
    tokens, flags, offsets, lengths, lines = [], [], [0], [], []
    dropped = filtered = 0
    for pair in read_pairs(path):
        try:
            encoded = [chat.encode(pair.prompt + [{"role": "assistant", "content": text}],
                                   final_only=True) for text in (pair.chosen, pair.rejected)]
        except ChatTemplateError as exc:
            errors.append(f"{path}:{pair.line}: {exc}")
            continue
        # the first position is never a label: a response token there carries no loss
        counts = [sum(f[1:]) for _, f in encoded]
        if not all(counts):
            errors.append(f"{path}:{pair.line}: a response renders to no token")
            continue
        if sum(len(ids) for ids, _ in encoded) > seq_length:
            dropped += 1  # a pair is never split: both conversations must fit one sample
            continue
        if max_length_ratio is not None and length_ratio(*counts) > max_length_ratio:
            filtered += 1
            continue
        for ids, flag in encoded:
            tokens.append(np.asarray(ids, dtype=np.int32))
            flags.append(np.asarray(flag, dtype=np.uint8))
            offsets.append(offsets[-1] + len(ids))
            lengths.append(len(ids))
            lines.append(pair.line)
    if errors:
        _raise(errors, "preference data")
    if not lengths:
        raise SFTDataError(f"{path}: no pair is left to train on ({dropped} longer than "
                           f"--seq-length {seq_length}, {filtered} removed by "
                           "--dpo-max-length-ratio)")
    return TokenizedPairs(np.concatenate(tokens), np.concatenate(flags),
                          np.asarray(offsets, dtype=np.int64),
                          np.asarray(lengths, dtype=np.int64),
                          np.asarray(lines, dtype=np.int64), dropped, filtered)


class PreferenceDataset(SFTPackedDataset):
    """Global sample index -> packed sample of whole pairs (the SFT sample dict plus
    ``response_ids``, ``pair_keys`` and ``reference``). ``reference`` (set by the reference
    cache): ``[total pairs, 2]`` summed reference log-probs by pair key; zeros until then."""

    reference: Optional[np.ndarray] = None
    reference_identity: Optional[dict] = None

    @property
    def pair_offsets(self) -> np.ndarray:
        """Key of the first pair of each source (pair key = offset + pair index)."""
        counts = [s.data.num_conversations // 2 for s in self.sources]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def num_pairs(self) -> int:
        return int(self.pair_offsets[-1])

    def bins(self) -> list[tuple[int, np.ndarray]]:
        """Every packed sample of one pass over the data: (source, pair ids), each pair once."""
        return [(s, source.items[source.bin_ptr[b]:source.bin_ptr[b + 1]])
                for s, source in enumerate(self.sources) for b in range(source.num_bins)]

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} is outside [0, {len(self)})")
        return self.pack(*self.conversations(idx), index=idx)

    def pack(self, s: int, pairs: np.ndarray, index: int = -1) -> dict:
        """The packed sample of ``pairs`` of source ``s``."""
        seq = self.seq_length
        data = self.sources[s].data
        tokens = np.full(seq, self.pad_token, dtype=np.int64)
        labels = np.full(seq, self.pad_token, dtype=np.int64)
        loss_mask = np.zeros(seq, dtype=np.float32)
        response_ids = np.zeros(seq, dtype=np.int64)
        bounds, position = [0], 0
        for k, pair in enumerate(pairs.tolist()):
            for side in (0, 1):
                c = 2 * pair + side
                stored = data.tokens[data.offsets[c]:data.offsets[c + 1]]
                flags = data.flags[data.offsets[c]:data.offsets[c + 1]]
                n = len(stored)
                tokens[position:position + n] = stored
                labels[position:position + n - 1] = stored[1:]
                loss_mask[position:position + n - 1] = flags[1:]
                response_ids[position:position + n - 1] = np.where(flags[1:] > 0,
                                                                   2 * k + 1 + side, 0)
                position += n
                bounds.append(position)
        if position < seq:
            bounds.append(seq)
        cu = np.asarray(bounds, dtype=np.int32)
        keys = self.pair_offsets[s] + pairs.astype(np.int64)
        reference = (self.reference[keys] if self.reference is not None
                     else np.zeros((len(pairs), 2)))
        return {
            "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": np.arange(seq, dtype=np.int64) - np.repeat(cu[:-1], np.diff(cu)),
            "cu_seqlens_documents": cu, "cu_seqlens_blocks": cu,
            "document_ids": np.stack([np.full(len(pairs), s), pairs], axis=1).astype(np.int64),
            "index": index, "response_ids": response_ids, "pair_keys": keys,
            "reference": reference,
        }

    def state_dict(self, consumed_samples: int) -> dict:
        return {**super().state_dict(consumed_samples), "kind": "dpo",
                "reference": self.reference_identity}

    def describe(self) -> list[str]:
        lines = []
        for s in self.sources:
            pairs = s.data.num_conversations // 2
            fill = s.data.positions(self.seq_length).sum() / max(s.num_bins * self.seq_length, 1)
            lines.append(
                f" DPO data {s.language}:{s.path}: {pairs} pairs; {s.data.dropped} dropped "
                f"(longer than --seq-length {self.seq_length}), {s.data.filtered} removed by "
                f"the length-ratio filter; packed into {s.num_bins} sequences "
                f"({100 * fill:.1f}% filled)")
        return lines


def _file_key(path: str, chat: ChatFormat, seq_length: int, ratio: Optional[float]) -> str:
    from megatron_trillion.data.sft import _file_key as sft_key

    return hashlib.sha256(f"{_CACHE_VERSION}|{sft_key(path, chat, seq_length, 'dpo')}|{ratio}"
                          .encode()).hexdigest()[:32]


def build_preference_dataset(sources: Sequence[DataSource], chat: ChatFormat, seq_length: int,
                             num_samples: int, *, seed: int = 1234,
                             max_length_ratio: Optional[float] = None,
                             cache_dir: Optional[str] = None,
                             log: Callable[[str], None] = lambda line: None
                             ) -> PreferenceDataset:
    """The DPO dataset over ``sources``; collective like ``build_sft_dataset`` (global rank
    0 validates, tokenizes and caches first; a data error is raised on every rank)."""
    from megatron_trillion.data.sft import rank_zero_first

    sources = [as_data_source(source) for source in sources]

    def tokenize(path: str) -> TokenizedPairs:
        key = _file_key(path, chat, seq_length, max_length_ratio)
        cached = os.path.join(cache_dir, f"dpo-{key}.npz") if cache_dir else None
        if cached and os.path.isfile(cached):
            return TokenizedPairs.load(cached)
        data = tokenize_pairs(path, chat, seq_length, max_length_ratio)
        if cached:
            os.makedirs(cache_dir, exist_ok=True)
            data.save(cached)
        return data

    tokenized = rank_zero_first(lambda: [tokenize(s.path_prefix) for s in sources],
                                "the preference data")
    built, fingerprint = pack_sources(sources, tokenized, seq_length, seed, kind="dpo")
    dataset = PreferenceDataset(built, seq_length, int(num_samples), seed, pad_id(chat),
                                fingerprint)
    for line in dataset.describe():
        log(line)
    return dataset
