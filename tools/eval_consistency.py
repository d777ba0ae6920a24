"""`python tools/eval_consistency.py`: runs megatron_trillion.cli.eval_consistency (its --help says what it does)."""
import sys

from megatron_trillion.cli.eval_consistency import main

if __name__ == "__main__":
    sys.exit(main())
