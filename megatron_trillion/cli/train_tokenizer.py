"""Train a tokenizer: byte-level BPE with per-language budgets, or SentencePiece.

    python tools/train_tokenizer.py --input 'corpus/*.jsonl.gz' --output-dir tokenizer/ \
        --lang-key lang --budget en=100000 ko=24552 --vocab-size 128256

See megatron_trillion.data.tokenizer_training for how budgets are realised.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.data.preprocess import resolve_inputs
from megatron_trillion.data.tokenizer_training import (
    MODEL_TYPES,
    TokenizerTrainingConfig,
    parse_budgets,
    train_tokenizer,
)
from megatron_trillion.platform.single_process import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_tokenizer.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True,
                        help="JSONL(.gz) file, glob, or comma-separated list")
    parser.add_argument("--output-dir", required=True, help="directory for the tokenizer files")
    parser.add_argument("--model", choices=MODEL_TYPES, default="bpe",
                        help="bpe: byte-level BPE (tokenizers); sentencepiece: SentencePiece BPE")
    parser.add_argument("--vocab-size", type=int,
                        help="total vocabulary before padding (specials and bytes included)")
    parser.add_argument("--budget", nargs="+", default=[], metavar="LANG=TOKENS",
                        help="learned tokens per language, e.g. en=100000 ko=24552")
    parser.add_argument("--json-key", default="text", help="JSON key of the text")
    parser.add_argument("--lang-key", default="lang", help="JSON key of the language")
    parser.add_argument("--heldout-docs", type=int, default=50,
                        help="documents per language held out for the fertility report")
    parser.add_argument("--max-docs-per-lang", type=int,
                        help="cap on training documents per language")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merge")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="the vocabulary is padded to a multiple of 128 x TP")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: train(args))


def train(args) -> None:
    """Trains the tokenizer and prints its vocabulary and fertility report."""
    config = TokenizerTrainingConfig(
        inputs=tuple(resolve_inputs(args.input)),
        output_dir=args.output_dir,
        model_type=args.model,
        vocab_size=args.vocab_size,
        budgets=parse_budgets(args.budget),
        text_key=args.json_key,
        lang_key=args.lang_key or None,
        heldout_docs=args.heldout_docs,
        max_docs_per_lang=args.max_docs_per_lang,
        min_frequency=args.min_frequency,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
    )
    from tqdm import tqdm

    with tqdm(total=1, desc=f"training {args.model}", file=sys.stderr,
              bar_format="{desc}: {elapsed}") as bar:
        result = train_tokenizer(config)
        bar.update(1)
    print(f"vocabulary {result.vocab_size} (learned {result.learned_tokens}, padding "
          f"{result.padding_tokens}; multiple of {config.pad_multiple}) -> {result.output_dir}")
    ids = result.special_token_ids
    print("special token ids: " + ", ".join(f"{k}={v}" for k, v in ids.items()))
    if config.budgets:
        print("merges per language: " + ", ".join(
            f"{k}={v}" for k, v in result.merges_per_language.items()))
    print(f"fertility on held-out text ({config.heldout_docs} docs per language):")
    print(f"  {'lang':<6} {'docs':>6} {'tokens/char':>12} {'tokens/word':>12}")
    for row in result.fertility:
        print(f"  {row.lang:<6} {row.docs:>6} {row.tokens_per_char:>12.4f} "
              f"{row.tokens_per_word:>12.4f}")


if __name__ == "__main__":
    sys.exit(main())
