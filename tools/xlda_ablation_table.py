"""`python tools/xlda_ablation_table.py`: runs megatron_trillion.cli.xlda_ablation_table (its --help says what it does)."""
import sys

from megatron_trillion.cli.xlda_ablation_table import main

if __name__ == "__main__":
    sys.exit(main())
