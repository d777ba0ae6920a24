"""Training logs in Megatron-LM's line format, a rank-0 progress bar, TensorBoard and W&B.

Log lines keep Megatron-LM's layout so existing log parsers and dashboards work::

     iteration       10/     100 | consumed samples:          640 | elapsed time per iteration
     (ms): 123.4 | throughput per GPU (TFLOP/s/GPU): 1.2 | learning rate: 1.000000E-04 |
     global batch size:    64 | lm loss: 1.234567E+00 | mtp_1 loss: 1.3E+00 | loss scale: 1.0 |
     grad norm: 0.123 | number of skipped iterations:   0 | number of nan iterations:   0 |

(on one line) and ``validation loss at iteration N | lm loss value: ... | lm loss PPL: ... |``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional


def format_iteration_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    learning_rate: float,
    global_batch_size: int,
    losses: Mapping[str, float],
    grad_norm: Optional[float],
    skipped_iterations: int,
    nan_iterations: int,
    tflops_per_device: Optional[float] = None,
    mfu: Optional[float] = None,
    tokens_per_second: Optional[float] = None,
    extra: Optional[Mapping[str, float]] = None,
) -> str:
    line = f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    if tflops_per_device is not None:
        line += f" throughput per GPU (TFLOP/s/GPU): {tflops_per_device:.3f} |"
    if mfu is not None:
        line += f" MFU: {100 * mfu:.1f}% |"
    if tokens_per_second is not None:
        line += f" tokens per second: {tokens_per_second:.1f} |"
    line += f" learning rate: {learning_rate:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    for key, value in losses.items():
        line += f" {key}: {value:.6E} |"
    for key, value in (extra or {}).items():
        line += f" {key}: {value:.6E} |"
    line += " loss scale: 1.0 |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {skipped_iterations:3d} |"
    line += f" number of nan iterations: {nan_iterations:3d} |"
    return line


def format_validation_line(iteration: int, losses: Mapping[str, float]) -> str:
    line = f" validation loss at iteration {iteration} |"
    for key, value in losses.items():
        line += f" {key} value: {value:.6E} |"
        if key.startswith("lm loss"):  # a perplexity only where the value is a token NLL
            line += f" {key} PPL: {math.exp(min(20.0, value)):.6E} |"
    return line


class ProgressBar:
    """A one-line progress bar on rank 0 (tokens/s, loss, lr, ETA); log lines print above it."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is a dependency; stay usable without it
                return
            self._bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True,
                             file=sys.stderr, leave=True)

    def update(self, loss: Optional[float], lr: float,
               tokens_per_second: Optional[float]) -> None:
        """One iteration done; ``loss`` / ``tokens_per_second`` are the last log line's (None
        before the first): reading them every step would stall the device every step."""
        if self._bar is not None:
            shown = [] if loss is None else [f"loss={loss:.4f}"]
            shown.append(f"lr={lr:.2e}")
            if tokens_per_second is not None:
                shown.append(f"tok/s={tokens_per_second:,.0f}")
            self._bar.set_postfix_str(" ".join(shown), refresh=False)
            self._bar.update(1)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class MetricWriters:
    """TensorBoard always when a directory is given, Weights & Biases when installed and asked."""

    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    run_config: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._tb = None
        self._wandb = None
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.tensorboard_dir, max_queue=1000)
        if self.wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError("--wandb-project needs the wandb package: pip install wandb") \
                    from exc
            self._wandb = wandb.init(project=self.wandb_project, name=self.wandb_exp_name,
                                     config=dict(self.run_config))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Stopwatch:
    def __init__(self) -> None:
        self._start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        return elapsed
