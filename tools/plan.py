"""`python tools/plan.py`: runs megatron_trillion.cli.plan (its --help says what it does)."""
import sys

from megatron_trillion.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
