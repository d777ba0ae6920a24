"""Score a model on the report's generative benchmarks: GSM8K, MATH, HRM8K, IFEval, Ko-IFEval.

From a megatron-trillion checkpoint (the generation engine) or a Hugging Face directory
(transformers' generate), greedy by default, with the report's prompts:

    python tools/eval_generative.py --load checkpoints/ --task gsm8k --data gsm8k_test.jsonl \\
        --output results.json
    python tools/eval_generative.py --model hf_model/ --task ifeval --data ifeval.jsonl --chat

or scoring responses generated elsewhere (vLLM, SGLang, an API), one
``{"id": ..., "response": ...}`` per line (several per id for pass@k):

    python tools/eval_generative.py --task math --data math_test.jsonl --responses out.jsonl
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.evaluation import generative, write_results
from megatron_trillion.platform.single_process import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval_generative.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(generative.TASKS))
    parser.add_argument("--data", required=True,
                        help="the benchmark's items, JSONL in the public dataset's field names")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="megatron-trillion checkpoint directory (--save of a run)")
    source.add_argument("--model", help="Hugging Face model directory")
    source.add_argument("--responses", help="responses made elsewhere, JSONL: "
                        '{"id": ..., "response": "..."} per line')
    parser.add_argument("--output", help="write the results (scores and every sample) as JSON")
    parser.add_argument("--verifier", help="score with this verifier instead of the task's "
                        "(a built-in, module:function, or names joined by +); not for the "
                        "instruction-following tasks, which score per instruction")
    parser.add_argument("--prompt-template", help="the prompt, with {question} standing for "
                        "the item's question / problem / prompt (default: the report's, "
                        "Figure 7, for the math tasks; the prompt as is for IFEval)")
    parser.add_argument("--limit", type=int, help="only the first N items")
    generation = parser.add_argument_group("generation (--load / --model)")
    generation.add_argument("--chat", action="store_true",
                            help="send each prompt as a user turn through the model's chat "
                            "template and stop at the end of the turn")
    generation.add_argument("--num-samples", type=int, default=1,
                            help="responses per item (pass@k); more than 1 needs --temperature")
    generation.add_argument("--max-new-tokens", type=int, default=1024)
    generation.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generation.add_argument("--top-p", type=float, default=1.0)
    generation.add_argument("--top-k", type=int, default=0, help="0: off")
    generation.add_argument("--seed", type=int, default=0)
    generation.add_argument("--no-progress-bar", action="store_true")
    return parser


def _user_errors(args) -> list[str]:
    errors = []
    task = generative.TASKS[args.task]
    if args.verifier and task.instruction_following:
        errors.append(f"--verifier: {args.task} scores each instruction with its own checks")
    if args.limit is not None and args.limit < 1:
        errors.append(f"--limit must be >= 1, got {args.limit}")
    if args.num_samples < 1:
        errors.append(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        errors.append("--num-samples > 1 with greedy decoding gives the same response each "
                      "time: set --temperature")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        errors.append("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if args.max_new_tokens < 1:
        errors.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.responses:
        defaults = build_parser()
        changed = [f"--{action.dest.replace('_', '-')}" for group in defaults._action_groups
                   if group.title.startswith("generation") for action in group._group_actions
                   if getattr(args, action.dest) != action.default]
        if changed:
            errors.append(f"{', '.join(changed)}: generation flags, and --responses generates "
                          f"nothing (several responses per id give pass@k)")
    elif args.temperature == 0 and (args.top_p != 1.0 or args.top_k):
        errors.append("--top-p / --top-k shape sampling: set --temperature > 0 with them")
    if args.prompt_template is not None and "{question}" not in args.prompt_template:
        errors.append("--prompt-template must contain {question}")
    return errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    errors = _user_errors(args)
    if args.load:
        from megatron_trillion.training.checkpointing import CheckpointError

        return run_tool(lambda: evaluate(args), process_group=True,
                        user_errors=(CheckpointError,), argument_errors=errors)
    return run_tool(lambda: evaluate(args), argument_errors=errors)


def evaluate(args) -> None:
    """Loads the items, generates (or reads) the responses, scores, prints and writes."""
    task = generative.TASKS[args.task]
    samples = generative.load_samples(task, args.data, args.prompt_template, args.verifier,
                                      None if args.responses else args.limit)
    if args.responses:
        # all items are read, so a response to one past --limit is told from an unknown id
        samples, skipped = samples[:args.limit], tuple(samples[args.limit or len(samples):])
        responses = generative.load_responses(args.responses, samples, skipped)
        origin = args.responses
    elif args.load:
        responses = generate_megatron(args, [s.prompt for s in samples])
        origin = args.load
    else:
        responses = generate_hf(args, [s.prompt for s in samples])
        origin = args.model
    results = generative.score(task, samples, responses, args.verifier)
    print(generative.format_table(results, f"{task.name} on {args.data} ({origin})"))
    if args.output:
        write_results(results, args.output)


def generate_megatron(args, prompts: list[str]) -> list[list[str]]:
    """Responses from a megatron-trillion checkpoint through the generation engine."""
    from megatron_trillion.inference.engine import SamplingParams, load_engine

    engine, tokenizer, chat, _ = load_engine(args.load)
    if tokenizer is None:
        raise UserError(f"{args.load}: the run used no tokenizer (--mock-data)")
    if args.chat and chat is None:
        raise UserError(f"{args.load}: the tokenizer has no chat template to render (--chat)")
    stop = tuple(chat.end_of_turn_ids()) if args.chat else ()
    ids = [chat.prompt_ids([{"role": "user", "content": p}]) if args.chat
           else tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, num_samples=args.num_samples,
                            seed=args.seed, stop_token_ids=stop)
    results = engine.generate(ids, params, progress=not args.no_progress_bar)
    # a completion's text leaves out the stop token that ended it
    return [[c.text for c in r.completions] for r in results]


def generate_hf(args, prompts: list[str]) -> list[list[str]]:
    """Responses from a Hugging Face directory through transformers' generate."""
    import torch

    from megatron_trillion.evaluation.consistency import load_hf_model

    model, tokenizer = load_hf_model(args.model)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{args.model}: the tokenizer has no chat template (--chat)")
    sampling = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k}  # 0: off (None would mean transformers' 50)
    eos = model.generation_config.eos_token_id
    torch.manual_seed(args.seed)
    responses = []
    for index, prompt in enumerate(prompts):
        if args.chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids.to(model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.max_new_tokens,
                                 num_return_sequences=args.num_samples,
                                 pad_token_id=eos if isinstance(eos, int) else eos[0],
                                 **sampling)
        responses.append([tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)
                          for row in out])
        if not args.no_progress_bar:
            print(f"generated {index + 1}/{len(prompts)}", file=sys.stderr)
    return responses


if __name__ == "__main__":
    sys.exit(main())
