"""Preference pairs for pretrain --dpo from sampled responses and their scores.

    python tools/make_preference_pairs.py --responses responses.jsonl --scores scores.jsonl \\
        --output dpo/prefs_ko.jsonl --max-length-ratio 2
    python tools/make_preference_pairs.py --responses responses.jsonl --verifier gsm8k \\
        --ground-truth-field answer --output dpo/prefs_math.jsonl
    # against given off-policy responses ({"id", "response", "score"} per line):
    python tools/make_preference_pairs.py --responses responses.jsonl --scores scores.jsonl \\
        --off-policy offpolicy.jsonl --tokenizer-model tok/ --max-length-ratio 2 --output p.jsonl
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.platform.single_process import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make_preference_pairs.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--responses", required=True,
                        help="the generation engine's responses.jsonl (one prompt per line)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help='{"id", "response_index", "score"} per line (an '
                        "external reward model's scores)")
    source.add_argument("--verifier", help="score with this verifier of megatron_trillion."
                        "rewards against each line's ground truth")
    parser.add_argument("--ground-truth-field", default="ground_truth",
                        help="field of a responses line holding the verifier's ground truth")
    parser.add_argument("--off-policy", help='{"id", "response", "score"} per line: pair the '
                        "best sampled response with this one instead of with the worst")
    parser.add_argument("--max-length-ratio", type=float, default=None,
                        help="leave out pairs whose longer response has more than this many "
                        "times the tokens of the shorter (as --dpo-max-length-ratio)")
    parser.add_argument("--tokenizer-model", help="counts the tokens of off-policy responses "
                        "for --max-length-ratio")
    parser.add_argument("--output", required=True, help="preference JSONL for --dpo")
    args = parser.parse_args(argv)
    return run_tool(lambda: run(args))


def run(args) -> None:
    from megatron_trillion.posttraining import onpolicy

    if args.max_length_ratio is not None and args.max_length_ratio < 1:
        raise UserError(f"--max-length-ratio is longer over shorter, so >= 1; got "
                        f"{args.max_length_ratio}")
    prompts = onpolicy.read_responses(args.responses)
    scores = (onpolicy.read_scores(args.scores, prompts) if args.scores
              else onpolicy.verifier_scores(args.verifier, prompts, args.ground_truth_field))
    off_policy = onpolicy.read_off_policy(args.off_policy, prompts) if args.off_policy else None
    count_tokens = None
    if args.tokenizer_model:
        from megatron_trillion.data.tokenizers import HuggingFaceTokenizer

        tokenizer = HuggingFaceTokenizer(args.tokenizer_model)
        count_tokens = lambda text: len(tokenizer.encode(text))  # noqa: E731
    pairs, report = onpolicy.make_pairs(prompts, scores, off_policy=off_policy,
                                        max_length_ratio=args.max_length_ratio,
                                        count_tokens=count_tokens)
    if not pairs:
        raise UserError(f"no preference pair to write: {report.describe()}")
    onpolicy.write_pairs(args.output, pairs)
    print(f"wrote {args.output}: {report.describe()}")


if __name__ == "__main__":
    sys.exit(main())
