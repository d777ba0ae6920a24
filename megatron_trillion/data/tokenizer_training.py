"""Tokenizer training: byte-level BPE with per-language vocabulary budgets, or SentencePiece.

How per-language budgets are realised (byte-level BPE):

1. The corpus is streamed once per language (documents routed by ``lang_key``); the first
   ``heldout_docs`` documents of each language are held out for the fertility report.
2. For each language a byte-level BPE is trained on that language's text alone with
   ``budget`` merges (``vocab_size = 256 + budget``), so the budget is the number of learned
   tokens that language's text decided on.
3. The per-language merge lists are interleaved deterministically: merge rank 0 of every
   language (in ``--budget`` order), then rank 1, ... A merge that an earlier language already
   contributed is kept once. Every merge's two parts are produced by earlier merges of its own
   language, so the interleaved list is a valid BPE; words of one language tokenize exactly as
   that language's own BPE would tokenize them.
4. The vocabulary is laid out with fixed ids: ``NUM_SPECIAL_SLOTS`` special-token slots first
   (see ``SPECIAL_TOKENS``), then the 256 byte tokens in byte order, then the merged tokens,
   then ``<|reserved_N|>`` padding up to ``vocab_size`` (if given) and to a multiple of
   ``make_vocab_size_divisible_by * tensor_model_parallel_size`` (as Megatron-LM pads), so
   Megatron-LM does not pad it further and ids never move.

Merges learned by several languages (digits, punctuation, shared words) are stored once, so the
learned part can be a little smaller than the sum of budgets; ``training_summary.json`` records
the merges each language contributed. Without budgets one BPE is trained on all text.

Outputs in ``output_dir``: ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json`` (``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``),
``vocab.json`` + ``merges.txt`` (``GPT2BPETokenizer``), ``training_summary.json``; for
SentencePiece ``tokenizer.model`` (``SentencePieceTokenizer``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_trillion.data.jsonl import read_jsonl
from megatron_trillion.data.languages import ALL_LANGUAGES
from megatron_trillion.errors import UserError
from megatron_trillion.models.vocab import padded_vocab_size
from megatron_trillion.platform.output_paths import check_writable_dir

# Fixed ids of the special tokens; EOS is named <|endoftext|> so the GPT-2 files work as-is.
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|begin_of_text|>",
    "eos": "<|endoftext|>",
    "chat_start": "<|im_start|>",
    "chat_end": "<|im_end|>",
}
NUM_SPECIAL_SLOTS = 16  # ids 0..15: the tokens above, then <|reserved_special_N|> for later use
NUM_BYTES = 256
MODEL_TYPES = ("bpe", "sentencepiece")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TokenizerTrainingConfig:
    """Options of one tokenizer training run.

    Attributes:
        inputs: JSONL(.gz) files with one document per line.
        output_dir: where the tokenizer files are written (created if missing).
        model_type: "bpe" (byte-level BPE, tokenizers) or "sentencepiece".
        vocab_size: total vocabulary before padding (special slots and bytes included); needed
            without budgets and to give languages without a budget the rest.
        budgets: language -> learned tokens (merges) for that language ("bpe" only).
        text_key: JSON key of the text.
        lang_key: JSON key of the language (needed with budgets and for fertility by language).
        heldout_docs: documents per language kept out of training for the fertility report.
        max_docs_per_lang: cap on training documents per language (None = all).
        min_frequency: minimum pair count for a BPE merge.
        make_vocab_size_divisible_by: Megatron-LM's --make-vocab-size-divisible-by.
        tensor_model_parallel_size: the vocabulary is also padded to a multiple of TP.
    """

    inputs: tuple[str, ...]
    output_dir: str
    model_type: str = "bpe"
    vocab_size: Optional[int] = None
    budgets: dict = field(default_factory=dict)
    text_key: str = "text"
    lang_key: Optional[str] = "lang"
    heldout_docs: int = 50
    max_docs_per_lang: Optional[int] = None
    min_frequency: int = 2
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise UserError(f"--model {self.model_type!r}: choose one of {MODEL_TYPES}")
        if not self.inputs:
            raise UserError("--input: no input files")
        if self.budgets and self.model_type != "bpe":
            raise UserError("--budget works with --model bpe only (SentencePiece trains one "
                            "vocabulary over all text)")
        if self.budgets and not self.lang_key:
            raise UserError("--budget needs --lang-key to tell the documents' languages apart")
        for lang, budget in self.budgets.items():
            if not isinstance(budget, int) or budget < 1:
                raise UserError(f"--budget {lang}={budget}: must be a positive integer")
        if not self.budgets and not self.vocab_size:
            raise UserError("give --vocab-size (or per-language --budget)")
        if self.vocab_size is not None and self.vocab_size <= NUM_SPECIAL_SLOTS + NUM_BYTES:
            raise UserError(f"--vocab-size {self.vocab_size}: must exceed "
                            f"{NUM_SPECIAL_SLOTS + NUM_BYTES} (special slots + 256 bytes)")
        if self.make_vocab_size_divisible_by < 1 or self.tensor_model_parallel_size < 1:
            raise UserError("--make-vocab-size-divisible-by and --tensor-model-parallel-size "
                            "must be >= 1")
        if self.heldout_docs < 0:
            raise UserError(f"--heldout-docs must be >= 0, got {self.heldout_docs}")

    @property
    def pad_multiple(self) -> int:
        return self.make_vocab_size_divisible_by * self.tensor_model_parallel_size


@dataclass
class Fertility:
    """Tokens per character and per whitespace-separated word on held-out text."""

    lang: str
    docs: int
    chars: int
    words: int
    tokens: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else float("nan")

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else float("nan")


@dataclass
class TrainingResult:
    """What a training run produced (also written as training_summary.json)."""

    output_dir: str
    model_type: str
    vocab_size: int
    special_token_ids: dict
    merges_per_language: dict
    learned_tokens: int
    padding_tokens: int
    fertility: list[Fertility]

    def to_json(self) -> str:
        payload = asdict(self)
        payload["fertility"] = [
            asdict(f) | {"tokens_per_char": round(f.tokens_per_char, 5),
                         "tokens_per_word": round(f.tokens_per_word, 5)}
            for f in self.fertility
        ]
        return json.dumps(payload, indent=2, ensure_ascii=False)


def parse_budgets(items: Sequence[str]) -> dict:
    """``["en=100000", "ko=24552"]`` → ``{"en": 100000, "ko": 24552}`` (order kept)."""
    budgets: dict = {}
    for item in items:
        lang, sep, value = item.partition("=")
        if not sep or not lang or not value.strip().isdigit():
            raise UserError(f"--budget {item!r}: expected LANG=TOKENS, e.g. ko=24552")
        if lang in budgets:
            raise UserError(f"--budget {lang} is given twice")
        budgets[lang] = int(value)
    return budgets


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ----------------------------------------------------------------------------- reading


def _iter_documents(inputs: Sequence[str], text_key: str, lang_key: Optional[str]
                    ) -> Iterator[tuple[str, str]]:
    """Yields (lang, text) per JSONL line; a UserError names file and line of a bad line."""
    for path in inputs:
        for where, doc in read_jsonl(path):
            text = doc.get(text_key) if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{where}: no text under key {text_key!r}")
            lang = doc.get(lang_key) if lang_key else ALL_LANGUAGES
            if not isinstance(lang, str) or not lang:
                raise UserError(f"{where}: no language under key {lang_key!r}")
            yield lang, text


def _split_corpus(config: TokenizerTrainingConfig, langs: Optional[Sequence[str]] = None):
    """Returns (languages in first-seen order, held-out texts per language).

    Training text is streamed again per language by `_training_texts`, so the corpus is never
    held in memory; only the small held-out sample is.
    """
    seen: list[str] = []
    heldout: dict[str, list[str]] = {}
    for lang, text in _iter_documents(config.inputs, config.text_key, config.lang_key):
        if lang not in heldout:
            seen.append(lang)
            heldout[lang] = []
        if len(heldout[lang]) < config.heldout_docs:
            heldout[lang].append(text)
    return seen, heldout


def _training_texts(config: TokenizerTrainingConfig, lang: Optional[str]) -> Iterator[str]:
    """Training documents of one language (None = all), after its held-out documents."""
    seen: dict[str, int] = {}
    for doc_lang, text in _iter_documents(config.inputs, config.text_key, config.lang_key):
        if lang is not None and doc_lang != lang:
            continue
        count = seen.get(doc_lang, 0)
        seen[doc_lang] = count + 1
        if count < config.heldout_docs:
            continue
        if config.max_docs_per_lang is not None and count >= (
            config.heldout_docs + config.max_docs_per_lang
        ):
            continue
        yield text


# ----------------------------------------------------------------------------- byte-level BPE


def _learn_merges(texts: Iterator[str], merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """Trains a byte-level BPE with `merges` merges; returns its merges in rank order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_BYTES + merges,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer)
    raw = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw]


