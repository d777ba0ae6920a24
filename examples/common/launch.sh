#!/usr/bin/env bash
# Shared launch logic of the examples/*/*.sbatch recipes. A recipe sets TRAIN_FLAGS (an array
# of megatron_trillion.pretrain flags, without --save/--load) and sources this file, then calls
#   launch_pretrain
# which
#   * resumes automatically: --save and --load are both $CKPT_DIR, so a requeued job continues
#     from the newest complete checkpoint (an empty $CKPT_DIR starts at iteration 0; a save
#     that did not finish is ignored). A recipe that starts from another run's weights sets
#     INIT_CHECKPOINT: used (--load it --finetune) only while $CKPT_DIR holds no checkpoint yet;
#   * runs one `torchrun` per node through `srun`, with c10d rendezvous on the first node of
#     the allocation (a new rendezvous id for every restart of the job), in one of two modes:
#       container  inside the image with pyxis/enroot (CONTAINER_IMAGE, the default);
#       bare       no container (CONTAINER_IMAGE=none, or VENV set): the cluster's own Python
#                  environment, the virtualenv VENV if set, else the one the job was submitted
#                  from (sbatch passes the environment on; `torchrun` must be on PATH);
#   * requeues on the pre-timeout signal: `#SBATCH --signal=B:USR1@<seconds>` delivers USR1 to
#     the batch shell, which forwards it to the training processes (--exit-signal-handler makes
#     them save a checkpoint at the next step and exit 0) and then `scontrol requeue`s the job.
#     `scancel --signal=USR1 <job>` (the job's steps) does the same. A segment that fails is
#     requeued (to resume from the last checkpoint) only while the job has been restarted
#     fewer than MAX_RESTARTS times; then the job ends with the failure, saying so.
# The job log says the mode, and every segment starts with the restart it is and the
# checkpoint it resumes from (the recipes log with --open-mode=append, so requeues keep the
# earlier segments' lines).
# With DRY_RUN=1 nothing is launched: the exact torchrun command of one node is printed (no
# SLURM, no container, no GPU needed).
#
# Variables (environment overrides the recipe's defaults):
#   EXTRA_ARGS         pretrain flags appended after the recipe's (a later flag wins), e.g.
#                      a tiny CPU run of any recipe (see README "GPU clusters")
#   CONTAINER_IMAGE    enroot image / squashfs (default: the Dockerfile's image, built and
#                      imported as megatron-trillion.sqsh next to the repo); `none`: bare mode
#   CONTAINER_MOUNTS   pyxis --container-mounts (default: DATA_DIR and CKPT_DIR at the same paths)
#   CONTAINER_REPO     the repository inside the container (default: the image's copy)
#   VENV               bare mode: a virtualenv to activate on every node
#   GPUS_PER_NODE      processes per node, default 8 (gloo where there is no GPU)
#   MASTER_PORT        default 29500;  MAX_RESTARTS  default 3
#   NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...  site-specific NCCL settings are passed through

set -euo pipefail

# Under sbatch the script runs from a spool copy: submit from the repository root.
if [[ -n "${SLURM_JOB_ID:-}" && -z "${REPO_DIR:-}" ]]; then
  REPO_DIR="${SLURM_SUBMIT_DIR}"
fi
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
if [[ -n "${VENV:-}" && -z "${CONTAINER_IMAGE:-}" ]]; then
  CONTAINER_IMAGE=none
fi
CONTAINER_IMAGE="${CONTAINER_IMAGE:-${REPO_DIR}/megatron-trillion.sqsh}"
CONTAINER_REPO="${CONTAINER_REPO:-/opt/megatron-trillion}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

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

# The newest complete checkpoint's iteration (checkpointing.py's tracker file, rewritten only
# once a save is complete); empty when there is none.
checkpoint_iteration() {
  local tracker="$1/latest_checkpointed_iteration.txt"
  if [[ -f "$tracker" ]]; then cat "$tracker"; fi
}

has_checkpoint() {
  [[ -n "$(checkpoint_iteration "$1")" ]]
}

# The torchrun command one node runs (same on every node: c10d rendezvous assigns node ranks).
# EXTRA_ARGS come last: argparse keeps the last value of a repeated flag (Megatron-LM's habit).
torchrun_command() {
  local nodes="$1" rdzv_host="$2" rdzv_id="$3"
  local resume=(--save "$CKPT_DIR" --load "$CKPT_DIR")
  if [[ -n "${INIT_CHECKPOINT:-}" ]] && ! has_checkpoint "$CKPT_DIR"; then
    resume=(--save "$CKPT_DIR" --load "$INIT_CHECKPOINT" --finetune)
  fi
  TORCHRUN=(torchrun --nnodes "$nodes" --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "${rdzv_host}:${MASTER_PORT}" --rdzv-id "$rdzv_id"
    -m megatron_trillion.pretrain "${TRAIN_FLAGS[@]}" "${resume[@]}" --exit-signal-handler
    "${EXTRA[@]}")
}

