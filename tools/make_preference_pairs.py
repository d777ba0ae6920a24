"""`python tools/make_preference_pairs.py`: runs megatron_trillion.cli.make_preference_pairs (its --help says what it does)."""
import sys

from megatron_trillion.cli.make_preference_pairs import main

if __name__ == "__main__":
    sys.exit(main())