def interleave_merges(per_language: dict) -> tuple[list[tuple[str, str]], dict]:
    """Round-robin by rank over languages (dict order); duplicates kept once.

    Returns (merges, merges contributed per language).
    """
    merged: list[tuple[str, str]] = []
    present: set = set()
    contributed = {lang: 0 for lang in per_language}
    longest = max((len(m) for m in per_language.values()), default=0)
    for rank in range(longest):
        for lang, merges in per_language.items():
            if rank < len(merges) and merges[rank] not in present:
                present.add(merges[rank])
                merged.append(merges[rank])
                contributed[lang] += 1
    return merged, contributed


def _special_slot_tokens() -> list[str]:
    named = list(SPECIAL_TOKENS.values())
    return named + [f"<|reserved_special_{i}|>" for i in range(len(named), NUM_SPECIAL_SLOTS)]


def _padded_size(natural: int, config: TokenizerTrainingConfig) -> int:
    """Megatron-LM's padding of the larger of the learned and the requested size."""
    return padded_vocab_size(max(natural, config.vocab_size or 0),
                             config.make_vocab_size_divisible_by, config.tensor_model_parallel_size)


def build_byte_level_bpe(merges: list[tuple[str, str]], vocab_size: int):
    """The final tokenizers.Tokenizer with the fixed id layout (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    specials = _special_slot_tokens()
    for token in specials:
        vocab[token] = len(vocab)
    byte_chars = bytes_to_unicode()
    for b in range(NUM_BYTES):
        vocab[byte_chars[b]] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    reserved = []
    while len(vocab) < vocab_size:
        token = f"<|reserved_{len(vocab)}|>"
        vocab[token] = len(vocab)
        reserved.append(token)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials + reserved]
    )
    return tokenizer, len(reserved)


def _write_hf_files(tokenizer, merges, out: Path, model_max_length: int = 1 << 20) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"],
                   "pad_token": SPECIAL_TOKENS["pad"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
              **special_map}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # GPT-2 style files for --tokenizer-type GPT2BPETokenizer
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for left, right in merges:
            f.write(f"{left} {right}\n")


def measure_fertility(encode_batch, heldout: dict) -> list[Fertility]:
    """Fertility per language with `encode_batch(texts) -> list[list[int]]`."""
    rows = []
    for lang, texts in heldout.items():
        if not texts:
            continue
        ids = encode_batch(texts)
        rows.append(Fertility(
            lang=lang, docs=len(texts), chars=sum(len(t) for t in texts),
            words=sum(len(t.split()) for t in texts), tokens=sum(len(x) for x in ids),
        ))
    return rows


def _budgets_for(config: TokenizerTrainingConfig, langs: list[str]) -> dict:
    """Budget per language present in the corpus; languages without one share the rest."""
    unknown = [lang for lang in config.budgets if lang not in langs]
    if unknown:
        raise UserError(f"--budget names languages {unknown} that have no documents under "
                        f"--lang-key {config.lang_key!r} (found {langs})")
    budgets = dict(config.budgets)
    rest = [lang for lang in langs if lang not in budgets]
    if rest:
        if not config.vocab_size:
            raise UserError(f"languages {rest} have no --budget; give them one or give "
                            f"--vocab-size so they share what the budgets leave")
        left = config.vocab_size - NUM_SPECIAL_SLOTS - NUM_BYTES - sum(budgets.values())
        if left < len(rest):
            raise UserError(f"--vocab-size {config.vocab_size} leaves {left} tokens for {rest} "
                            f"after the budgets; raise it or lower the budgets")
        for i, lang in enumerate(rest):
            budgets[lang] = left // len(rest) + (1 if i < left % len(rest) else 0)
    learned = sum(budgets.values())
    if config.vocab_size and NUM_SPECIAL_SLOTS + NUM_BYTES + learned > config.vocab_size:
        raise UserError(f"budgets sum to {learned} learned tokens, more than --vocab-size "
                        f"{config.vocab_size} minus {NUM_SPECIAL_SLOTS + NUM_BYTES} fixed ones")
    return budgets


def _train_bpe(config: TokenizerTrainingConfig, out: Path) -> TrainingResult:
    langs, heldout = _split_corpus(config)
    if not langs:
        raise UserError(f"--input {list(config.inputs)}: no documents")
    if config.budgets:
        budgets = _budgets_for(config, langs)
        per_language = {
            lang: _learn_merges(_training_texts(config, lang), budget, config.min_frequency)
            for lang, budget in budgets.items()
        }
        merges, contributed = interleave_merges(per_language)
    else:
        total = config.vocab_size - NUM_SPECIAL_SLOTS - NUM_BYTES
        merges = _learn_merges(_training_texts(config, None), total, config.min_frequency)
        contributed = {ALL_LANGUAGES: len(merges)}
    natural = NUM_SPECIAL_SLOTS + NUM_BYTES + len({a + b for a, b in merges})
    tokenizer, padding = build_byte_level_bpe(merges, _padded_size(natural, config))
    _write_hf_files(tokenizer, merges, out)

    def encode_batch(texts):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return TrainingResult(
        output_dir=str(out), model_type="bpe",
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        special_token_ids={name: tokenizer.token_to_id(token)
                           for name, token in SPECIAL_TOKENS.items()},
        merges_per_language=contributed, learned_tokens=len(merges), padding_tokens=padding,
        fertility=measure_fertility(encode_batch, heldout),
    )


# ----------------------------------------------------------------------------- SentencePiece


def _train_sentencepiece(config: TokenizerTrainingConfig, out: Path) -> TrainingResult:
    import sentencepiece as spm

    langs, heldout = _split_corpus(config)
    if not langs:
        raise UserError(f"--input {list(config.inputs)}: no documents")
    vocab_size = _padded_size(config.vocab_size, config)
    chat = [SPECIAL_TOKENS["chat_start"], SPECIAL_TOKENS["chat_end"]]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_texts(config, None),
            model_prefix=str(out / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            pad_piece=SPECIAL_TOKENS["pad"], bos_piece=SPECIAL_TOKENS["bos"],
            eos_piece=SPECIAL_TOKENS["eos"], unk_piece="<unk>",
            user_defined_symbols=chat,
            max_sentence_length=1 << 20,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise UserError(f"SentencePiece training failed for --vocab-size {vocab_size}: {exc} "
                        f"(a small corpus supports only a small vocabulary)") from exc
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = {name: processor.piece_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
    return TrainingResult(
        output_dir=str(out), model_type="sentencepiece", vocab_size=processor.get_piece_size(),
        special_token_ids=ids, merges_per_language={ALL_LANGUAGES: processor.get_piece_size()},
        learned_tokens=processor.get_piece_size(), padding_tokens=0,
        fertility=measure_fertility(lambda t: processor.encode(t, out_type=int), heldout),
    )


def train_tokenizer(config: TokenizerTrainingConfig) -> TrainingResult:
    """Trains and writes the tokenizer; returns what was produced (see the module docstring)."""
    for path in config.inputs:
        if not os.path.isfile(path):
            raise UserError(f"--input {path}: no such file")
    check_writable_dir(config.output_dir, "--output-dir")
    out = Path(config.output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if config.model_type == "bpe":
            result = _train_bpe(config, out)
        else:
            result = _train_sentencepiece(config, out)
        (out / "training_summary.json").write_text(result.to_json(), encoding="utf-8")
    except BaseException:
        if created:  # a refused input (or a stop) leaves no directory behind it
            shutil.rmtree(out, ignore_errors=True)
        raise
    return result
