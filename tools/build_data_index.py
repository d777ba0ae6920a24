"""`python tools/build_data_index.py`: runs megatron_trillion.cli.build_data_index (its --help says what it does)."""
import sys

from megatron_trillion.cli.build_data_index import main

if __name__ == "__main__":
    sys.exit(main())
