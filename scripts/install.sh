# Sourced by tests/run.sh and examples/quickstart.sh: create or reuse .venv and install the
# project as the README documents. On a CPU machine torch is pinned to the local 2.13.0 CPU
# wheel first (an unpinned torch would pull a multi-GB CUDA build); on a GPU image set
# MEGATRON_TRILLION_SKIP_TORCH=1 to keep the image's torch.
VENV="${MEGATRON_TRILLION_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.megatron-trillion-installed"
want="$(cat setup.py scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ "${MEGATRON_TRILLION_SKIP_TORCH:-0}" != "1" ]; then
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
