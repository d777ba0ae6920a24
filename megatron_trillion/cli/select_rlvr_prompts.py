"""Keep the RLVR prompts of the right difficulty for a checkpoint: sample N answers per prompt,
score them with each prompt's verifier, write the prompts whose pass rate lies in a band, and
print a histogram of the pass rates.

    python tools/select_rlvr_prompts.py --load sft/ --data-path rlvr_en.jsonl rlvr_ko.jsonl \\
        --output rlvr_selected.jsonl --samples-per-prompt 8 --min-pass-rate 0.1 \\
        --max-pass-rate 0.9 --system-prompt-file sys.txt

Each kept line is written as read, with its measured ``pass_rate`` added (the GRPO reader
ignores it). The output is written whole, at the end, or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.platform.single_process import run_tool


def _parser() -> argparse.ArgumentParser:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="select_rlvr_prompts.py", description=summary)
    parser.add_argument("--load", required=True, help="checkpoint directory (--save of a run)")
    parser.add_argument("--data-path", nargs="+", required=True,
                        help="RLVR JSONL files, [LANG:]FILE.jsonl ... (as pretrain --grpo)")
    parser.add_argument("--output", required=True, help="JSONL file of the kept prompts")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--min-pass-rate", type=float, default=0.1)
    parser.add_argument("--max-pass-rate", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--chat-template", default=None,
                        help="Jinja chat template file, as pretrain --grpo takes it (default: "
                        "the tokenizer's own, else the built-in template)")
    parser.add_argument("--system-prompt-file", default=None,
                        help="system prompt of every rollout prompt without its own")
    parser.add_argument("--prompts-per-batch", type=int, default=64,
                        help="prompts sampled together (times --samples-per-prompt rows)")
    return parser


def _check(args) -> None:
    if not 0 <= args.min_pass_rate <= args.max_pass_rate <= 1:
        raise UserError("need 0 <= --min-pass-rate <= --max-pass-rate <= 1, got "
                        f"{args.min_pass_rate} and {args.max_pass_rate}")
    if args.samples_per_prompt < 1:
        raise UserError(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    if args.prompts_per_batch < 1:
        raise UserError(f"--prompts-per-batch must be >= 1, got {args.prompts_per_batch}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)

    def select() -> None:
        from megatron_trillion.data.chat_template import ChatFormat, resolve_chat_template
        from megatron_trillion.inference.engine import load_engine
        from megatron_trillion.posttraining.prompt_selection import measure_pass_rates
        from megatron_trillion.posttraining.rollout import RolloutConfig, encode_prompts
        from megatron_trillion.posttraining.grpo_setup import (
            read_grpo_prompts,
            read_system_prompt,
        )
        from megatron_trillion.posttraining.scoring import verifier_score

        _check(args)
        prompts = read_grpo_prompts(args.data_path)
        inputs = {os.path.realpath(p.where.rsplit(":", 1)[0]) for p in prompts}
        if os.path.realpath(args.output) in inputs:
            raise UserError(f"--output {args.output} is one of the --data-path files")
        system_prompt = read_system_prompt(args.system_prompt_file)
        engine, tokenizer, _, run_config = load_engine(args.load)
        if not hasattr(tokenizer, "backend"):
            raise UserError(f"{args.load}: the checkpoint's tokenizer cannot render chat "
                            "prompts (a HuggingFaceTokenizer or GPT2BPETokenizer run is needed)")
        # the template pretrain --grpo renders the rollout prompts with, so the pass rates
        # measured here are those of the training prompts
        template, _ = resolve_chat_template(args.chat_template,
                                            run_config.get("tokenizer_model"))
        chat = ChatFormat(template, tokenizer)
        ids = encode_prompts(prompts, chat, system_prompt, engine.max_sequence_length)
        config = RolloutConfig(samples_per_prompt=args.samples_per_prompt,
                               max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                               stop_token_ids=tuple(chat.end_of_turn_ids()))
        selection = measure_pass_rates(
            engine, prompts, ids, config, verifier_score, args.min_pass_rate,
            args.max_pass_rate, chunk=args.prompts_per_batch,
            progress=lambda done: print(f" scored {done}/{len(prompts)} prompts", flush=True))
        print(f"pass rates of {len(prompts)} prompts ({args.samples_per_prompt} samples each):")
        for line in selection.histogram_lines():
            print(line)
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for i in selection.kept:
                record = dict(prompts[i].record, pass_rate=round(selection.pass_rates[i], 6))
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
        print(f"kept {len(selection.kept)} of {len(prompts)} prompts with pass rate in "
              f"[{args.min_pass_rate}, {args.max_pass_rate}] -> {args.output}")

    from megatron_trillion.training.checkpointing import CheckpointError

    return run_tool(select, process_group=True, user_errors=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
