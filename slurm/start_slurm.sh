#!/usr/bin/env bash
# start_slurm.sh - install and start a real one-node Slurm cluster on this machine, for hpcddf's
# integration tests and CI (Debian 12 / Slurm 22.05, run as root, no systemd, no cgroups).
#
# Idempotent: daemons that are already running are left alone and only what is missing is
# started. If the generated slurm.conf differs from the one in /etc/slurm (a knob changed),
# slurmctld and slurmd are restarted so both read the same file.
#
# Env knobs:
#   HPCDDF_SLURM_DIR          state/spool/log/pid/MariaDB dir (absolute)  default /var/tmp/hpcddf-slurm
#   HPCDDF_SLURM_ACCOUNTING   1: slurmdbd + private MariaDB on 127.0.0.1:3307, `sacct` works  (default 1)
#                             0: no database; plain `sacct` fails, so a shim
#                                $HPCDDF_SLURM_DIR/bin/sacct (= `sacct --completion`, finished jobs
#                                only) is written; put that dir first in PATH
#   HPCDDF_SLURM_CPUS         advertise this many CPUs instead of the real ones, so that several
#                             1-CPU test jobs run at once (SlurmdParameters=config_overrides)
#                             (default: the real count from `slurmd -C`)
#   HPCDDF_SLURM_CRED_EXPIRE  AuthInfo cred_expire in s; a requeued job may restart cred_expire+1 s
#                             after the requeue (Slurm's default is 120)   (default 10)
#   HPCDDF_SLURM_SMOKE        1: finish with an `srun hostname` smoke test  (default 1)
#   HPCDDF_SLURM_MAX_ARRAY_SIZE  MaxArraySize: small, so that hpcddf's splitting of arrays
#                             is exercised by every test that submits more tasks  (default 10)
#   HPCDDF_SLURM_SPARE        1: a second node "spare" (its own slurmd on port 6828, same machine)
#                             alone in partition "lossy", for tests that lose a node without
#                             killing the jobs of every other test  (default 1)
#
# Daemon pids go to $HPCDDF_SLURM_DIR/run/*.pid; stop_slurm.sh stops only those.
set -euo pipefail

BASE=${HPCDDF_SLURM_DIR:-/var/tmp/hpcddf-slurm}
ACCT=${HPCDDF_SLURM_ACCOUNTING:-1}
SMOKE=${HPCDDF_SLURM_SMOKE:-1}
SPARE=${HPCDDF_SLURM_SPARE:-1}
MAX_ARRAY=${HPCDDF_SLURM_MAX_ARRAY_SIZE:-10}
CPUS_OVERRIDE=${HPCDDF_SLURM_CPUS:-}
CRED_EXPIRE=${HPCDDF_SLURM_CRED_EXPIRE:-10}
RUN=$BASE/run
LOG=$BASE/log
DBPORT=3307   # private MariaDB; does not clash with a system MariaDB on 3306
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf

