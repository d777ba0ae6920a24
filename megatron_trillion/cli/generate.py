"""Generate text greedily from a megatron-trillion checkpoint (one process, any saved layout).

    python tools/generate.py --load checkpoints/ --prompt "The river" --max-new-tokens 20
    python tools/generate.py --load sft_checkpoints/ --chat --prompt "Repeat after me: Hi."
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.platform.single_process import run_tool


def prompt_parser(prog: str, doc: str, model_flag: str, model_help: str,
                  max_new_tokens: int) -> argparse.ArgumentParser:
    """The flags both generation tools share: where the model is, the prompts, the length."""
    summary = " ".join(doc.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    parser.add_argument(model_flag, required=True, help=model_help)
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for several prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = prompt_parser("generate.py", __doc__, "--load",
                           "checkpoint directory (--save of a run)", max_new_tokens=20)
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user turn through the model's chat template "
                        "(the one its --sft run trained with) and stop at the end of the turn")
    args = parser.parse_args(argv)

    def generate() -> None:
        from megatron_trillion.inference.generate import (
            chat_format,
            greedy_generate,
            load_for_inference,
        )

        model, tokenizer, run_config = load_for_inference(args.load)
        if tokenizer is None:
            raise UserError("the checkpoint's run used no tokenizer (--mock-data)")
        chat = chat_format(tokenizer, run_config) if args.chat else None
        for prompt in args.prompt:
            if chat is not None:
                stop = chat.end_of_turn_ids()
                new = greedy_generate(model, chat.prompt_ids([{"role": "user",
                                                               "content": prompt}]),
                                      args.max_new_tokens, stop=stop)
                new = [t for t in new if t not in stop]
            else:
                new = greedy_generate(model, tokenizer.encode(prompt), args.max_new_tokens,
                                      eod=tokenizer.eod)
            print(f"{prompt!r} -> {tokenizer.decode(new)!r}")

    from megatron_trillion.training.checkpointing import CheckpointError

    return run_tool(generate, process_group=True, user_errors=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
