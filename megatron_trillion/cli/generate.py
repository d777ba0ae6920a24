"""Generate from a megatron-trillion checkpoint (one process, any saved layout): greedy or
sampled, several responses per prompt, with each token's log-probability.

    python tools/generate.py --load checkpoints/ --prompt "The river" --max-new-tokens 20
    python tools/generate.py --load sft_checkpoints/ --chat --prompt "Repeat after me: Hi."
    python tools/generate.py --load sft_checkpoints/ --prompts-file prompts.jsonl \\
        --num-samples 4 --temperature 1.0 --top-p 0.95 --seed 1 --output responses.jsonl

prompts.jsonl: one {"prompt": str} or {"messages": [...]} per line (messages go through the
chat template; other fields are copied to the output). responses.jsonl: one line per prompt,
{"prompt", "prompt_token_ids", "responses": [{"text", "token_ids", "logprobs",
"finish_reason"}]} (logprobs: one per generated token, of the plain model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.platform.single_process import run_tool


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def prompt_parser(prog: str, doc: str, model_flag: str, model_help: str,
                  max_new_tokens: int, prompt_required: bool = True) -> argparse.ArgumentParser:
    """The flags both generation tools share: where the model is, the prompts, the length."""
    summary = " ".join(doc.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    parser.add_argument(model_flag, required=True, help=model_help)
    parser.add_argument("--prompt", action="append", required=prompt_required, default=[],
                        help="prompt text (repeat for several prompts)")
    parser.add_argument("--max-new-tokens", type=_at_least(1), default=max_new_tokens,
                        help="most tokens generated after each prompt (at most up to the "
                        "model's --seq-length)")
    return parser


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = prompt_parser("generate.py", __doc__, "--load",
                           "checkpoint directory (--save of a run)", max_new_tokens=20,
                           prompt_required=False)
    parser.add_argument("--prompts-file", help='JSONL of {"prompt": str} or {"messages": [...]}')
    parser.add_argument("--output", help="write responses.jsonl here (else print the texts)")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user turn through the model's chat template "
                        "(the one its --sft run trained with) and stop at the end of the turn")
    parser.add_argument("--num-samples", type=_at_least(1), default=1,
                        help="responses per prompt")
    parser.add_argument("--temperature", type=_non_negative, default=0.0,
                        help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--top-k", type=_at_least(0), default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0,
                        help="same seed, same samples (at any tensor-parallel size)")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string (repeatable): cut from the text, the response ends")
    parser.add_argument("--stop-token", action="append", default=[],
                        help="stop token, a token of the vocabulary such as <|im_end|> "
                        "(repeatable; the tokenizer's EOS always stops)")
    parser.add_argument("--truncate-prompts", action="store_true",
                        help="left-truncate prompts that leave no room in the model's "
                        "--seq-length (default: refuse them)")
    parser.add_argument("--max-batch-size", type=_at_least(1), default=64,
                        help="sequences (prompts x samples) generated together")
    parser.add_argument("--no-progress-bar", action="store_true")
    return parser


def read_prompts(args) -> list[dict]:
    """[{"prompt": str} | {"messages": [...]}, other fields...] from --prompt and
    --prompts-file, checked (an empty prompt is an error naming it)."""
    from megatron_trillion.data.jsonl import read_jsonl

    records = []
    for number, text in enumerate(args.prompt, 1):
        if not text.strip():
            raise UserError(f"--prompt number {number} is empty")
        records.append({"prompt": text})
    if args.prompts_file:
        for where, record in read_jsonl(args.prompts_file):
            if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
                raise UserError(f'{where}: expected {{"prompt": str}} or '
                                '{"messages": [...]} (one of the two)')
            if "prompt" in record and (not isinstance(record["prompt"], str)
                                       or not record["prompt"].strip()):
                raise UserError(f"{where}: the prompt is empty or not a string")
            if "messages" in record and (not isinstance(record["messages"], list)
                                         or not record["messages"]):
                raise UserError(f"{where}: messages must be a non-empty list")
            records.append(record)
    if not records:
        raise UserError("no prompts: give --prompt or --prompts-file")
    return records


def stop_token_id(tokenizer, text: str) -> int:
    """The id of ``text`` as one token of the vocabulary (a ``UserError`` if it is not)."""
    backend = getattr(tokenizer, "backend", None)
    token_id = backend.token_to_id(text) if backend is not None else None
    if token_id is None:
        ids = tokenizer.encode(text)
        token_id = ids[0] if len(ids) == 1 and tokenizer.decode(ids) == text else None
    if token_id is None:
        raise UserError(f"--stop-token {text!r} is not a token of the vocabulary "
                        "(--stop takes stop strings)")
    return token_id


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def generate() -> None:
        from megatron_trillion.inference.engine import SamplingParams, load_engine

        records = read_prompts(args)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k,
                                num_samples=args.num_samples, seed=args.seed,
                                stop_strings=tuple(args.stop))
        engine, tokenizer, chat, _ = load_engine(args.load, max_batch_size=args.max_batch_size)
        if tokenizer is None:
            raise UserError("the checkpoint's run used no tokenizer (--mock-data)")
        stop_ids = [stop_token_id(tokenizer, text) for text in args.stop_token]
        if (args.chat or any("messages" in r for r in records)) and chat is None:
            raise UserError(f"--chat needs a tokenizer.json tokenizer, not "
                            f"{type(tokenizer).__name__}")
        if args.chat or any("messages" in r for r in records):
            stop_ids += chat.end_of_turn_ids()
        limit = engine.max_sequence_length
        max_new = args.max_new_tokens
        if max_new > limit - 1:
            max_new = limit - 1
            print(f"note: --max-new-tokens {args.max_new_tokens} is beyond the model's "
                  f"{limit}-token limit (its --seq-length): each response stops there "
                  f"(at most {max_new} tokens)", file=sys.stderr)
        params = dataclasses.replace(params, max_new_tokens=max_new,
                                     stop_token_ids=tuple(stop_ids))

        prompts, truncated = [], 0
        for number, record in enumerate(records, 1):
            if "messages" in record:
                ids = chat.prompt_ids(record["messages"])
            elif args.chat:
                ids = chat.prompt_ids([{"role": "user", "content": record["prompt"]}])
            else:
                ids = tokenizer.encode(record["prompt"])
            if not ids:
                raise UserError(f"prompt {number} encodes to no tokens")
            if len(ids) >= limit:
                if not args.truncate_prompts:
                    raise UserError(
                        f"prompt {number} has {len(ids)} tokens: no room within the model's "
                        f"{limit}-token limit (--truncate-prompts keeps its end)")
                ids = ids[len(ids) - (limit - max_new):]
                truncated += 1
            prompts.append(ids)
        if truncated:
            print(f"note: left-truncated {truncated} of {len(prompts)} prompts to "
                  f"{limit - max_new} tokens", file=sys.stderr)

        results = engine.generate(prompts, params, progress=not args.no_progress_bar)
        if args.output is None:
            for record, result in zip(records, results):
                shown = record.get("prompt", record.get("messages"))
                for completion in result.completions:
                    print(f"{shown!r} -> {completion.text!r}")
            return
        _write_responses(args.output, records, results, tokenizer)
        print(f"wrote {len(results)} prompts x {args.num_samples} responses to {args.output}")

    from megatron_trillion.training.checkpointing import CheckpointError

    return run_tool(generate, process_group=True, user_errors=(CheckpointError,))


def _write_responses(path: str, records: list[dict], results, tokenizer) -> None:
    """responses.jsonl, written whole or not at all."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record, result in zip(records, results):
                line = dict(record)
                line["prompt"] = record.get("prompt", tokenizer.decode(result.prompt_token_ids))
                line["prompt_token_ids"] = result.prompt_token_ids
                line["responses"] = [
                    {"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                     "finish_reason": c.finish_reason} for c in result.completions]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"--output {path}: {exc.strerror or exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
