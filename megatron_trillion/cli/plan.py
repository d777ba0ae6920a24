"""Per-GPU memory and throughput of a pretraining run, from the same flags as pretrain.

    python tools/plan.py --world-size 256 --preset tri-7b --seq-length 4096 --bf16 \\
        --use-distributed-optimizer --micro-batch-size 1 --global-batch-size 512 --mfu 0.425

Every ``megatron_trillion.pretrain`` flag is accepted (data paths need not exist here); the
planner's own flags are below. The plan is for the full global batch; with
``--rampup-batch-size`` (or ``--step-batch-size-schedule``) it also says how many iterations,
samples and tokens run below it. Exits 1 when a pipeline stage does not fit in GPU memory,
2 for flags that do not fit together (the sizes pretrain's validation checks).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.platform.single_process import run_tool


def planner_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plan.py", allow_abbrev=False,
        description="Per-GPU memory and throughput of a run (any pretrain flag is accepted).")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs in the run (default: --num-nodes x --gpus-per-node)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation to state throughput at")
    parser.add_argument("--gpu-memory-gib", type=float, default=79.6,
                        help="device memory (H100 80GB: 81,559 MiB = 79.6 GiB)")
    parser.add_argument("--runtime-reserve-gib", type=float, default=6.0,
                        help="CUDA context, NCCL, workspaces, fragmentation")
    parser.add_argument("--gpu-hours-budget", type=float, default=None,
                        help="print the MFU needed to train the run's tokens in this many "
                             "GPU hours (e.g. Trillion-7B: 59400 for 2T tokens)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, rest = planner_parser().parse_known_args(argv)
    return run_tool(lambda: print_plan(own, rest))


def print_plan(own: argparse.Namespace, pretrain_argv: Sequence[str]) -> int:
    """Prints the plan; 1 when a pipeline stage does not fit in GPU memory."""
    from megatron_trillion.planning import (
        DoesNotFitError,
        Hardware,
        check_fits,
        format_plan,
        plan_run,
        required_mfu,
    )
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.model_flags import resolve_model
    from megatron_trillion.training.validation import run_shape

    world = own.world_size or own.num_nodes * own.gpus_per_node
    config = parse_args(pretrain_argv)
    # Without --preset the flags define the model; its vocabulary is --vocab-size.
    preset = resolve_model(config.model, vocab_size=None if config.model.preset
                           else config.data.vocab_size)
    # The sizes pretrain's validation derives (batch ramp-up included); the data and
    # this machine's kernels are not checked: the plan is for a run elsewhere.
    shape = run_shape(config, preset, world)
    hardware = Hardware(memory_gib=own.gpu_memory_gib,
                        peak_tflops=config.logging.device_peak_tflops or Hardware.peak_tflops,
                        runtime_reserve_gib=own.runtime_reserve_gib)
    plan = plan_run(config, world, hardware, mfu=own.mfu, preset=preset, shape=shape)
    tokens = shape.train_samples * shape.seq_length
    print(format_plan(plan, train_tokens=tokens or None))
    if own.gpu_hours_budget and tokens:
        need = required_mfu(plan.throughput.flops_per_token, tokens, own.gpu_hours_budget,
                            hardware.peak_tflops)
        flops = plan.throughput
        hfu = need * flops.hardware_flops_per_token / flops.flops_per_token
        six_n = need * flops.six_n_flops_per_token / flops.flops_per_token
        per_gpu = tokens / (own.gpu_hours_budget * 3600.0)
        print(f"budget {own.gpu_hours_budget / 1e3:.1f}K GPU hours for {tokens / 1e12:.2f}T "
              f"tokens: needs {per_gpu:,.0f} tokens/s/GPU = {need:.1%} MFU "
              f"({hfu:.1%} HFU with this recompute setting; "
              f"{six_n:.1%} counting 6N FLOPs/token), "
              f"{plan.global_batch_size * plan.seq_length / (per_gpu * world):.2f} s per "
              f"{plan.global_batch_size * plan.seq_length / 1e6:.2f}M-token step")
    try:
        check_fits(plan)
    except DoesNotFitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
