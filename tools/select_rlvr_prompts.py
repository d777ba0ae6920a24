"""`python tools/select_rlvr_prompts.py`: runs megatron_trillion.cli.select_rlvr_prompts (its --help says what it does)."""
import sys

from megatron_trillion.cli.select_rlvr_prompts import main

if __name__ == "__main__":
    sys.exit(main())
