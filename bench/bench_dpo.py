"""What DPO costs, side by side in one run: the reference cache against one forward pass over the
same tokens, and a DPO step against an SFT step on the same tokens.

    python bench/bench_dpo.py [--preset tiny-tri-7b] [--seq-length 512] [--pairs 100] [--steps 6]

Writes toy preference pairs (tools/make_sample_corpus.py --preferences) and, from the same pairs,
SFT conversations (every chosen and every rejected conversation), so both runs train on the same
tokens. In one process (one rank):
  cache     building the reference log-probabilities (posttraining.reference) over every pair
  forward   a forward-only pass of the language-model objective over the same packed samples
  dpo step  median time of a --dpo training step (steps 2.. of the run)
  sft step  median time of an --sft step at the same --seq-length and batch
and prints milliseconds and the ratios cache/forward and dpo/sft (the issue's targets: <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def _write_data(root: str, pairs: int) -> tuple[str, str, str]:
    from megatron_trillion.data.sample_corpus import write_sample_corpus, write_sample_preferences
    from megatron_trillion.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    corpus = write_sample_corpus(os.path.join(root, "corpus.jsonl"), docs_per_lang=60)
    tokenizer = os.path.join(root, "bpe")
    train_tokenizer(TokenizerTrainingConfig(inputs=(str(corpus),), output_dir=tokenizer,
                                            vocab_size=600, heldout_docs=0))
    prefs = str(write_sample_preferences(os.path.join(root, "prefs_en.jsonl"), pairs,
                                         languages=("en", "ko")))
    sft = os.path.join(root, "sft_en.jsonl")
    with open(prefs, encoding="utf-8") as f, open(sft, "w", encoding="utf-8") as out:
        for line in f:
            pair = json.loads(line)
            for response in (pair["chosen"], pair["rejected"]):
                out.write(json.dumps({"messages": [
                    {"role": "user", "content": pair["prompt"]},
                    {"role": "assistant", "content": response}]}, ensure_ascii=False) + "\n")
    return tokenizer, prefs, sft


def _run(kind: str, data: str, tokenizer: str, args, cache: str) -> tuple[list, object]:
    from megatron.core import parallel_state as ps

    from megatron_trillion.pretrain import pretrain
    from megatron_trillion.training.arguments import parse_args

    times: list = []
    last = [time.perf_counter()]

    def on_step(state, result):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    argv = ["--preset", args.preset, f"--{kind}", "--tokenizer-model", tokenizer,
            "--data-path", data, "--data-cache-path", cache,
            "--seq-length", str(args.seq_length), "--micro-batch-size", "1",
            "--global-batch-size", str(args.global_batch), "--train-iters", str(args.steps),
            "--lr", "1e-5", "--no-progress-bar", "--seed", "1"]
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    last[0] = time.perf_counter()
    _, run = pretrain(parse_args(argv), log=lambda line: None, on_step=on_step)
    return times[1:], run  # the first step warms up


def _forward_pass_ms(run) -> tuple[float, float]:
    """(reference cache build, LM forward-only pass over the same samples) in ms."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_trillion.posttraining.dpo import collate_pairs
    from megatron_trillion.posttraining.reference import _pass_batches, compute_reference_logps
    from megatron_trillion.training.objective import lm_forward_step

    dataset = run.train_batches.dataset
    start = time.perf_counter()
    compute_reference_logps(run.model, dataset, 1, 1, run.tokens_per_microbatch, collate_pairs)
    cache = time.perf_counter() - start
    batches = _pass_batches(dataset, 1, 0, 1, collate_pairs)
    start = time.perf_counter()
    import torch

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=lm_forward_step, data_iterator=iter(batches), model=run.model,
            num_microbatches=len(batches), seq_length=run.tokens_per_microbatch,
            micro_batch_size=1, forward_only=True)
    forward = time.perf_counter() - start
    return 1000 * cache, 1000 * forward


def _tokens_per_sequence(dataset) -> float:
    """Mean real (non-padding) tokens of a packed sequence over the dataset's sources."""
    tokens = sum(int(s.data.positions(dataset.seq_length).sum()) for s in dataset.sources)
    return tokens / max(1, sum(s.num_bins for s in dataset.sources))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-tri-7b")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=4)
    args = parser.parse_args()

    import socket

    from megatron_trillion.platform.warnings import quiet_known_warnings

    quiet_known_warnings()
    with socket.socket() as probe:  # a free port for the one-rank process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    with tempfile.TemporaryDirectory() as root:
        tokenizer, prefs, sft = _write_data(root, args.pairs)
        dpo_times, run = _run("dpo", prefs, tokenizer, args, os.path.join(root, "cache"))
        cache_ms, forward_ms = _forward_pass_ms(run)
        dpo_fill = _tokens_per_sequence(run.train_batches.dataset)
        sft_times, sft_run = _run("sft", sft, tokenizer, args, os.path.join(root, "cache"))
        sft_fill = _tokens_per_sequence(sft_run.train_batches.dataset)
    dpo_ms = 1000 * statistics.median(dpo_times)
    sft_ms = 1000 * statistics.median(sft_times)
    print(f"{args.preset}, --seq-length {args.seq_length}, {args.global_batch} sequences per "
          f"step, {args.pairs} pairs")
    print(f"  reference cache   {cache_ms:9.1f} ms   forward pass {forward_ms:9.1f} ms   "
          f"ratio {cache_ms / forward_ms:.3f}")
    print(f"  dpo step          {dpo_ms:9.1f} ms   sft step     {sft_ms:9.1f} ms   "
          f"ratio {dpo_ms / sft_ms:.3f}")
    # packing differs (pairs whole vs single conversations): compare per token as well
    print(f"  tokens/sequence   {dpo_fill:9.1f}      sft          {sft_fill:9.1f}      "
          f"per-token ratio {(dpo_ms / dpo_fill) / (sft_ms / sft_fill):.3f}")


if __name__ == "__main__":
    main()
