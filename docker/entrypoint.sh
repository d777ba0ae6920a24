#!/usr/bin/env bash
# Container entrypoint: `quickstart` runs examples/quickstart.sh, `pretrain ARGS...` runs
# torchrun over megatron_trillion.pretrain on this node's GPUs, anything else is executed as is.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:---help}" in
  quickstart)
    shift
    exec bash "$here/examples/quickstart.sh" "$@"
    ;;
  pretrain)
    shift
    nproc="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
    cmd=(torchrun --nproc-per-node "$nproc" -m megatron_trillion.pretrain "$@")
    if [ "${DRY_RUN:-0}" = "1" ]; then
      printf '%q ' "${cmd[@]}"; echo
      exit 0
    fi
    exec "${cmd[@]}"
    ;;
  -h|--help)
    echo "usage: docker run IMAGE quickstart | pretrain [megatron-trillion flags] | COMMAND..."
    ;;
  *)
    exec "$@"
    ;;
esac
