"""Generate greedily with transformers from a Hugging Face directory (e.g. an export of
tools/convert_checkpoint.py): the check that the export serves outside megatron.

    python tools/hf_generate.py --model hf_model/ --prompt "The river" --max-new-tokens 16
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from megatron_trillion.cli.generate import prompt_parser
from megatron_trillion.errors import UserError
from megatron_trillion.platform.single_process import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = prompt_parser("hf_generate.py", __doc__, "--model", "Hugging Face model directory",
                           max_new_tokens=16)
    args = parser.parse_args(argv)
    return run_tool(lambda: generate(args))


def generate(args) -> None:
    """Loads the model with transformers and prints each prompt's continuation."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_trillion.evaluation.consistency import load_hf_tokenizer

    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        raise UserError(f"{args.model} has no tokenizer.json (export with --tokenizer-model)")
    tokenizer = load_hf_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"loaded {type(model).__name__} from {args.model} with transformers")
    for prompt in args.prompt:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=model.generation_config.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        print(f"{prompt!r} -> {tokenizer.decode(new)!r}")


if __name__ == "__main__":
    sys.exit(main())
