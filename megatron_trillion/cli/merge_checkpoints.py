"""Average the model weights of checkpoints of one model (model merging), in one CPU process.

    python tools/merge_checkpoints.py --load sft_seed1/ sft_seed2/ sft_seed3/ --save merged/
    python tools/merge_checkpoints.py --load a/ b/ --weights 0.75 0.25 --save merged/

The inputs may have been saved at any TP/PP/EP/DP layout; each contributes the newest
checkpoint of its directory. The output is an ordinary (weights-only, iteration 0) checkpoint:
``pretrain --load merged/ --finetune``, ``tools/generate.py --load merged/`` and
``tools/convert_checkpoint.py export --load merged/`` read it. Weights default to equal; weights
that do not sum to 1 are normalised (and the log says so).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.platform.single_process import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="merge_checkpoints.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--load", nargs="+", required=True,
                        help="checkpoint directories (--save of runs) to merge")
    parser.add_argument("--save", required=True, help="new checkpoint directory")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one weight per --load (default: equal; normalised to sum to 1)")
    args = parser.parse_args(argv)

    def merge() -> None:
        from megatron_trillion.convert.merge import merge_checkpoints

        merge_checkpoints(args.load, args.save, args.weights)

    from megatron_trillion.training.checkpointing import CheckpointError

    return run_tool(merge, process_group=True, user_errors=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
