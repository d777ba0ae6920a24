"""`python tools/generate.py`: runs megatron_trillion.cli.generate (its --help says what it does)."""
import sys

from megatron_trillion.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
