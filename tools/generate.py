"""Generate text greedily from a megatron-trillion checkpoint (one process, any saved layout).

    python tools/generate.py --load checkpoints/ --prompt "The river" --max-new-tokens 20
    python tools/generate.py --load sft_checkpoints/ --chat --prompt "Repeat after me: Hi."
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (--save of a run)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for several prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user turn through the model's chat template "
                        "(the one its --sft run trained with) and stop at the end of the turn")
    args = parser.parse_args(argv)

    from megatron_trillion.platform.single_process import run_single_process

    def generate() -> int:
        from megatron_trillion.inference.generate import (
            chat_format,
            greedy_generate,
            load_for_inference,
        )

        model, tokenizer, run_config = load_for_inference(args.load)
        if tokenizer is None:
            print("error: the checkpoint's run used no tokenizer (--mock-data)", file=sys.stderr)
            return 2
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
        return 0

    return run_single_process(generate)


if __name__ == "__main__":
    sys.exit(main())
