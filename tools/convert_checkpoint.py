"""`python tools/convert_checkpoint.py`: runs megatron_trillion.cli.convert_checkpoint (its --help says what it does)."""
import sys

from megatron_trillion.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