log() { echo "[start_slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# running PID: the process exists and is not a zombie (the PID 1 of a container may reap late)
running() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ -n "$st" ] && [ "${st%% *}" != Z ] && [ "${st%% *}" != X ]
}
# alive PIDFILE COMM: the pid in PIDFILE runs and really is COMM (guards against reused pids)
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.25 s
wait_for() {
  local t=$1 what=$2 i
  shift 2
  for ((i = 0; i < t * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  log "timeout after ${t}s waiting for $what"
  return 1
}
# stop_ours PIDFILE COMM: TERM the daemon we started and wait for it to exit
stop_ours() {
  local pid i
  alive "$1" "$2" || return 0
  pid=$(cat "$1")
  kill -TERM "$pid"
  for ((i = 0; i < 80; i++)); do running "$pid" || break; sleep 0.25; done
  running "$pid" && { log "$2 ($pid) ignored SIGTERM, SIGKILL"; kill -KILL "$pid"; }
  rm -f "$1"
}
# install_if_changed FILE MODE CONTENT: write FILE atomically when CONTENT differs; 0 if written
install_if_changed() {
  local f=$1 mode=$2 content=$3
  if [ -f "$f" ] && [ "$(cat "$f")" = "$content" ]; then return 1; fi
  [ -f "$f" ] && cp -p "$f" "$f.bak"
  (umask 077 && printf '%s\n' "$content" >"$f.tmp")
  chmod "$mode" "$f.tmp"
  mv -f "$f.tmp" "$f"
}

# ---------------------------------------------------------------- 0. checks, lock
[ "$(id -u)" = 0 ] || die "must run as root"
case $BASE in /*) ;; *) die "HPCDDF_SLURM_DIR must be an absolute path: $BASE" ;; esac
case $ACCT in 0 | 1) ;; *) die "HPCDDF_SLURM_ACCOUNTING must be 0 or 1: $ACCT" ;; esac
case $SMOKE in 0 | 1) ;; *) die "HPCDDF_SLURM_SMOKE must be 0 or 1: $SMOKE" ;; esac
case $SPARE in 0 | 1) ;; *) die "HPCDDF_SLURM_SPARE must be 0 or 1: $SPARE" ;; esac
[[ $MAX_ARRAY =~ ^[1-9][0-9]*$ ]] || die "HPCDDF_SLURM_MAX_ARRAY_SIZE must be a positive integer: $MAX_ARRAY"
[[ $CRED_EXPIRE =~ ^[1-9][0-9]*$ ]] || die "HPCDDF_SLURM_CRED_EXPIRE must be a positive integer: $CRED_EXPIRE"
[[ -z $CPUS_OVERRIDE || $CPUS_OVERRIDE =~ ^[1-9][0-9]*$ ]] \
  || die "HPCDDF_SLURM_CPUS must be a positive integer: $CPUS_OVERRIDE"

mkdir -p "$BASE/state" "$BASE/spool" "$RUN" "$LOG" /etc/slurm
chmod 755 "$BASE" "$RUN" "$LOG"
# fd 9 holds the lock; every daemon is started with 9>&- so it does not inherit (and keep) it
exec 9>"$RUN/start.lock"
flock -w 900 9 || die "another start_slurm.sh holds $RUN/start.lock"

# ---------------------------------------------------------------- 1. packages
pkgs=(munge slurmctld slurmd slurm-client)
[ "$ACCT" = 1 ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]} (log: $LOG/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d in container images stops postinst from starting services; we start them below.
  { apt-get -o DPkg::Lock::Timeout=600 update -q \
      && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"; } \
    >"$LOG/apt.log" 2>&1 || { tail -30 "$LOG/apt.log" >&2; die "apt-get failed"; }
fi

# ---------------------------------------------------------------- 2. host name, node shape
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
  log "adding $HOST to /etc/hosts"
  echo "127.0.0.1 $HOST" >>/etc/hosts
fi
# `slurmd -C` prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
HW=$(slurmd -C | head -1)
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
[ -n "$MEM" ] || die "cannot parse 'slurmd -C': $HW"
MEM=$((MEM * 90 / 100))
SHAPE=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$HW")
SLURMD_PARAMS=""
if [ -n "$CPUS_OVERRIDE" ]; then
  SHAPE="CPUs=$CPUS_OVERRIDE Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS_OVERRIDE ThreadsPerCore=1"
  SLURMD_PARAMS="SlurmdParameters=config_overrides"
fi

# ---------------------------------------------------------------- 3. config files
# Job ids restart at 1 whenever the state dir is wiped, and anything keyed on the job id (e.g. a
# reused submitit folder ".../%j") would silently pick up results of an older cluster. So each
# fresh state dir gets a random FirstJobId, kept there so it is stable across restarts.
if [ ! -s "$BASE/state/hpcddf_first_job_id" ]; then
  echo $(((RANDOM * 32768 + RANDOM) % 50000000 + 1000)) >"$BASE/state/hpcddf_first_job_id"
fi
FIRST_JOB_ID=$(cat "$BASE/state/hpcddf_first_job_id")
if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
SPARE_LINES=""
if [ "$SPARE" = 1 ]; then
  # a node of its own (own port, spool, pid and log files via %n) that a test may lose
  SPARE_LINES="NodeName=spare NodeHostname=spare NodeAddr=127.0.0.1 Port=6828 $SHAPE RealMemory=$MEM State=UNKNOWN
PartitionName=lossy Nodes=spare Default=NO MaxTime=INFINITE State=UP DefMemPerCPU=1024"
fi
SLURM_CONF_TEXT=$(
  cat <<CONF_EOF
# generated by hpcddf slurm/start_slurm.sh - edits are overwritten
ClusterName=hpcddf
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire+1 s after the requeue (default 120 s)
AuthInfo=cred_expire=$CRED_EXPIRE
MailProg=/bin/true
$SLURMD_PARAMS
MpiDefault=none
# no cgroups and no systemd needed (so memory/CPU limits are NOT enforced; time limits are)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
$ACCT_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
# batch jobs are requeueable by default (scontrol requeue, node failure)
JobRequeue=1
SchedulerType=sched/backfill
# schedule often: one node, many short test jobs
SchedulerParameters=sched_interval=5,bf_interval=5,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
FirstJobId=$FIRST_JOB_ID
# keep finished jobs visible to squeue/scontrol for 5 min
MinJobAge=300
KillWait=5
InactiveLimit=0
# sites cap arrays (the default is 1001): a small cap makes hpcddf split its arrays in tests
MaxArraySize=$MAX_ARRAY
NodeName=$HOST NodeAddr=127.0.0.1 $SHAPE RealMemory=$MEM State=UNKNOWN
# without DefMemPerCPU a job that asks for no memory gets the whole node (one job at a time)
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
$SPARE_LINES
CONF_EOF
)
CONF_CHANGED=0
install_if_changed "$CONF" 644 "$SLURM_CONF_TEXT" && CONF_CHANGED=1

DBD_CHANGED=0
if [ "$ACCT" = 1 ]; then
  DBD_CONF_TEXT=$(
    cat <<CONF_EOF
# generated by hpcddf slurm/start_slurm.sh - edits are overwritten
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF_EOF
  )
  # slurmdbd refuses a slurmdbd.conf that others can read
  install_if_changed "$DBDCONF" 600 "$DBD_CONF_TEXT" && DBD_CHANGED=1
else
  mkdir -p "$BASE/bin"
  cat >"$BASE/bin/sacct" <<'SHIM_EOF'
#!/bin/sh
# no slurmdbd: answer from the jobcomp/filetxt log (finished jobs only)
exec /usr/bin/sacct --completion "$@"
SHIM_EOF
  chmod 755 "$BASE/bin" "$BASE/bin/sacct"
fi

# ---------------------------------------------------------------- 4. munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  alive "$RUN/munged.pid" munged || log "munged already running, not started by this script: leaving it alone"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 9>&-
  wait_for 10 munged sh -c 'munge -n | unmunge' || die "munged did not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$RUN/munged.pid"
  log "munged started (pid $(cat "$RUN/munged.pid"))"
fi

# ---------------------------------------------------------------- 5. MariaDB + slurmdbd
if [ "$ACCT" = 1 ]; then
  DB=$BASE/mysql
  DBRUN=$RUN/mysql
  SOCK=$DBRUN/mysqld.sock
  mkdir -p "$DBRUN"
  chown mysql:mysql "$DBRUN"
  if [ ! -d "$DB/mysql" ]; then
    mkdir -p "$DB"
    chown mysql:mysql "$DB"
    chmod 750 "$DB"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB" \
      --auth-root-authentication-method=socket >"$LOG/mysql_install.log" 2>&1 \
      || die "mariadb-install-db failed (see $LOG/mysql_install.log)"
  fi
  if ! alive "$DBRUN/mysqld.pid" mariadbd; then
    touch "$LOG/mysqld.log"
    chown mysql:mysql "$LOG/mysqld.log" # mariadbd runs as mysql and cannot create files in $LOG
    nohup /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$SOCK" \
      --port=$DBPORT --bind-address=127.0.0.1 --pid-file="$DBRUN/mysqld.pid" \
      --log-error="$LOG/mysqld.log" --innodb-buffer-pool-size=256M \
      --innodb-lock-wait-timeout=900 --innodb-buffer-pool-dump-at-shutdown=0 \
      --innodb-buffer-pool-load-at-startup=0 </dev/null >/dev/null 2>&1 9>&- &
    wait_for 60 mariadb mariadb-admin --socket="$SOCK" ping || die "mariadb did not start (see $LOG/mysqld.log)"
    wait_for 10 "mariadb pid file" test -s "$DBRUN/mysqld.pid" || die "no $DBRUN/mysqld.pid"
    log "mariadb started on 127.0.0.1:$DBPORT (pid $(cat "$DBRUN/mysqld.pid"))"
  fi
  if [ ! -e "$DB/.hpcddf_grants" ]; then
    mariadb --socket="$SOCK" -e "
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
      FLUSH PRIVILEGES;"
    touch "$DB/.hpcddf_grants"
  fi
  if [ "$DBD_CHANGED" = 1 ] && alive "$RUN/slurmdbd.pid" slurmdbd; then
    log "slurmdbd.conf changed: restarting slurmdbd"
    stop_ours "$RUN/slurmdbd.pid" slurmdbd
  fi
  if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    /usr/sbin/slurmdbd 9>&- # daemonizes, writes PidFile
    wait_for 60 slurmdbd sacctmgr -n show cluster || die "slurmdbd did not answer (see $LOG/slurmdbd.log)"
    log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
  fi
fi

# ---------------------------------------------------------------- 6. slurmctld + slurmd
# slurmctld and slurmd must read the same slurm.conf ("appears to have a different slurm.conf")
NODES=("$HOST")
[ "$SPARE" = 1 ] && NODES+=(spare)
# slurmd_alive: any slurmd of ours still running (slurmd.pid: the name before the spare node)
slurmd_alive() {
  local f
  for f in "$RUN"/slurmd*.pid; do alive "$f" slurmd && return 0; done
  return 1
}
if [ "$CONF_CHANGED" = 1 ] && { alive "$RUN/slurmctld.pid" slurmctld || slurmd_alive; }; then
  log "slurm.conf changed: restarting slurmctld and slurmd (old file: $CONF.bak)"
  for f in "$RUN"/slurmd*.pid; do stop_ours "$f" slurmd; done
  stop_ours "$RUN/slurmctld.pid" slurmctld
fi
# A fresh slurmdbd may answer sacctmgr before it can hand slurmctld its TRES ("fatal: You are
# running with a database but for some reason we have no TRES from it"): try again.
for try in 1 2 3; do
  alive "$RUN/slurmctld.pid" slurmctld && break
  /usr/sbin/slurmctld 9>&- # daemonizes; jobs and ids survive restarts in $BASE/state
  if wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP'; then
    log "slurmctld started (pid $(cat "$RUN/slurmctld.pid"))"
    break
  fi
  [ "$try" = 3 ] && die "slurmctld did not answer (see $LOG/slurmctld.log)"
  log "slurmctld did not come up (try $try): $(tail -n 1 "$LOG/slurmctld.log"); again in 5 s"
  sleep 5
done
for node in "${NODES[@]}"; do
  pidf=$RUN/slurmd-$node.pid
  alive "$pidf" slurmd && continue
  mkdir -p "$BASE/spool/$node"
  if [ "$node" = "$HOST" ]; then /usr/sbin/slurmd 9>&-; else /usr/sbin/slurmd -N "$node" 9>&-; fi
  wait_for 10 "slurmd pid file" test -s "$pidf" || die "slurmd of $node did not start (see $LOG/slurmd-$node.log)"
  log "slurmd of $node started (pid $(cat "$pidf"))"
done
# jobs only start on a node that is idle/mixed/allocated and responding (no '*' suffix)
node_ok() { sinfo -h -n "$1" -o %T | grep -Eqx '(idle|mixed|allocated|completing)'; }
for node in "${NODES[@]}"; do
  wait_for 20 "node $node to be idle" node_ok "$node" && continue
  log "node state: $(sinfo -h -n "$node" -o '%T %E'); resuming it"
  scontrol update nodename="$node" state=resume || true
  wait_for 15 "node $node after resume" node_ok "$node" || die "node $node not usable (see $LOG/slurmd-$node.log)"
done
sinfo
if [ "$SMOKE" = 1 ]; then
  out=$(timeout 60 srun -t 1 -N1 -n1 hostname) || die "srun smoke test failed"
  log "srun smoke test ok: $out"
fi
[ "$ACCT" = 1 ] || log "accounting off: for sacct (submitit) use PATH=$BASE/bin:\$PATH"
log "cluster ready (state dir $BASE)"
