"""Console-script entry points (setup.py) for the tools/*.py CLIs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _tool_main(name: str):
    """Loads tools/<name>.py from the source tree and returns its main()."""
    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"megatron-trillion: {path} not found; install from a source checkout "
                         f"(pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"megatron_trillion_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def preprocess_data() -> None:
    """megatron-trillion-preprocess: see tools/preprocess_data.py."""
    sys.exit(_tool_main("preprocess_data")())


def train_tokenizer() -> None:
    """megatron-trillion-train-tokenizer: see tools/train_tokenizer.py."""
    sys.exit(_tool_main("train_tokenizer")())


def plan() -> None:
    """megatron-trillion-plan: see tools/plan.py."""
    sys.exit(_tool_main("plan")())


def convert_checkpoint() -> None:
    """megatron-trillion-convert: see tools/convert_checkpoint.py."""
    sys.exit(_tool_main("convert_checkpoint")())


def build_data_index() -> None:
    """megatron-trillion-build-data-index: see tools/build_data_index.py."""
    sys.exit(_tool_main("build_data_index")())


def merge_checkpoints() -> None:
    """megatron-trillion-merge: see tools/merge_checkpoints.py."""
    sys.exit(_tool_main("merge_checkpoints")())
