"""`python tools/hf_generate.py`: runs megatron_trillion.cli.hf_generate (its --help says what it does)."""
import sys

from megatron_trillion.cli.hf_generate import main

if __name__ == "__main__":
    sys.exit(main())
