"""Generation speed on CPU (fp32): our engine next to transformers on the HF export.

    python bench/bench_generate.py [--preset tiny-tri-7b --prompts 16 --new-tokens 128]

Trains a small preset for one step on mock data (``--seq-length`` long enough for the flatness
check), exports it with tools/convert_checkpoint.py's exporter, then measures in one run:
  throughput  tokens per second for --prompts prompts (8..32 tokens, left-padded as a batch)
              x --new-tokens greedy tokens: ours (``inference.engine``, KV cache) vs
              transformers' ``generate(use_cache=True)`` on the export; best of --repeats,
              interleaved
  flatness    time per new token (median of 32 steps) once 64, 256 and 1,024 tokens have been
              generated, as a ratio to the one at 64, ours and transformers', for each of
              --flat-rows (default 1 and 16 rows). A working cache keeps it flat while the
              weights dominate a step; once a batch's cache outweighs them (16 rows x 1,024
              tokens of fp32 keys and values: 64 MiB, against tiny-tri-7b's 7 MiB of weights),
              each step must read the whole cache, and its time grows with it for any KV cache
On a shared machine, wall-clock times swing with other load; the ratios are what to read, and
``--clock cpu`` times with this process's CPU time (all its threads) instead, which other
processes disturb far less (with ``--threads 1`` it is the single-thread time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

POINTS = (64, 256, 1024)
WINDOW = 32
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


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

    start = clock()
    results = engine.generate(batch, SamplingParams(max_new_tokens=new_tokens))
    elapsed = clock() - start
    assert all(len(c.token_ids) == new_tokens for r in results for c in r.completions)
    return len(batch) * new_tokens / elapsed


def theirs(hf, batch: list[list[int]], new_tokens: int) -> float:
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    start = clock()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                          pad_token_id=0)
    elapsed = clock() - start
    assert out.shape[1] == width + new_tokens
    return len(batch) * new_tokens / elapsed


def _timed_calls(owner, name: str, run) -> list[float]:
    """Seconds of each call of ``owner.<name>`` while ``run()`` runs."""
    times: list[float] = []
    method = getattr(owner, name)

    def timed(*args, **kwargs):
        start = clock()
        out = method(*args, **kwargs)
        times.append(clock() - start)
        return out

    setattr(owner, name, timed)
    try:
        run()
    finally:
        delattr(owner, name)
    return times


def step_times(engine, batch: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds of each of our decode forwards (index i: i + 1 tokens generated before it)."""
    from megatron_trillion.inference.engine import SamplingParams

    times = _timed_calls(engine, "_forward", lambda: engine.generate(
        batch, SamplingParams(max_new_tokens=new_tokens)))
    return times[1:]  # the first call is the prefill


def hf_step_times(hf, batch: list[list[int]], new_tokens: int) -> list[float]:
    """The same for transformers' ``generate`` (each model forward of its loop)."""
    return _timed_calls(hf, "forward", lambda: theirs(hf, batch, new_tokens))[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-tri-7b")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flat-rows", type=int, nargs="+", default=[1, 16],
                        help="rows (batch sizes) of the time-per-token measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall-clock time, or this process's CPU time")
    args = parser.parse_args(argv)
    if min(args.flat_rows) < 1:
        parser.error("--flat-rows takes batch sizes of at least 1")
    global clock
    clock = CLOCKS[args.clock]
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

        steps = max(POINTS) + WINDOW
        flat_batch = prompts(max(args.flat_rows), engine.vocab_size)
        per_token = {}
        for rows in args.flat_rows:
            for name, times in (("ours", step_times(engine, flat_batch[:rows], steps)),
                                ("transformers", hf_step_times(hf, flat_batch[:rows], steps))):
                # the median: a step that another process interrupted does not count
                per_token[name, rows] = {n: statistics.median(times[n - 1:n - 1 + WINDOW])
                                         for n in POINTS}

    print(f"{args.preset}, fp32, CPU threads={torch.get_num_threads()}, {args.clock} clock, "
          f"{args.prompts} prompts x {args.new_tokens} new tokens, best of {args.repeats}\n")
    print(f"{'generator':<14}{'tokens/s':>10}{'x transformers':>16}")
    for name in ("ours", "transformers"):
        print(f"{name:<14}{best[name]:>10.1f}{best[name] / best['transformers']:>16.2f}")
    print(f"\ntime per new token (ms per decode step, median of {WINDOW} steps; x: ratio to the "
          f"step at {POINTS[0]})")
    columns = [(name, rows) for rows in args.flat_rows for name in ("ours", "transformers")]
    print(f"{'generated':<11}" + "".join(f"{f'{name}, {rows} row' + 's' * (rows > 1):>24}"
                                         for name, rows in columns))
    for n in POINTS:
        cells = []
        for key in columns:
            ms, base = per_token[key][n] * 1e3, per_token[key][POINTS[0]] * 1e3
            cells.append(f"{ms:>16.2f} {ms / base:>5.2f}x")
        print(f"{n:<11}" + "".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
