"""Write the built-in English/Korean/Japanese sample corpus as JSONL (no download).

    python tools/make_sample_corpus.py --output corpus/train.jsonl --docs-per-lang 600 --seed 1
    python tools/make_sample_corpus.py --output sft/chat_en.jsonl --conversations 300 \\
        --languages en                      # chat JSONL for pretrain --sft
    # a parallel multiple-choice set for tools/eval_consistency.py instead of the corpus:
    python tools/make_sample_corpus.py --output parallel.jsonl --parallel-items 200
    # preference pairs for pretrain --dpo (chosen: in the prompt's language; rejected: not)
    python tools/make_sample_corpus.py --output dpo/prefs_ko.jsonl --preferences 300 \
        --languages ko en
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.data.sample_corpus import (
    CONVERSATION_KINDS,
    LANGUAGES,
    write_parallel_items,
    write_sample_conversations,
    write_sample_corpus,
    write_sample_preferences,
)
from megatron_trillion.errors import UserError
from megatron_trillion.platform.single_process import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make_sample_corpus.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL path (.jsonl or .jsonl.gz)")
    parser.add_argument("--docs-per-lang", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--conversations", type=int, default=None,
                        help="write this many chat conversations ({\"messages\": [...]} per "
                        "line, for --sft) instead of documents")
    parser.add_argument("--kind", choices=CONVERSATION_KINDS, default="repeat",
                        help="repeat: the assistant repeats a sentence; ok: random-word "
                        "prompts always answered \"OK\"")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES), choices=LANGUAGES)
    parser.add_argument("--max-paragraphs", type=int, default=3,
                        help="paragraphs per document at most (1: short documents, several "
                        "per training sequence)")
    parser.add_argument("--parallel-items", type=int, default=None, metavar="N",
                        help="write N parallel en/ko/ja multiple-choice items instead of the "
                        "corpus")
    parser.add_argument("--preferences", type=int, default=None, metavar="N",
                        help="write N preference pairs ({\"prompt\", \"chosen\", "
                        "\"rejected\"} per line, for --dpo) instead of the corpus: prompts in "
                        "the first --languages language, chosen answers in it, rejected ones in "
                        "the others")
    args = parser.parse_args(argv)
    return run_tool(lambda: write(args))


def write(args) -> None:
    """Writes the parallel items, the conversations or the corpus the flags ask for."""
    chosen = [name for name in ("conversations", "parallel_items", "preferences")
              if getattr(args, name) is not None]
    if len(chosen) > 1:
        raise UserError(" and ".join(f"--{name.replace('_', '-')}" for name in chosen)
                        + " are exclusive")
    if args.preferences is not None:
        if args.preferences < 1:
            raise UserError("--preferences must be >= 1")
        path = write_sample_preferences(args.output, args.preferences, args.seed,
                                        tuple(args.languages))
    elif args.parallel_items is not None:
        if args.parallel_items < 1:
            raise UserError("--parallel-items must be >= 1")
        path = write_parallel_items(args.output, num_items=args.parallel_items, seed=args.seed,
                                    languages=tuple(args.languages))
    elif args.conversations is not None:
        if args.conversations < 1:
            raise UserError("--conversations must be >= 1")
        path = write_sample_conversations(args.output, args.conversations, args.seed,
                                          tuple(args.languages), args.kind)
    else:
        if args.docs_per_lang < 1:
            raise UserError("--docs-per-lang must be >= 1")
        if args.max_paragraphs < 1:
            raise UserError("--max-paragraphs must be >= 1")
        path = write_sample_corpus(args.output, docs_per_lang=args.docs_per_lang,
                                   seed=args.seed, languages=tuple(args.languages),
                                   max_paragraphs=args.max_paragraphs)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
