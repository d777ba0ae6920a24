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


def _console_script(name: str):
    """The console-script function of tools/<name>.py: runs its main() and exits with its status."""
    def entry() -> None:
        sys.exit(_tool_main(name)())

    entry.__name__ = name
    entry.__doc__ = f"Runs tools/{name}.py (its --help says what it does)."
    return entry


preprocess_data = _console_script("preprocess_data")           # megatron-trillion-preprocess
train_tokenizer = _console_script("train_tokenizer")           # megatron-trillion-train-tokenizer
plan = _console_script("plan")                                 # megatron-trillion-plan
convert_checkpoint = _console_script("convert_checkpoint")     # megatron-trillion-convert
build_data_index = _console_script("build_data_index")         # megatron-trillion-build-data-index
merge_checkpoints = _console_script("merge_checkpoints")       # megatron-trillion-merge
