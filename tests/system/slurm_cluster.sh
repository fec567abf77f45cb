#!/usr/bin/env bash
# A one-host Slurm cluster for the system tests: munged, slurmctld and two slurmd (virtual
# nodes vn1, vn2, NodeAddr 127.0.0.1), every file under DIR, no systemd needed.
#
#   eval "$(tests/system/slurm_cluster.sh up DIR)"   # prints `export SLURM_CONF=DIR/slurm.conf`
#   srun -N2 -n2 hostname
#   tests/system/slurm_cluster.sh down DIR           # stops the daemons by pid file, removes DIR's files
#
# `up` is idempotent (a running cluster is left alone) and returns once both nodes are idle.
# Ports: SLURM_PORT_BASE (ctld; slurmd at +1, +2), else the first free block from 16817.
# Needs the Debian packages slurmctld slurmd slurm-client munge (what .ci/run installs).
set -euo pipefail

NODES=(vn1 vn2)
DAEMONS=(munged slurmctld "${NODES[@]/#/slurmd-}")

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
CMD=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/slurm.conf
SOCK=$DIR/munge/munge.socket

pid_of() { cat "$DIR/$1.pid" 2>/dev/null || true; }
alive() {  # daemon name -> true if its pid file names a live process of that program
  local pid; pid=$(pid_of "$1")
  [[ -n $pid && -d /proc/$pid ]] && grep -q "^${1%%-*}" "/proc/$pid/comm" 2>/dev/null
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {
  local base=${SLURM_PORT_BASE:-16817}
  if [[ -z ${SLURM_PORT_BASE:-} ]]; then
    while port_busy "$base" || port_busy $((base + 1)) || port_busy $((base + 2)); do base=$((base + 10)); done
  fi
  echo "$base"
}

write_conf() {
  local base cpus host i
  base=$(pick_ports)
  cpus=$(( $(nproc) >= 2 ? 2 : 1 ))
  host=$(hostname -s)
  cat > "$CONF" <<EOF
# written by tests/system/slurm_cluster.sh
ClusterName=dmoetest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$base
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0
MinJobAge=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((base + 1 + i)) CPUs=$cpus" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

dump_logs() {
  local f
  for f in "$DIR"/*.log; do [[ -f $f ]] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }; done
}

# $1 seconds; rest: a command that must succeed
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    if (( SECONDS >= deadline )); then echo "slurm_cluster: timed out waiting for: $*" >&2; dump_logs; return 1; fi
    sleep 0.2
  done
}

all_idle() {
  local states
  states=$(SLURM_CONF=$CONF sinfo -h -N -o %t 2>/dev/null) || return 1
  [[ $(grep -c '^idle$' <<<"$states") -eq ${#NODES[@]} ]]
}

# stdin/stdout closed so that no daemon holds the caller's pipes open
daemon() {
  "$@" </dev/null >>"$DIR/start.log" 2>&1 && return 0
  echo "slurm_cluster: failed to start: $*" >&2; cat "$DIR/start.log" >&2; dump_logs; exit 1
}

up() {
  local d n up=1
  for d in "${DAEMONS[@]}"; do alive "$d" || up=0; done
  if (( up )) && SLURM_CONF=$CONF sinfo -h >/dev/null 2>&1; then echo "export SLURM_CONF=$CONF"; return 0; fi
  stop_all
  mkdir -p "$DIR/munge" "$DIR/state" && chmod 700 "$DIR/munge"
  [[ -f $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
  write_conf
  daemon munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCK" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/munged.log" --seed-file="$DIR/munge/seed"
  wait_for 10 test -S "$SOCK"
  daemon slurmctld -c -i -f "$CONF"
  for n in "${NODES[@]}"; do daemon slurmd -N "$n" -f "$CONF"; done
  wait_for 30 all_idle
  echo "export SLURM_CONF=$CONF"
}

stop_all() {
  local d pid
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then pid=$(pid_of "$d"); kill "$pid" 2>/dev/null || true; fi
  done
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d")
    if [[ -n $pid ]] && ! wait_for 10 bash -c "! grep -q '^${d%%-*}' /proc/$pid/comm 2>/dev/null"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$d.pid"
  done
}

down() {
  stop_all
  rm -rf "$DIR/munge" "$DIR/state" "$DIR"/spool-* "$CONF" "$DIR"/*.log "$DIR"/*.pid
  rmdir "$DIR" 2>/dev/null || true
}

case $CMD in
  up) up ;;
  down) down ;;
  *) usage ;;
esac
