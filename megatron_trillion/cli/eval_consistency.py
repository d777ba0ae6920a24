"""Cross-lingual consistency (Trillion-7B report, eq. 3-4) and per-language accuracy.

From a Hugging Face model on parallel multiple-choice items (one JSON object per line:
``{"id": ..., "en": {"prompt": str, "choices": [str, ...], "answer": int}, "ko": {...}}``):

    python tools/eval_consistency.py --model hf_model/ --data parallel.jsonl \\
        --source-language en --target-language ko --output results.json

or from existing lm-evaluation-harness runs (``lm_eval ... --log_samples``) of the same task in
two languages:

    python tools/eval_consistency.py --source-language en --target-language ko \\
        --lm-eval-samples en=out/samples_global_mmlu_en_*.jsonl \\
                          ko=out/samples_global_mmlu_ko_*.jsonl
"""

from __future__ import annotations

import argparse
import glob
import sys
from typing import Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.evaluation import consistency, write_results
from megatron_trillion.platform.single_process import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval_consistency.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--source-language", required=True,
                        help="the language knowledge should transfer from (e.g. en)")
    parser.add_argument("--target-language", required=True, help="... and to (e.g. ko)")
    parser.add_argument("--output", help="write the metrics as JSON here")
    model = parser.add_argument_group("scoring a Hugging Face model")
    model.add_argument("--model", help="Hugging Face model directory (e.g. an export of "
                       "tools/convert_checkpoint.py)")
    model.add_argument("--data", help="parallel items, JSONL")
    model.add_argument("--batch-size", type=int, default=16, help="choices per forward pass")
    model.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="weights dtype (auto: as saved in config.json)")
    model.add_argument("--no-progress-bar", action="store_true")
    logs = parser.add_argument_group("reading lm-evaluation-harness --log_samples output")
    logs.add_argument("--lm-eval-samples", nargs="+", metavar="LANG=FILE",
                      help="samples_<task>_<date>.jsonl files, each tagged with its language")
    logs.add_argument("--lm-eval-metric", default="acc",
                      help="per-sample 0/1 metric that says a prediction is right")
    logs.add_argument("--pair-key", default="doc_id",
                      help="doc_id (pairs the i-th file of each language) or a field of the "
                      "logged doc naming the same question in both languages (Global-MMLU: "
                      "sample_id)")
    return parser


def _user_errors(args) -> list[str]:
    errors = []
    if args.source_language == args.target_language:
        errors.append("--source-language and --target-language must differ")
    if args.lm_eval_samples and (args.model or args.data):
        errors.append("give either --model and --data or --lm-eval-samples, not both")
    elif not args.lm_eval_samples and not (args.model and args.data):
        errors.append("give --model and --data (score a model) or --lm-eval-samples")
    if args.batch_size < 1:
        errors.append(f"--batch-size must be >= 1, got {args.batch_size}")
    return errors


def _expand(item: str, path: str) -> str:
    """The one file a LANG=GLOB names: the shell leaves a glob after ``LANG=`` unexpanded (it is
    one word that does not start with the pattern), so the tool expands it."""
    if not glob.has_magic(path):
        return path
    matches = sorted(glob.glob(path))
    if not matches:
        raise UserError(f"--lm-eval-samples {item!r}: no file matches")
    if len(matches) > 1:
        raise UserError(f"--lm-eval-samples {item!r} matches {len(matches)} files, expected one: "
                        f"{', '.join(matches)}")
    return matches[0]


def _samples_by_language(items: Sequence[str], languages: Sequence[str]) -> dict:
    paths: dict[str, list[str]] = {language: [] for language in languages}
    for item in items:
        language, sep, path = item.partition("=")
        if not sep or not path:
            raise UserError(f"--lm-eval-samples expects LANG=FILE, got {item!r}")
        if language not in paths:
            raise UserError(f"--lm-eval-samples {item!r}: {language!r} is neither "
                             f"--source-language nor --target-language")
        paths[language].append(_expand(item, path))
    for language, files in paths.items():
        if not files:
            raise UserError(f"--lm-eval-samples has no file for {language!r}")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: evaluate(args), argument_errors=_user_errors(args))


def evaluate(args) -> None:
    """Scores the model (or reads the lm-eval samples) and prints / writes the metrics."""
    languages = (args.source_language, args.target_language)
    if args.lm_eval_samples:
        paths = _samples_by_language(args.lm_eval_samples, languages)
        source, target = consistency.pair_lm_eval_samples(
            paths[languages[0]], paths[languages[1]], args.lm_eval_metric, args.pair_key)
        origin = "lm-eval samples"
    else:
        items = consistency.load_parallel_items(args.data, languages)
        model, tokenizer = consistency.load_hf_model(args.model, args.device, args.dtype)
        origin = f"{args.model} on {args.data}"
        print(f"scoring {len(items)} items x 2 languages with {type(model).__name__} on "
              f"{model.device}", file=sys.stderr)
        correct = consistency.predict(model, tokenizer, items, languages,
                                      batch_size=args.batch_size,
                                      progress=not args.no_progress_bar)
        source, target = correct[languages[0]], correct[languages[1]]
    metrics = consistency.consistency_metrics(source, target, *languages)
    print(consistency.format_table(
        metrics, f"cross-lingual consistency {languages[0]} -> {languages[1]} ({origin})"))
    if args.output:
        write_results(metrics, args.output)


if __name__ == "__main__":
    sys.exit(main())
