"""Generation speed on CPU (fp32): our engine next to transformers on the HF export.

    python bench/bench_generate.py [--preset tiny-tri-7b --prompts 16 --new-tokens 128]

Trains a small preset for one step on mock data (``--seq-length`` long enough for the flatness
check), exports it with tools/convert_checkpoint.py's exporter, then measures in one run:
  throughput  tokens per second for --prompts prompts (8..32 tokens, left-padded as a batch)
              x --new-tokens greedy tokens: ours (``inference.engine``, KV cache) vs
              transformers' ``generate(use_cache=True)`` on the export; best of --repeats,
              interleaved
  flatness    our time per new token (mean over 16 steps) once 64, 256 and 1,024 tokens have
              been generated, as a ratio to the one at 64: a working cache keeps it flat
On a shared machine, wall-clock times swing with other load; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

POINTS = (64, 256, 1024)
WINDOW = 16


def make_checkpoint(workdir: str, preset: str, seq_length: int) -> tuple[str, str]:
    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.platform.distributed import destroy_distributed
    from megatron_trillion.pretrain import pretrain
    from megatron_trillion.training.arguments import parse_args

    ckpt, hf = os.path.join(workdir, "ckpt"), os.path.join(workdir, "hf")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    pretrain(parse_args([
        "--preset", preset, "--mock-data", "--data-cache-path", os.path.join(workdir, "cache"),
        "--seq-length", str(seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
        "--lr", "1e-3", "--train-iters", "1", "--no-progress-bar", "--save", ckpt]),
        log=lambda line: None)
    export_checkpoint(ExportConfig(load=ckpt, save=hf, dtype="fp32"), progress=False,
                      log=lambda line: None)
    destroy_distributed()
    return ckpt, hf


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (count,), generator=gen).tolist()
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def ours(engine, batch: list[list[int]], new_tokens: int) -> float:
    from megatron_trillion.inference.engine import SamplingParams

    start = time.perf_counter()
    results = engine.generate(batch, SamplingParams(max_new_tokens=new_tokens))
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == new_tokens for r in results for c in r.completions)
    return len(batch) * new_tokens / elapsed


def theirs(hf, batch: list[list[int]], new_tokens: int) -> float:
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                          pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens
    return len(batch) * new_tokens / elapsed


def step_times(engine, batch: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds of each decode forward (index i: i + 1 tokens generated before it)."""
    from megatron_trillion.inference.engine import SamplingParams

    times: list[float] = []
    forward = engine._forward

    def timed(*args):
        start = time.perf_counter()
        out = forward(*args)
        times.append(time.perf_counter() - start)
        return out

    engine._forward = timed
    try:
        engine.generate(batch, SamplingParams(max_new_tokens=new_tokens))
    finally:
        del engine._forward
    return times[1:]  # the first call is the prefill


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-tri-7b")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flat-rows", type=int, default=16,
                        help="rows of the time-per-token measurement")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from megatron_trillion.inference.engine import GenerationEngine, load_engine
    from megatron_trillion.platform.distributed import initialize_single_process
    from megatron_trillion.platform.warnings import quiet_known_warnings

    quiet_known_warnings()
    seq_length = max(POINTS) + WINDOW + 64
    with tempfile.TemporaryDirectory() as workdir:
        ckpt, hf_dir = make_checkpoint(workdir, args.preset, seq_length)
        print("checkpoint and export written", file=sys.stderr, flush=True)
        initialize_single_process()
        loaded, _, _, _ = load_engine(ckpt, log=lambda line: None)
        # No stop token: every row generates exactly --new-tokens, as min_new_tokens makes
        # transformers do.
        engine = GenerationEngine(loaded.model, None, loaded.max_sequence_length, ())
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        batch = prompts(args.prompts, engine.vocab_size)

        ours(engine, batch[:2], 4), theirs(hf, batch[:2], 4)  # warm-up
        rates = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            rates["ours"].append(ours(engine, batch, args.new_tokens))
            rates["transformers"].append(theirs(hf, batch, args.new_tokens))
            print(f"tokens/s: ours {rates['ours'][-1]:.1f}, "
                  f"transformers {rates['transformers'][-1]:.1f}", file=sys.stderr, flush=True)
        best = {name: max(values) for name, values in rates.items()}

        times = step_times(engine, batch[:args.flat_rows], max(POINTS) + WINDOW)
        per_token = {n: sum(times[n - 1:n - 1 + WINDOW]) / WINDOW for n in POINTS}

    print(f"{args.preset}, fp32, CPU threads={torch.get_num_threads()}, "
          f"{args.prompts} prompts x {args.new_tokens} new tokens, best of {args.repeats}\n")
    print(f"{'generator':<14}{'tokens/s':>10}{'x transformers':>16}")
    for name in ("ours", "transformers"):
        print(f"{name:<14}{best[name]:>10.1f}{best[name] / best['transformers']:>16.2f}")
    rows = min(args.flat_rows, args.prompts)
    print(f"\ntime per new token ({rows} rows, mean of {WINDOW} steps)")
    print(f"{'generated':<14}{'ms/step':>10}{'x at 64':>16}")
    for n in POINTS:
        print(f"{n:<14}{per_token[n] * 1e3:>10.2f}{per_token[n] / per_token[POINTS[0]]:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
