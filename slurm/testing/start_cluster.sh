#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, for testing the sbatch templates for real.
#
# Why: the templates' failure modes (no srun, wrong --ntasks-per-node, requeue, resume) only
# show up under a real slurmctld/slurmd. Debian's Slurm 22.05 runs as a single-node cluster in
# a container without systemd or cgroups: proctrack/linuxproc, task/none, no cgroup.conf.
#
# Idempotent: installs the packages if missing (apt, needs root), writes /etc/slurm/slurm.conf
# for this host with its real CPU count and memory, starts munge, slurmctld and slurmd, and
# waits until `sinfo` shows the node idle. Exit status 0 = cluster ready; anything else = not
# usable here (tests skip on that). `STOP=1 start_cluster.sh` stops the daemons instead.
set -euo pipefail

log() { echo "[start_cluster] $*" >&2; }
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
HOST=$(hostname -s)
SPOOL=/var/spool/slurm-test
LOGDIR=/var/log/slurm-test

if [[ "${STOP:-0}" == 1 ]]; then
  for pidfile in /run/slurmd-test.pid /run/slurmctld-test.pid /run/munge/munged.pid; do
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  log "stopped slurmd, slurmctld and munged"
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  log "needs root (apt-get and the Slurm daemons); run it as root or with sudo"
  exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
  fi
fi

# ---- munge (authentication between the daemons and the client commands)
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating a munge key"
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! munge -n >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- munged 2>/dev/null || munged --force
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

# ---- slurm.conf for this host
CPUS=$(nproc --all)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p "$CONF_DIR" "$SPOOL/ctld" "$SPOOL/d" "$LOGDIR"
NEW_CONF=$(cat <<CONFEOF
# Written by slurm/testing/start_cluster.sh: a one-node test cluster on $HOST.
ClusterName=dpgtest
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
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
SlurmctldPidFile=/run/slurmctld-test.pid
SlurmdPidFile=/run/slurmd-test.pid
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
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

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [[ $restart == 1 ]]; then
  for pidfile in /run/slurmd-test.pid /run/slurmctld-test.pid; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; sleep 1; fi
  done
fi
if ! running /run/slurmctld-test.pid; then
  log "starting slurmctld ($CPUS CPUs, ${MEM_MB} MB)"
  slurmctld -c 2>>"$LOGDIR/start.err" || slurmctld 2>>"$LOGDIR/start.err"
fi
if ! running /run/slurmd-test.pid; then
  log "starting slurmd"
  slurmd 2>>"$LOGDIR/start.err"
fi

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in
    idle|mix|alloc) log "cluster ready: node $HOST is $state"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
log "the node never became idle (sinfo: '${state:-none}'); see $LOGDIR/*.log"
tail -n 20 "$LOGDIR"/*.log >&2 || true
exit 1
