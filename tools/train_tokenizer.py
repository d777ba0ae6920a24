"""`python tools/train_tokenizer.py`: runs megatron_trillion.cli.train_tokenizer (its --help says what it does)."""
import sys

from megatron_trillion.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
