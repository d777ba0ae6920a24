#!/usr/bin/env bash
# The project's one test command: creates/uses .venv, installs exactly as the README documents,
# runs the whole suite (single-process and multi-process gloo tests).
# Extra arguments go to pytest, e.g.  bash tests/run.sh -m "not slow"  or  bash tests/run.sh -k xlda
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
exec python -m pytest "$@"
