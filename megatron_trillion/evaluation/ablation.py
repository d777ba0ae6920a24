"""The XLDA ablation table (examples/xlda_ablation.sh): per run, the last per-language
validation loss of its training log and its cross-lingual consistency metrics."""

from __future__ import annotations

import json
import os
import re
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
    """A run directory of the ablation script: ``train.log`` and ``consistency.json``."""
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
    return {"name": os.path.basename(os.path.normpath(run_dir)), "losses": losses,
            "metrics": metrics}


def format_ablation_table(runs: Sequence[Mapping]) -> str:
    """One row per run: validation loss (all, per language) and the consistency metrics."""
    if not runs:
        raise UserError("no runs")
    languages = sorted({l for run in runs for l in run["losses"] if l != ALL_LANGUAGES})
    first = runs[0]["metrics"]
    names = metric_names(first["source_language"], first["target_language"])
    metric_keys = [names[k] for k in ("acc_source", "acc_target", "transfer", "target_wrong",
                                      "source_wrong")]
    header = (["run", "val loss"] + [f"val loss [{l}]" for l in languages] + metric_keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run["name"], _number(run["losses"].get(ALL_LANGUAGES))]
        cells += [_number(run["losses"].get(l)) for l in languages]
        cells += [_number(run["metrics"].get(k)) for k in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"(consistency on {first['num_items']} parallel items; "
                 f"{names['transfer']} higher is better, the other two lower)")
    return "\n".join(lines)


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"
