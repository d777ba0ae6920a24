"""`python tools/make_sample_corpus.py`: runs megatron_trillion.cli.make_sample_corpus (its --help says what it does)."""
import sys

from megatron_trillion.cli.make_sample_corpus import main

if __name__ == "__main__":
    sys.exit(main())
