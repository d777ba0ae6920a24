"""``python -m megatron_trillion.selftest.te_range``: exit 1 unless the installed Transformer
Engine is in the range megatron-core is developed against (the Docker build runs this; it
reads package metadata only, so it needs no GPU)."""

import sys

from megatron_trillion.selftest.checks import (
    installed_version,
    transformer_engine_requirement,
    version_in_range,
)


def main() -> int:
    wanted = transformer_engine_requirement()
    found = installed_version("transformer-engine", "transformer_engine")
    if found is None or not version_in_range(found, wanted):
        print(f"error: transformer-engine {found or '(not installed)'} is outside {wanted}, the "
              "range megatron-core 0.16.1 is developed against", file=sys.stderr)
        return 1
    print(f"transformer-engine {found} in {wanted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