# One line at the start of every segment of the job: which restart, and where it starts from.
segment_line() {
  local restart="${SLURM_RESTART_COUNT:-0}" iteration partial from
  iteration="$(checkpoint_iteration "$CKPT_DIR")"
  if [[ -n "$iteration" ]]; then
    from="resumes from checkpoint iteration $iteration in $CKPT_DIR"
  elif [[ -n "${INIT_CHECKPOINT:-}" ]]; then
    from="starts from $INIT_CHECKPOINT (weights only, --finetune); checkpoints go to $CKPT_DIR"
  else
    from="starts at iteration 0 (no checkpoint in $CKPT_DIR)"
  fi
  for partial in "$CKPT_DIR"/iter_*.partial; do
    if [[ -d "$partial" ]]; then
      from+="; ignoring the incomplete save $(basename "$partial")"
    fi
  done
  echo "job $SLURM_JOB_ID restart $restart (SLURM_RESTART_COUNT=$restart): $from"
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
  segment_line
  torchrun_command "$SLURM_JOB_NUM_NODES" "$head_node" \
    "${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
  local step=()
  if [[ "$CONTAINER_IMAGE" == "none" ]]; then
    if [[ -n "${VENV:-}" ]]; then
      # shellcheck source=/dev/null
      source "${VENV}/bin/activate"  # srun passes the environment on to every node
    fi
    if ! command -v torchrun >/dev/null; then
      echo "bare mode: no torchrun on PATH (set VENV=<virtualenv> or submit from an" \
           "activated environment)" >&2
      return 1
    fi
    echo "launch mode: bare (no container), $(command -v python)," \
         "repository $REPO_DIR"
    step=(bash "$REPO_DIR/examples/common/launch.sh" node "${TORCHRUN[@]}")
  else
    if [[ -n "${VENV:-}" ]]; then
      echo "VENV is for the bare mode; with CONTAINER_IMAGE=$CONTAINER_IMAGE the image's" \
           "Python runs (unset one of them)" >&2
      return 1
    fi
    local mounts="${CONTAINER_MOUNTS:-${DATA_DIR}:${DATA_DIR},${CKPT_DIR}:${CKPT_DIR}}"
    echo "launch mode: container $CONTAINER_IMAGE (pyxis), repository $CONTAINER_REPO"
    step=(--no-container-mount-home --container-image="$CONTAINER_IMAGE"
      --container-mounts="$mounts" --container-workdir="$CONTAINER_REPO"
      bash "$CONTAINER_REPO/examples/common/launch.sh" node "${TORCHRUN[@]}")
  fi
  echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes x $GPUS_PER_NODE processes, rendezvous" \
       "$head_node:$MASTER_PORT, checkpoints $CKPT_DIR"

  REQUEUE=0
  # A USR1 sent to the job's steps rather than to this shell leaves this mark (CKPT_DIR is
  # shared by all nodes), so both ways of signalling end the same way.
  export EXIT_SIGNAL_MARK="$CKPT_DIR/.exit-signal-$SLURM_JOB_ID"
  rm -f "$EXIT_SIGNAL_MARK"
  trap 'on_pre_timeout' USR1
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${step[@]}" &
  SRUN_PID=$!
  local status=0
  if wait_for "$SRUN_PID"; then status=0; else status=$?; fi
  if [[ -e "$EXIT_SIGNAL_MARK" ]]; then
    REQUEUE=1
    rm -f "$EXIT_SIGNAL_MARK"
  fi
  finish_segment "$status"
}

# After the job step: requeue (resume later) or end the job with the step's status.
finish_segment() {
  local status="$1" restarts="${SLURM_RESTART_COUNT:-0}" iteration
  iteration="$(checkpoint_iteration "$CKPT_DIR")"
  if [[ "$REQUEUE" == "1" && "$status" == "0" ]]; then
    echo "pre-timeout signal: checkpoint iteration ${iteration:-none} saved; requeueing job" \
         "$SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  if [[ "$status" == "0" ]]; then
    echo "job $SLURM_JOB_ID finished: checkpoint iteration ${iteration:-none} in $CKPT_DIR"
    return 0
  fi
  if (( restarts < MAX_RESTARTS )); then
    echo "training failed (status $status): requeueing job $SLURM_JOB_ID to resume from" \
         "checkpoint iteration ${iteration:-none} (restart $((restarts + 1)) of at most" \
         "MAX_RESTARTS=$MAX_RESTARTS)"
    scontrol requeue "$SLURM_JOB_ID"
    return "$status"
  fi
  echo "training failed (status $status) and job $SLURM_JOB_ID has been restarted $restarts" \
       "times (MAX_RESTARTS=$MAX_RESTARTS): not requeued; the last checkpoint is iteration" \
       "${iteration:-none} in $CKPT_DIR"
  return "$status"
}

# The exit status of background process $1. A trap that runs during `wait` makes it return
# 128 + the signal at once, while the process may still run (so wait again), or may have ended
# meanwhile: then only a last `wait` gives its own status, which bash keeps for it.
wait_for() {
  while kill -0 "$1" 2>/dev/null; do
    wait "$1" || true
  done
  wait "$1"
}

on_pre_timeout() {
  REQUEUE=1
  # Signal the job step's tasks (the per-node wrappers below), not the batch shell.
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# Per-node wrapper (runs inside the container in container mode): torchrun's agent does not
# handle USR1 (it would die of it), so the agent starts with USR1 ignored and the wrapper
# delivers it straight to the training processes torchrun started (each installs its handler
# over the inherited "ignore"). `scancel --signal=USR1 <job>` signals every process of the job
# step, the agent included.
node_main() {
  trap '' USR1
  "$@" &
  local agent=$! status=0
  trap 'on_node_signal "$agent"' USR1
  if wait_for "$agent"; then status=0; else status=$?; fi
  return "$status"
}

on_node_signal() {
  touch "$EXIT_SIGNAL_MARK" 2>/dev/null || true
  pkill -USR1 -P "$1" || true
}

if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == "node" ]]; then
  shift
  node_main "$@"
fi
