"""Print the XLDA ablation table from the run directories of examples/xlda_ablation.sh.

    python tools/xlda_ablation_table.py ablation_out/runs/xlda-pair ablation_out/runs/none ...
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.evaluation.ablation import format_ablation_table, read_run
from megatron_trillion.platform.single_process import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="xlda_ablation_table.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (seed-<n>/ directories, or the "
                        "train.log and consistency.json of one seed)")
    args = parser.parse_args(argv)
    return run_tool(lambda: print(format_ablation_table([read_run(d) for d in args.runs])))


if __name__ == "__main__":
    sys.exit(main())
