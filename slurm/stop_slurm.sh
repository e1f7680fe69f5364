#!/usr/bin/env bash
# stop_slurm.sh - stop the one-node Slurm cluster that start_slurm.sh started. Only the pids in
# $HPCDDF_SLURM_DIR/run/*.pid are signalled, and only if /proc/<pid>/comm names the expected
# daemon; a munged (or anything else) that start_slurm.sh found already running is left alone,
# and so is a pid file whose process runs as another program (only a stale one is removed).
#
#   --keep-jobs  do not scancel queued/running jobs first (they resume after the next start)
#   --purge      also delete Slurm state, spool, logs, the MariaDB data dir and the sacct shim
#                (the next start is from scratch, with a new random FirstJobId)
#
# Env: HPCDDF_SLURM_DIR (default /var/tmp/hpcddf-slurm), as for start_slurm.sh.
set -uo pipefail

BASE=${HPCDDF_SLURM_DIR:-/var/tmp/hpcddf-slurm}
RUN=$BASE/run
KEEP_JOBS=0
PURGE=0
for a in "$@"; do
  case $a in
    --keep-jobs) KEEP_JOBS=1 ;;
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "stop_slurm.sh: unknown argument $a (use --keep-jobs, --purge)" >&2; exit 2 ;;
  esac
done
log() { echo "[stop_slurm] $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
case $BASE in /*) ;; *) log "HPCDDF_SLURM_DIR must be an absolute path: $BASE"; exit 1 ;; esac

# running PID: the process exists and is not a zombie (the PID 1 of a container may reap late)
running() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ -n "$st" ] && [ "${st%% *}" != Z ] && [ "${st%% *}" != X ]
}
# alive PIDFILE COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# stop_pid PIDFILE COMM: SIGTERM, wait up to 30 s, then SIGKILL
stop_pid() {
  local f=$1 comm=$2 pid i t0
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if alive "$f" "$comm"; then
    t0=${EPOCHREALTIME/[.,]/}
    kill -TERM "$pid"
    for ((i = 0; i < 120; i++)); do running "$pid" || break; sleep 0.25; done
    if running "$pid"; then
      log "$comm ($pid) did not exit after 30 s, SIGKILL"
      kill -KILL "$pid"
    fi
    log "stopped $comm ($pid) in $(((${EPOCHREALTIME/[.,]/} - t0) / 1000)) ms"
  elif running "$pid"; then  # another daemon's file, or a reused pid: not ours to stop or forget
    log "$comm: pid $pid from $f is $(cat "/proc/$pid/comm" 2>/dev/null), not $comm: left alone"
    return 0
  else
    log "$comm: pid $pid from $f is not running (stale pid file removed)"
  fi
  rm -f "$f"
}

if [ "$KEEP_JOBS" = 0 ] && alive "$RUN/slurmctld.pid" slurmctld; then
  mapfile -t ids < <(squeue -h -o %A 2>/dev/null | sort -u)
  if [ ${#ids[@]} -gt 0 ]; then
    log "cancelling jobs: ${ids[*]}"
    scancel "${ids[@]}" 2>/dev/null
    for ((i = 0; i < 60; i++)); do
      [ -z "$(squeue -h 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi
for f in "$RUN"/slurmd*.pid; do  # slurmd.pid, slurmd-<node>.pid; not slurmdbd.pid (stopped below)
  [ "$f" = "$RUN/slurmdbd.pid" ] || stop_pid "$f" slurmd
done
stop_pid "$RUN/slurmctld.pid" slurmctld
stop_pid "$RUN/slurmdbd.pid" slurmdbd
stop_pid "$RUN/mysql/mysqld.pid" mariadbd
stop_pid "$RUN/munged.pid" munged

if [ "$PURGE" = 1 ]; then
  log "purging state under $BASE"
  rm -rf "${BASE:?}/state" "${BASE:?}/spool" "${BASE:?}/mysql" "${BASE:?}/log" "${BASE:?}/bin" "${RUN:?}"
fi
exit 0
