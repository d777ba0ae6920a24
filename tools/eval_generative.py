"""`python tools/eval_generative.py`: runs megatron_trillion.cli.eval_generative (its --help says what it does)."""
import sys

from megatron_trillion.cli.eval_generative import main

if __name__ == "__main__":
    sys.exit(main())
