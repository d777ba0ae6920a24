"""``python -m megatron_trillion.selftest``: check a node before a long job (<= 5 min, one GPU).

Prints one row per check - ``pass``, ``FAIL`` or ``skipped`` with why - and exits 1 when any
check fails, else 0. On a machine without a GPU every check that needs one is listed as
skipped (with the reason) and the rest run, so the command is also a quick CPU sanity test.

    megatron-trillion-selftest [--only NAME ...] [--steps 20] [--device-peak-tflops 989]
    megatron-trillion-selftest --write-reference-curve PATH   # regenerate the CPU fp32 curve

The checks themselves are in :mod:`megatron_trillion.selftest.checks`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

PASS, FAIL, SKIPPED = "pass", "FAIL", "skipped"


@dataclass(frozen=True)
class Result:
    status: str  # PASS | FAIL | SKIPPED
    detail: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[["Context"], Result]
    needs: tuple = ()  # "cuda", "te", "2 gpus": preconditions, each turned into a skip reason


@dataclass
class Context:
    """What the checks share: the machine's facts and the command's options."""

    cuda: bool
    te_version: Optional[str]
    gpu_count: int
    device_name: Optional[str]
    steps: int = 20
    device_peak_tflops: Optional[float] = None
    workdir: str = ""
    log: Callable[[str], None] = field(default=lambda line: None)

    @classmethod
    def detect(cls, **options) -> "Context":
        import torch

        from megatron_trillion.selftest.checks import installed_version

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, te_version=installed_version("transformer-engine",
                                                           "transformer_engine"),
                   gpu_count=torch.cuda.device_count() if cuda else 0,
                   device_name=torch.cuda.get_device_name() if cuda else None, **options)

    def missing(self, needs: Sequence[str]) -> Optional[str]:
        """Why a check with these preconditions cannot run here (None when it can)."""
        for need in needs:
            if need == "cuda" and not self.cuda:
                return "no CUDA device"
            if need == "te" and self.te_version is None:
                return "Transformer Engine not installed"
            if need == "2 gpus" and self.gpu_count < 2:
                return f"{self.gpu_count} GPU(s) visible, needs 2"
        return None


def run_checks(checks: Sequence[Check], context: Context) -> list[tuple[str, Result, float]]:
    """Run each check (or skip it with the reason); an exception is that check's FAIL."""
    rows = []
    for check in checks:
        started = time.perf_counter()
        reason = context.missing(check.needs)
        if reason is not None:
            result = Result(SKIPPED, reason)
        else:
            context.log(f"running: {check.name}")
            try:
                result = check.run(context)
            except Exception as exc:  # noqa: BLE001 - a failing check is a row, not a crash
                last = traceback.extract_tb(exc.__traceback__)[-1]
                result = Result(FAIL, f"{type(exc).__name__}: {exc} "
                                      f"({os.path.basename(last.filename)}:{last.lineno})")
        rows.append((check.name, result, time.perf_counter() - started))
    return rows


def format_table(rows: Sequence[tuple[str, Result, float]]) -> str:
    width = max([len("check")] + [len(name) for name, _, _ in rows])
    lines = [f"{'check':<{width}}  {'status':<7}  {'time':>6}  detail",
             f"{'-' * width}  {'-' * 7}  {'-' * 6}  {'-' * 40}"]
    for name, result, seconds in rows:
        detail = result.detail.replace("\n", " | ")
        lines.append(f"{name:<{width}}  {result.status:<7}  {seconds:>5.1f}s  {detail}")
    failed = sum(result.status == FAIL for _, result, _ in rows)
    skipped = sum(result.status == SKIPPED for _, result, _ in rows)
    lines.append(f"{len(rows) - failed - skipped} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_trillion.selftest.checks import CHECKS

    parser = argparse.ArgumentParser(prog="megatron-trillion-selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], metavar="NAME",
                        help="run only these checks: " + ", ".join(c.name for c in CHECKS))
    parser.add_argument("--steps", type=int, default=20,
                        help="training steps compared with the reference curve (<= 20)")
    parser.add_argument("--device-peak-tflops", type=float, default=None,
                        help="peak dense BF16 TFLOP/s of one GPU for MFU (default: by name, "
                             "H100/H200 989)")
    parser.add_argument("--write-reference-curve", metavar="PATH", default=None,
                        help="train the reference run on this (CPU) machine in fp32 and write "
                             "its loss curve to PATH, then exit")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 20:
        parser.error(f"--steps must be between 1 and 20 (the reference curve's length), "
                     f"got {args.steps}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    import tempfile

    from megatron_trillion.platform.warnings import quiet_known_warnings
    from megatron_trillion.selftest import checks

    args = parse_args(argv)
    quiet_known_warnings()
    with tempfile.TemporaryDirectory(prefix="megatron-trillion-selftest-") as workdir:
        if args.write_reference_curve:
            checks.write_reference_curve(args.write_reference_curve, workdir)
            print(f"wrote {args.write_reference_curve}")
            return 0
        context = Context.detect(steps=args.steps, device_peak_tflops=args.device_peak_tflops,
                                 workdir=workdir, log=lambda line: print(line, flush=True))
        selected = [c for c in checks.CHECKS if not args.only or c.name in args.only]
        with checks.single_process_group():
            rows = run_checks(selected, context)
    print()
    print(format_table(rows))
    return 1 if any(result.status == FAIL for _, result, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
