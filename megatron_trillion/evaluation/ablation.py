"""The XLDA ablation table (examples/xlda_ablation.sh): per run, the last per-language
validation loss of its training log and its cross-lingual consistency metrics, as mean and
standard deviation over the run's seeds."""

from __future__ import annotations

import json
import os
import re
import statistics
from typing import Mapping, Optional, Sequence

from megatron_trillion.data.languages import ALL_LANGUAGES
from megatron_trillion.errors import UserError
from megatron_trillion.evaluation.consistency import metric_names

# The Megatron-style validation line of training/reporting.py: "... | lm loss [ko] value: X |".
_VALUE = re.compile(r"\| (lm loss(?: \[([^\]]+)\])?) value: ([-+0-9.eEinfa]+) ")


def last_validation_losses(log_text: str) -> dict[str, float]:
    """``{"all": loss, "<lang>": loss, ...}`` from the last ``validation loss at iteration``
    line of a training log."""
    lines = [l for l in log_text.splitlines() if "validation loss at iteration" in l]
    if not lines:
        raise UserError("no 'validation loss at iteration' line (train with --eval-interval "
                         "and --valid-data-path)")
    losses = {}
    for _, language, value in _VALUE.findall(lines[-1]):
        losses[language or ALL_LANGUAGES] = float(value)  # no [lang]: the whole held-out set
    return losses


def read_run(run_dir: str) -> dict:
    """A run directory of the ablation script: one ``seed-<n>/`` directory per seed (or the
    files of one seed directly), each with ``train.log`` and ``consistency.json``.
    ``{"name", "seeds": [{"losses", "metrics"}, ...]}``."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    seeds = sorted((d for d in os.listdir(run_dir) if re.fullmatch(r"seed-\d+", d)),
                   key=lambda d: int(d[len("seed-"):]))
    directories = [os.path.join(run_dir, d) for d in seeds] or [run_dir]
    return {"name": os.path.basename(os.path.normpath(run_dir)),
            "seeds": [_read_seed(d) for d in directories]}


def _read_seed(run_dir: str) -> dict:
    log = os.path.join(run_dir, "train.log")
    results = os.path.join(run_dir, "consistency.json")
    for path in (log, results):
        if not os.path.isfile(path):
            raise UserError(f"{run_dir}: {os.path.basename(path)} is missing (did the run "
                             "finish?)")
    with open(log, encoding="utf-8") as f:
        try:
            losses = last_validation_losses(f.read())
        except UserError as exc:
            raise UserError(f"{log}: {exc}") from exc
    with open(results, encoding="utf-8") as f:
        metrics = json.load(f)
    return {"losses": losses, "metrics": metrics}


def format_ablation_table(runs: Sequence[Mapping]) -> str:
    """One row per run: validation loss (all, per language) and the consistency metrics, each
    as ``mean ± standard deviation`` over the run's seeds (the value alone for one seed)."""
    if not runs:
        raise UserError("no runs")
    languages = sorted({l for run in runs for seed in run["seeds"] for l in seed["losses"]
                        if l != ALL_LANGUAGES})
    first = runs[0]["seeds"][0]["metrics"]
    names = metric_names(first["source_language"], first["target_language"])
    metric_keys = [names[k] for k in ("acc_source", "acc_target", "transfer", "target_wrong",
                                      "source_wrong")]
    header = (["run", "val loss"] + [f"val loss [{l}]" for l in languages] + metric_keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        seeds = run["seeds"]
        cells = [run["name"], _cell([s["losses"].get(ALL_LANGUAGES) for s in seeds])]
        cells += [_cell([s["losses"].get(l) for s in seeds]) for l in languages]
        cells += [_cell([s["metrics"].get(k) for s in seeds]) for k in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    counts = sorted({len(run["seeds"]) for run in runs})
    spread = (f"mean ± standard deviation over {'/'.join(map(str, counts))} seeds; "
              if counts != [1] else "one seed; ")
    lines.append(f"({spread}consistency on {first['num_items']} parallel items; "
                 f"{names['transfer']} higher is better, the other two lower)")
    return "\n".join(lines)


def _cell(values: Sequence[Optional[float]]) -> str:
    """``n/a`` where no seed defines the value; ``(k/n)`` where only k of n seeds do."""
    defined = [v for v in values if v is not None]
    if not defined:
        return "n/a"
    if len(values) == 1:
        return f"{defined[0]:.4f}"
    text = f"{statistics.fmean(defined):.3f}"
    if len(defined) > 1:
        text += f" ± {statistics.stdev(defined):.3f}"
    if len(defined) < len(values):
        text += f" ({len(defined)}/{len(values)})"
    return text
