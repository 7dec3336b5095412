#!/usr/bin/env bash
# A real one-node SLURM for the test suite and for trying `sslforge launch --slurm` on one machine.
#
#   scripts/ensure_slurm.sh [start]   install (Debian packages) + configure + start; idempotent
#   scripts/ensure_slurm.sh stop      stop the daemons this script started
#   scripts/ensure_slurm.sh status    exit 0 when the node answers in `sinfo`
#
# The cluster is made for containers and CI runners: no systemd, no cgroups (process tracking by
# parent pid), no accounting database. A slurm.conf this script did not write is never touched,
# and `stop` refuses to stop a cluster it does not manage. Run as root (installs and starts daemons).
set -euo pipefail

ACTION=${1:-start}
PARTITION=${SSLFORGE_SLURM_PARTITION:-cpu}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# managed by sslforge scripts/ensure_slurm.sh"
SPOOL=/var/spool/sslforge-slurm
LOGS=/var/log/slurm
READY_TIMEOUT_S=${SSLFORGE_SLURM_READY_TIMEOUT_S:-90}

log() { echo "ensure_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_state() {
    # State of this partition's node(s) as sinfo reports it ("idle", "mix", ...), empty if down.
    timeout 10 sinfo -h -p "$PARTITION" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true
}

usable() {
    case "$(node_state)" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

managed() { [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]} and not root: install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get on this machine"
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    if [ -f "$CONF" ] && ! managed; then
        log "keeping the existing $CONF (not written by sslforge)"
        return 0
    fi
    # Hardware as slurmd itself detects it, so the node never registers as "differs from config".
    local hw mem
    hw=$(slurmd -C | head -n1 | sed -E 's/ RealMemory=[0-9]+//')
    mem=$(slurmd -C | head -n1 | sed -nE 's/.*RealMemory=([0-9]+).*/\1/p')
    mem=$(( mem * 9 / 10 ))  # leave the OS some room; jobs asking for more are refused at submit
    mkdir -p "$CONF_DIR" "$SPOOL/ctld" "$SPOOL/d" "$LOGS"
    cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=sslforge
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container: track tasks by parent pid, no task binding, no job container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for an hour (there is no accounting database here).
MinJobAge=3600
KillWait=30
InactiveLimit=0
# Loopback addresses: a container's hostname need not resolve.
$hw NodeAddr=127.0.0.1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    if usable; then
        log "SLURM is up: partition $PARTITION is $(node_state)"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "SLURM is not running and starting it needs root"
    install_packages
    write_config
    start_munge
    running /run/slurmctld.pid || slurmctld
    running /run/slurmd.pid || slurmd
    local waited=0 state=""
    while [ "$waited" -lt "$READY_TIMEOUT_S" ]; do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc|comp) log "SLURM is up: partition $PARTITION is $state"; return 0 ;;
            down|drain|drng|fail) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
        waited=$((waited + 1))
    done
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    die "node not idle after ${READY_TIMEOUT_S}s (state '${state:-no answer}')"
}

stop() {
    managed || die "$CONF is not managed by sslforge; not stopping this cluster"
    scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and slurmd exit cleanly
    for pidfile in /run/slurmctld.pid /run/slurmd.pid; do
        for _ in $(seq 20); do running "$pidfile" || break; sleep 0.5; done
        if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    if running /run/munge/munged.pid; then kill "$(cat /run/munge/munged.pid)"; fi
    log "SLURM stopped"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) usable ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
