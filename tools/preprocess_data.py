"""`python tools/preprocess_data.py`: runs megatron_trillion.cli.preprocess_data (its --help says what it does)."""
import sys

from megatron_trillion.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
