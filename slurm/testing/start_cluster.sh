#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, private to one directory, for testing the
# sbatch templates for real.
#
#   start_cluster.sh DIR                     start it (or CLUSTER_DIR=DIR start_cluster.sh)
#   SLURM_CONF=DIR/slurm.conf sbatch ...     use it (client commands find it by SLURM_CONF)
#   STOP=1 start_cluster.sh DIR              stop its daemons (by the pids in DIR/run)
#   STOP=1 UNINSTALL=1 start_cluster.sh DIR  ... and remove the packages this start installed
#
# Why: the templates' failure modes (no srun, wrong --ntasks-per-node, requeue, resume) only
# show up under a real slurmctld/slurmd. Debian's Slurm 22.05 runs as a single-node cluster in
# a container without systemd or cgroups: proctrack/linuxproc, task/none, no cgroup.conf.
#
# Everything the cluster writes lives under DIR: slurm.conf, the munge key and socket, the pid
# files (DIR/run), the state and spool directories (DIR/state) and the logs (DIR/log); nothing
# in /etc, /run or /var. The daemons listen on the usual ports (6817/6818; SLURMCTLD_PORT and
# SLURMD_PORT change them) while they run.
#
# Packages: installs slurmctld, slurmd, slurm-client and munge with apt (needs root) when they
# are missing, and then lists every package that install added in DIR/installed-packages;
# `STOP=1 UNINSTALL=1` purges exactly those again. Packages that were already there are left.
#
# Start: waits until `sinfo` shows the node idle, then prints `export SLURM_CONF=...` on
# stdout. Exit status 0 = cluster ready; anything else = not usable here (tests skip on that;
# run STOP (and UNINSTALL) anyway, a failed start may have started or installed something).
set -euo pipefail

log() { echo "[start_cluster] $*" >&2; }
DIR=${1:-${CLUSTER_DIR:-}}
if [[ -z $DIR ]]; then
  echo "usage: [STOP=1 [UNINSTALL=1]] $0 DIR   (or CLUSTER_DIR=DIR $0)" >&2
  exit 2
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
RUN=$DIR/run
MUNGE=$DIR/munge
SOCKET=$MUNGE/munge.socket
LOGDIR=$DIR/log
STATE=$DIR/state
INSTALLED=$DIR/installed-packages
PACKAGES=(slurmctld slurmd slurm-client munge)
# Every daemon started here (and the slurmstepds slurmd forks) carries this in its
# environment, so STOP finds them by pid even where a pid file is missing.
MARK="DPG_TEST_CLUSTER=$DIR"
HOST=$(hostname -s)
export SLURM_CONF=$CONF

