import sys

from megatron_trillion.selftest import main

sys.exit(main())
