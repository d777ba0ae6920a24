#!/usr/bin/env bash
# Shared launch logic of the examples/*/*.sbatch recipes. A recipe sets TRAIN_FLAGS (an array
# of megatron_trillion.pretrain flags, without --save/--load) and sources this file, then calls
#   launch_pretrain
# which
#   * resumes automatically: --save and --load are both $CKPT_DIR, so a requeued job continues
#     from the newest checkpoint (an empty $CKPT_DIR starts at iteration 0). A recipe that starts
#     from another run's weights sets INIT_CHECKPOINT: used (--load it --finetune) only while
#     $CKPT_DIR holds no checkpoint yet;
#   * runs one `torchrun` per node through `srun` inside the container (pyxis/enroot), with
#     c10d rendezvous on the first node of the allocation;
#   * requeues on the pre-timeout signal: `#SBATCH --signal=B:USR1@<seconds>` delivers USR1 to
#     the batch shell, which forwards it to the training processes (--exit-signal-handler makes
#     them save a checkpoint at the next step and exit 0) and then `scontrol requeue`s the job.
# With DRY_RUN=1 nothing is launched: the exact torchrun command of one node is printed (no
# SLURM, no container, no GPU needed).
#
# Variables (environment overrides the recipe's defaults):
#   CONTAINER_IMAGE    enroot image / squashfs (default: the Dockerfile's image, built and
#                      imported as megatron-trillion.sqsh next to the repo)
#   CONTAINER_MOUNTS   pyxis --container-mounts (default: DATA_DIR and CKPT_DIR at the same paths)
#   CONTAINER_REPO     the repository inside the container (default: the image's copy)
#   GPUS_PER_NODE      default 8;  MASTER_PORT  default 29500
#   NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...  site-specific NCCL settings are passed through

set -euo pipefail

# Under sbatch the script runs from a spool copy: submit from the repository root.
if [[ -n "${SLURM_JOB_ID:-}" && -z "${REPO_DIR:-}" ]]; then
  REPO_DIR="${SLURM_SUBMIT_DIR}"
fi
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONTAINER_IMAGE="${CONTAINER_IMAGE:-${REPO_DIR}/megatron-trillion.sqsh}"
CONTAINER_REPO="${CONTAINER_REPO:-/opt/megatron-trillion}"

# NCCL over InfiniBand with GPUDirect RDMA; sites override any of these in the environment.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Megatron overlaps TP/SP communication with compute only with a single device queue.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

has_checkpoint() {
  [[ -f "$1/latest_checkpointed_iteration.txt" ]]
}

# The torchrun command one node runs (same on every node: c10d rendezvous assigns node ranks).
torchrun_command() {
  local nodes="$1" rdzv_host="$2" job_id="$3"
  local resume=(--save "$CKPT_DIR" --load "$CKPT_DIR")
  if [[ -n "${INIT_CHECKPOINT:-}" ]] && ! has_checkpoint "$CKPT_DIR"; then
    resume=(--save "$CKPT_DIR" --load "$INIT_CHECKPOINT" --finetune)
  fi
  TORCHRUN=(torchrun --nnodes "$nodes" --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "${rdzv_host}:${MASTER_PORT}" --rdzv-id "$job_id"
    -m megatron_trillion.pretrain "${TRAIN_FLAGS[@]}" "${resume[@]}" --exit-signal-handler)
}

launch_pretrain() {
  : "${CKPT_DIR:?set CKPT_DIR (checkpoint directory, also the resume source)}"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    torchrun_command "${NUM_NODES}" "$(hostname)" dry-run
    printf '%q ' "${TORCHRUN[@]}"
    echo
    return 0
  fi
  : "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or set DRY_RUN=1)}"
  mkdir -p "$CKPT_DIR" "${REPO_DIR}/logs"
  local head_node
  head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  torchrun_command "$SLURM_JOB_NUM_NODES" "$head_node" "$SLURM_JOB_ID"
  local mounts="${CONTAINER_MOUNTS:-${DATA_DIR}:${DATA_DIR},${CKPT_DIR}:${CKPT_DIR}}"
  echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes x $GPUS_PER_NODE GPUs, rendezvous" \
       "$head_node:$MASTER_PORT, checkpoints $CKPT_DIR"

  REQUEUE=0
  trap 'on_pre_timeout' USR1
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 --no-container-mount-home \
    --container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" \
    --container-workdir="$CONTAINER_REPO" \
    bash "$CONTAINER_REPO/examples/common/launch.sh" node "${TORCHRUN[@]}" &
  SRUN_PID=$!
  local status=0
  # `wait` returns early when the trap runs; keep waiting until srun itself has exited.
  while kill -0 "$SRUN_PID" 2>/dev/null; do
    if wait "$SRUN_PID"; then status=0; else status=$?; fi
  done
  if [[ "$REQUEUE" == "1" ]]; then
    echo "pre-timeout signal: checkpoint saved (status $status); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}

on_pre_timeout() {
  REQUEUE=1
  # Signal the job step's tasks (the per-node wrappers below), not the batch shell.
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# Per-node wrapper (runs inside the container): torchrun's agent does not handle USR1, so the
# wrapper delivers it straight to the training processes torchrun started.
node_main() {
  "$@" &
  local agent=$! status=0
  trap 'pkill -USR1 -P "$agent" || true' USR1
  while kill -0 "$agent" 2>/dev/null; do
    if wait "$agent"; then status=0; else status=$?; fi
  done
  return "$status"
}

if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == "node" ]]; then
  shift
  node_main "$@"
fi