alive() {  # pid -> running (a zombie counts as gone)
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}
pidfile_pid() { [[ -s $1 ]] && cat "$1"; }
marked_pids() {  # the pids of processes started by this cluster
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ $p == "$$" ]] && continue
    { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | grep -xF "$MARK" >/dev/null && echo "$p"
  done
  return 0
}
stop_pids() {  # TERM the given pids, wait up to $1 s, then KILL what is left
  local wait_s=$1; shift
  local p left
  (( $# )) || return 0
  kill "$@" 2>/dev/null || true
  for _ in $(seq $(( wait_s * 10 ))); do
    left=(); for p in "$@"; do alive "$p" && left+=("$p"); done
    (( ${#left[@]} )) || return 0
    sleep 0.1
  done
  log "still alive after ${wait_s}s, SIGKILL: ${left[*]}"
  kill -9 "${left[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    left=(); for p in "$@"; do alive "$p" && left+=("$p"); done
    (( ${#left[@]} )) || return 0
    sleep 0.1
  done
  log "could not stop: ${left[*]}"
  return 1
}

if [[ "${STOP:-0}" == 1 ]]; then
  rc=0
  ctld=$(pidfile_pid "$RUN/slurmctld.pid" || true)
  if [[ -n $ctld ]] && alive "$ctld" && [[ -f $CONF ]]; then
    # Cancel what is still queued or running, so slurmstepd ends its tasks itself.
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
    fi
  fi
  slurm=()
  for f in slurmd slurmctld; do
    p=$(pidfile_pid "$RUN/$f.pid" || true)
    [[ -n $p ]] && alive "$p" && slurm+=("$p")
  done
  for p in $(marked_pids); do  # slurmstepd, slurmscriptd, a daemon without its pid file
    [[ $p == "$(pidfile_pid "$RUN/munged.pid" || true)" ]] || [[ " ${slurm[*]} " == *" $p "* ]] \
      || slurm+=("$p")
  done
  [[ ${#slurm[@]} -gt 0 ]] && log "stopping Slurm pids ${slurm[*]}"
  stop_pids 20 "${slurm[@]}" || rc=1
  munged=()
  for p in $( (pidfile_pid "$RUN/munged.pid" || true; marked_pids) | sort -u); do
    alive "$p" && munged+=("$p")
  done
  [[ ${#munged[@]} -gt 0 ]] && log "stopping munged pid(s) ${munged[*]}"
  stop_pids 10 "${munged[@]}" || rc=1
  left=$(marked_pids)
  if [[ -n $left ]]; then log "left running: $left"; rc=1; fi
  rm -f "$MUNGE/munge.key"  # the next start makes a new one
  [[ $rc == 0 ]] && log "stopped: no process of the cluster in $DIR is left"

  if [[ "${UNINSTALL:-0}" == 1 && -s $INSTALLED ]]; then
    if [[ $rc != 0 ]]; then
      log "not removing packages while the cluster's processes run"
      exit 1
    fi
    mapfile -t pkgs < "$INSTALLED"
    log "purging the packages start_cluster.sh installed: ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "${pkgs[@]}" >"$LOGDIR/apt-purge.log" 2>&1 \
      || { log "apt-get purge failed, see $LOGDIR/apt-purge.log"; exit 1; }
    mv "$INSTALLED" "$INSTALLED.removed"
  fi
  exit $rc
fi

if [[ $(id -u) != 0 ]]; then
  log "needs root (apt-get and the Slurm daemons); run it as root or with sudo"
  exit 2
fi
mkdir -p "$RUN" "$MUNGE" "$LOGDIR" "$STATE/ctld" "$STATE/d"
chmod 0700 "$DIR" "$MUNGE"
if (( ${#SOCKET} > 100 )); then
  log "munge socket path too long for a unix socket (${#SOCKET} chars): $SOCKET"
  exit 2
fi

# ---- packages
installed_set() {
  dpkg-query -W -f '${db:Status-Status} ${Package}:${Architecture}\n' 2>/dev/null \
    | awk '$1 == "installed" {print $2}' | sort
}
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    log "Slurm is not installed and there is no apt-get to install it"
    exit 2
  fi
  log "installing ${PACKAGES[*]} (apt-get)"
  before=$(installed_set)
  export DEBIAN_FRONTEND=noninteractive
  ok=1
  if ! apt-get install -y -q "${PACKAGES[@]}" >"$LOGDIR/apt-install.log" 2>&1; then
    apt-get update -q >>"$LOGDIR/apt-install.log" 2>&1 || true
    apt-get install -y -q "${PACKAGES[@]}" >>"$LOGDIR/apt-install.log" 2>&1 || ok=0
  fi
  # Record what this install added even when it failed half-way, so UNINSTALL removes it.
  comm -13 <(echo "$before") <(installed_set) > "$INSTALLED"
  log "installed $(wc -l < "$INSTALLED") packages (listed in $INSTALLED)"
  if [[ $ok != 1 ]]; then
    log "apt-get install failed, see $LOGDIR/apt-install.log"
    tail -n 5 "$LOGDIR/apt-install.log" >&2 || true
    exit 2
  fi
else
  log "Slurm and munge already installed; leaving the packages as they are"
fi

# ---- munge (authentication between the daemons and the client commands), private socket
running() { local p; p=$(pidfile_pid "$1") && alive "$p"; }
if [[ ! -s $MUNGE/munge.key ]]; then
  dd if=/dev/urandom of="$MUNGE/munge.key" bs=1 count=1024 status=none
  chmod 0400 "$MUNGE/munge.key"
fi
if ! running "$RUN/munged.pid"; then
  log "starting munged (socket $SOCKET)"
  env "$MARK" munged --force --key-file="$MUNGE/munge.key" --socket="$SOCKET" \
    --pid-file="$RUN/munged.pid" --log-file="$LOGDIR/munged.log" \
    --seed-file="$MUNGE/munged.seed" 2>>"$LOGDIR/start.err"
  for _ in $(seq 50); do munge -S "$SOCKET" -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null

# ---- slurm.conf for this host
CPUS=$(nproc --all)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
: > "$DIR/plugstack.conf"  # no SPANK plugins (not /etc/slurm/plugstack.conf)
NEW_CONF=$(cat <<CONFEOF
# Written by slurm/testing/start_cluster.sh: a one-node test cluster on $HOST, in $DIR.
ClusterName=dpgtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
PlugStackConfig=$DIR/plugstack.conf
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
)
restart=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
  echo "$NEW_CONF" > "$CONF"
  restart=1
fi

if [[ $restart == 1 ]]; then
  for f in slurmd slurmctld; do
    if running "$RUN/$f.pid"; then stop_pids 20 "$(cat "$RUN/$f.pid")"; fi
  done
fi
if ! running "$RUN/slurmctld.pid"; then
  log "starting slurmctld ($CPUS CPUs, ${MEM_MB} MB)"
  env "$MARK" slurmctld -s -f "$CONF" 2>>"$LOGDIR/start.err"
fi
if ! running "$RUN/slurmd.pid"; then
  log "starting slurmd"
  env "$MARK" slurmd -s -f "$CONF" 2>>"$LOGDIR/start.err"
fi

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in
    idle|mix|alloc)
      log "cluster ready: node $HOST is $state (pids: munged $(cat "$RUN/munged.pid")," \
          "slurmctld $(cat "$RUN/slurmctld.pid"), slurmd $(cat "$RUN/slurmd.pid"))"
      echo "export SLURM_CONF=$CONF"
      exit 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
log "the node never became idle (sinfo: '${state:-none}'); see $LOGDIR/*.log"
tail -n 20 "$LOGDIR"/*.log >&2 || true
exit 1
