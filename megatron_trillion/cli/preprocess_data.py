"""JSONL → megatron-core .bin/.idx with Megatron-LM's flags (see megatron_trillion.data.preprocess).

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer/ \
        --append-eod --workers 2 --lang-key lang --quality-key quality --quality-tiers 10
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from megatron_trillion.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    Progress,
    finished_inputs,
    preprocess,
    resolve_inputs,
    work_dir_of,
)
from megatron_trillion.data.tokenizers import TOKENIZER_TYPES, TokenizerConfig
from megatron_trillion.platform.single_process import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize JSONL into megatron-core IndexedDataset files (.bin/.idx).",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input",
                       help="input .jsonl/.jsonl.gz file, glob, or comma-separated list")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="JSON keys to tokenize, one output dataset per key")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence (offline rule-based splitter)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="keep whitespace/newlines between split sentences")
    group.add_argument("--lang", default="english",
                       help="accepted for Megatron-LM compatibility (punkt language); the "
                            "rule-based splitter handles en/ko/ja and most Latin scripts")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model",
                       help="tokenizer.json (or its dir) / SentencePiece model")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json")
    group.add_argument("--merge-file", help="GPT-2 merges.txt")
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                       help="HuggingFaceTokenizer: apply the post-processor (e.g. add BOS)")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix of the outputs, without suffix")
    group = parser.add_argument_group("multilingual and quality splits")
    group.add_argument("--lang-key", help="JSON key with the language: one dataset per language")
    group.add_argument("--quality-key", help="JSON key with a numeric quality score")
    group.add_argument("--quality-tiers", type=int, default=0,
                       help="split each language into N score tiers (tier0 = best)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="count and report malformed/empty lines instead of failing")
    group.add_argument("--allow-empty-inputs", action="store_true",
                       help="accept an input file without documents (0 bytes, blank lines); "
                            "otherwise it is refused as a likely wrong path or failed download")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="worker processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for Megatron-LM compatibility; inputs are always processed "
                            "in order, parallelism comes from --workers")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress updates")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for Megatron-LM compatibility; order is always preserved")
    group.add_argument("--keep-work-dir", action="store_true",
                       help="keep the per-input shards in {prefix}.preprocess-work after success")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("verify mode")
    group.add_argument("--verify", action="store_true",
                       help="check the datasets of --output-prefix instead of writing: counts, "
                            "dtype, index consistency, token ids, exact-duplicate documents; "
                            "with --tokenizer-type/--tokenizer-model also that they were made "
                            "with that tokenizer (as training checks at start-up)")
    group.add_argument("--vocab-size", type=int,
                       help="--verify: vocabulary size to check token ids and dtype against "
                            "(default: from {prefix}_summary.json)")
    return parser


def _progress_bar(disable: bool, log_interval: int):
    from tqdm import tqdm

    bar = tqdm(total=None, unit="B", unit_scale=True, disable=disable, file=sys.stderr,
               desc="preprocess", dynamic_ncols=True)
    state = {"docs_at_last_log": 0}

    def update(p: Progress) -> None:
        if bar.total != p.bytes_total:
            bar.total = p.bytes_total
        if p.docs - state["docs_at_last_log"] >= log_interval:
            state["docs_at_last_log"] = p.docs
            bar.set_postfix(docs=p.docs, tokens=p.tokens,
                            file=f"{p.input_index + 1}/{p.input_count}", refresh=False)
        bar.update(p.bytes_done - bar.n)

    return bar, update


def _tokenizer_config(args) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type=args.tokenizer_type,
                           tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file,
                           include_special_tokens=args.tokenizer_hf_include_special_tokens)


def _verify(args) -> int:
    from megatron_trillion.data.dataset_verify import verify_outputs
    from megatron_trillion.data.tokenizers import build_tokenizer, tokenizer_fingerprint

    fingerprint = None
    if args.tokenizer_type:  # check the data against the tokenizer a run will use
        tokenizer_config = _tokenizer_config(args)
        fingerprint = tokenizer_fingerprint(tokenizer_config, build_tokenizer(tokenizer_config))
    checks = verify_outputs(args.output_prefix, args.vocab_size, fingerprint)
    for check in checks:
        status = "ok" if check.ok else "FAILED"
        print(f"{status:<7}{check.path_prefix}: {check.docs} docs, {check.tokens} tokens, "
              f"dtype {check.dtype or '?'}, {check.duplicate_docs} exact-duplicate docs")
        for later, first in check.duplicate_examples:
            print(f"         document {later} repeats document {first}")
        for problem in check.problems:
            print(f"         {problem}")
    failed = sum(not c.ok for c in checks)
    print(f"verified {len(checks)} dataset(s): " + (f"{failed} failed" if failed else "all ok"))
    return 1 if failed else 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job's time limit, ``kill``), handled as Ctrl-C is: cleanup runs on the way
    out."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _interrupted_message(signum: int, output_prefix: str) -> str:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    finished = finished_inputs(output_prefix)
    if not finished:
        return f"interrupted ({name}): no input was finished and nothing was written"
    return (f"interrupted ({name}): {finished} finished input(s) are kept in "
            f"{work_dir_of(output_prefix)}/; rerunning the same command resumes from them "
            "(remove that directory to start over)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _verify(args) if args.verify else _preprocess(args))


_SAME_NAME_FLAGS = ("output_prefix", "split_sentences", "keep_newlines", "append_eod", "workers",
                    "lang_key", "quality_key", "quality_tiers", "skip_bad_lines", "keep_work_dir",
                    "allow_empty_inputs")


def _preprocess(args) -> int:
    for flag, value in (("--input", args.input), ("--tokenizer-type", args.tokenizer_type)):
        if not value:
            raise PreprocessError(f"{flag} is required (unless --verify)")
    if args.partitions < 1:
        raise PreprocessError(f"--partitions must be >= 1, got {args.partitions}")
    config = PreprocessConfig(
        inputs=tuple(resolve_inputs(args.input)),
        tokenizer=_tokenizer_config(args),
        json_keys=tuple(args.json_keys),
        # The other fields are named after their flags (PreprocessConfig's docstring).
        **{name: getattr(args, name) for name in _SAME_NAME_FLAGS},
    )
    bar, update = _progress_bar(args.no_progress, max(1, args.log_interval))
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        summary = preprocess(config, progress=update)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (_Terminated)
        bar.close()
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        print(_interrupted_message(signum, config.output_prefix), file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    seconds = max(summary.elapsed_s, 1e-9)
    print(f"{summary.docs} documents, {summary.tokens} tokens, "
          f"{summary.text_bytes / 1e6:.1f} MB text in {summary.elapsed_s:.1f} s "
          f"({summary.tokens / seconds:,.0f} tokens/s); dtype {summary.dtype}"
          + (f"; resumed {summary.resumed_inputs} finished input(s)" if summary.resumed_inputs
             else ""))
    for ds in summary.datasets:
        print(f"  {ds.path_prefix}: {ds.docs} docs, {ds.tokens} tokens")
    if summary.bad_lines:
        print(f"skipped {summary.bad_lines} bad line(s):")
        for example in summary.bad_line_examples:
            print(f"  {example}")
    print(f"summary: {config.output_prefix}_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
