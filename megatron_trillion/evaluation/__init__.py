"""Evaluation of trained models: cross-lingual consistency and the generative benchmarks."""

from __future__ import annotations

import json
import os


def write_results(results: dict, path: str) -> None:
    """``results`` as JSON at ``path``, written whole or not at all (never a half-written
    results file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
