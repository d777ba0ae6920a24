#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests that submit the sbatch recipes
# (tests/test_slurm_jobs.py): Debian's slurm-wlm (22.05) and munge, a slurm.conf naming this
# host with its CPUs, and munged, slurmctld and slurmd started as root.
#
#   bash scripts/slurm_local.sh start   install what is missing, (re)write slurm.conf, start the
#                                       daemons that are not running, wait for the node to be idle
#   bash scripts/slurm_local.sh stop    stop the daemons (the packages and files stay)
#
# Both are idempotent: a second start finds everything running and only waits for the node.
# Needs root (or sudo) for apt, /etc and the daemons.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm/slurmctld
SPOOL=/var/lib/slurm/slurmd
LOGS=/var/log/slurm
MUNGE_RUN=/run/munge

if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -n -E bash "$0" "$@"
  fi
  echo "slurm_local.sh: needs root (or sudo) to install and start SLURM" >&2
  exit 1
fi

log() { echo "slurm_local: $*"; }

install_packages() {
  if command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 \
      && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    return
  fi
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local node cpus text
  node="$(hostname -s)"
  cpus="$(nproc --all)"
  # proctrack/linuxproc and task/none: no cgroups needed (containers, CI runners).
  # JobRequeue=1: batch jobs may be requeued (the recipes requeue themselves on the
  # pre-timeout signal). No accounting daemon: jobs are watched with squeue/scontrol.
  # cred_expire=20: a requeued job may start again 20 s after its last segment (default 120 s).
  # Starting it earlier (scontrol update StartTime=now) races the node's revocation of the old
  # segment's credential: slurmctld then kills it as "non-startable" and it is never requeued.
  text="ClusterName=local
SlurmctldHost=${node}
AuthType=auth/munge
AuthInfo=cred_expire=20
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${STATE}
SlurmdSpoolDir=${SPOOL}
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=30
NodeName=${node} CPUs=${cpus} State=UNKNOWN
PartitionName=local Nodes=${node} Default=YES MaxTime=INFINITE State=UP
"
  mkdir -p /etc/slurm "$STATE" "$SPOOL" "$LOGS"
  if [[ -f "$CONF" && "$(cat "$CONF")" == "${text%$'\n'}" ]]; then
    return 1  # unchanged
  fi
  printf '%s' "$text" > "$CONF"
  log "wrote $CONF (node ${node}, ${cpus} CPUs)"
}

munge_running() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
  if munge_running; then
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --force >/dev/null
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
  chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
  chmod 0755 "$MUNGE_RUN"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge_running && return
    sleep 0.2
  done
  echo "slurm_local.sh: munged did not start (see /var/log/munge/munged.log)" >&2
  exit 1
}

daemon_running() {  # pid file of a live process
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
  install_packages
  local changed=0
  if write_conf; then changed=1; fi
  start_munge
  if [[ "$changed" == 1 ]] && daemon_running /run/slurmctld.pid; then
    log "slurm.conf changed: reconfiguring"
    scontrol reconfigure
  fi
  if ! daemon_running /run/slurmctld.pid; then
    slurmctld
    log "started slurmctld"
  fi
  if ! daemon_running /run/slurmd.pid; then
    slurmd
    log "started slurmd"
  fi
  local node state
  node="$(hostname -s)"
  for _ in $(seq 120); do
    state="$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)"
    case "$state" in
      idle|mixed|allocated|completing) log "node $node is $state"; return 0 ;;
      down*|drain*|fail*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "slurm_local.sh: node $node not up after 60 s (state '${state}'); see $LOGS" >&2
  exit 1
}

stop() {
  if daemon_running /run/slurmctld.pid; then
    scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and slurmd
  fi
  local pidfile pid
  for pidfile in /run/slurmd.pid /run/slurmctld.pid "$MUNGE_RUN/munged.pid"; do
    if daemon_running "$pidfile"; then
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
    fi
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
