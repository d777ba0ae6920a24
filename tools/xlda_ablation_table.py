"""Print the XLDA ablation table from the run directories of examples/xlda_ablation.sh.

    python tools/xlda_ablation_table.py ablation_out/runs/xlda-pair ablation_out/runs/none ...
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_trillion.errors import UserError  # noqa: E402
from megatron_trillion.evaluation.ablation import format_ablation_table, read_run  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="xlda_ablation_table.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (train.log, consistency.json)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.runs]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_ablation_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
