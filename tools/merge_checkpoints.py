"""`python tools/merge_checkpoints.py`: runs megatron_trillion.cli.merge_checkpoints (its --help says what it does)."""
import sys

from megatron_trillion.cli.merge_checkpoints import main

if __name__ == "__main__":
    sys.exit(main())
