#!/usr/bin/env bash
# A real SLURM cluster of N nodes (node1..nodeN) on this one machine, for the tests and for trying the
# launchers: one slurmctld plus N `slurmd -N nodeX`, all on 127.0.0.1, each slurmd on its own port.
#
#   sudo bash slurm/local/start.sh [N=2]     # idempotent: returns at once when these N nodes are up
#   bash slurm/local/stop.sh
#
# All state (slurm.conf, spool, state save, logs, pid files) lives under $ADVCL_SLURM_DIR
# (default /tmp/advcl-slurm). /etc/slurm/slurm.conf becomes a symlink to the generated file so that
# sbatch/srun/squeue work from any shell without SLURM_CONF.
set -euo pipefail

N=${1:-2}
STATE=${ADVCL_SLURM_DIR:-/tmp/advcl-slurm}
CONF=$STATE/slurm.conf
SYS_CONF=/etc/slurm/slurm.conf          # where Debian's slurm 22.05 looks when SLURM_CONF is unset
CTLD_PORT=6817                          # slurmd of nodeI listens on CTLD_PORT + I
MARK="advcl-dist local cluster (slurm/local/start.sh)"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "start.sh: $*" >&2; exit 1; }

[[ $N =~ ^[1-9][0-9]*$ ]] && (( N <= 64 )) || die "N must be a node count in 1..64, got '$N'"
[[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root and it edits /etc/hosts, /etc/slurm)"
for cmd in slurmctld slurmd munged munge unmunge sinfo scontrol squeue scancel sbatch srun; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found: apt-get install slurm-wlm munge (or 'make install' as root)"
done
[[ $STATE == /* ]] || die "ADVCL_SLURM_DIR must be an absolute path, got '$STATE'"

export SLURM_CONF=$CONF

# pid of a daemon of ours that is alive, from its pid file; empty otherwise. The comm check guards
# against a stale pid file whose number now belongs to another process.
alive() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/$pid/comm) == "$comm" ]] && echo "$pid"
}
anything_alive() {
    local f
    alive "$STATE/run/slurmctld.pid" slurmctld >/dev/null && return 0
    for f in "$STATE"/run/slurmd-*.pid; do alive "$f" slurmd >/dev/null && return 0; done
    return 1
}
# Nodes sinfo reports in a state jobs can use (idle, mixed, allocated, completing; no '*' = not responding).
usable_nodes() {
    timeout 10 sinfo -h -o '%D %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc|comp)$/ {s += $1} END {print s + 0}'
}

# --- munge: slurm authenticates every message with it ------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    echo "creating /etc/munge/munge.key"
    install -d -m 0700 -o munge -g munge /etc/munge 2>/dev/null || install -d -m 0700 /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "starting munged"
    # No systemd here, so nobody created the socket directory (/run is a tmpfs on real machines).
    install -d -m 0755 -o munge -g munge /run/munge 2>/dev/null || install -d -m 0755 /run/munge
    # munged refuses to run as root unless forced; the munge user owns its key, log and seed dirs.
    if id munge >/dev/null 2>&1; then runuser -u munge -- munged || munged --force
    else munged --force; fi
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
    munge -n | unmunge >/dev/null || die "munged does not work (see /var/log/munge/munged.log)"
fi

# --- slurm.conf ----------------------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
render_conf() {
    cat <<EOF
# $MARK
# Generated for $N node(s); rewritten by every start. State dir: $STATE
ClusterName=advcl-local
# The address spares a DNS lookup; the name must be this host's, or slurmctld won't act as controller.
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only once its old launch credential has expired: cred_expire, 120 s by
# default. 10 s still leaves a loaded 2-core machine ample time to launch a step with a fresh one.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
# %n = the node name given with 'slurmd -N': several slurmds share this host but not these files.
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups in containers/VMs like this one: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Every node declares all cores of the host although they share them; config_overrides keeps slurmd
# from draining a node whose declared hardware is not what it sees.
SlurmdParameters=config_overrides
# CR_CPU: a node runs as many 1-cpu jobs at once as it has CPUs; memory is not a consumable resource.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Preemption tests: jobs can be requeued (scontrol requeue, node failure); a node that comes back
# after being marked down returns to service by itself.
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=10
# Not much shorter: under a full 2-core load a busy slurmd must not be declared dead (its jobs would be requeued).
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
# Finished jobs stay visible to squeue -t all / scontrol show job for 5 minutes.
MinJobAge=300
# PrologFlags stay at their default (none): no prolog, no Alloc/Contain step that would need cgroups.
EOF
    local i
    for (( i = 1; i <= N; i++ )); do
        echo "NodeName=node$i NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$(( CTLD_PORT + i )) CPUs=$CPUS RealMemory=8000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
}
NEW_CONF=$(render_conf)

# A cluster of ours with another config (another N) is stopped first: same ports, same node names.
if [[ -f $CONF ]] && [[ $(<"$CONF") != "$NEW_CONF" ]] && anything_alive; then
    echo "a cluster with another configuration ($(grep -c '^NodeName=' "$CONF") nodes) runs from $STATE; stopping it"
    ADVCL_SLURM_DIR=$STATE bash "$HERE/stop.sh"
fi

# /etc/slurm/slurm.conf: ours (a link to a generated file, ours or of another state dir) or nobody's.
if [[ -L $SYS_CONF || -e $SYS_CONF ]]; then
    target=$(readlink -f "$SYS_CONF" || true)
    if [[ -z $target || ! -f $target ]] || ! grep -qF "$MARK" "$target"; then
        [[ -L $SYS_CONF && ! -e $SYS_CONF ]] || \
            die "$SYS_CONF exists and was not written by this script; refusing to replace it (move it away first)"
    elif [[ $target != "$(readlink -f "$CONF" 2>/dev/null || echo "$CONF")" ]]; then
        other=$(dirname "$target")
        echo "$SYS_CONF points at the cluster in $other; stopping that one (same ports)"
        ADVCL_SLURM_DIR=$other bash "$HERE/stop.sh"
    fi
fi

install -d "$STATE" "$STATE/ctld" "$STATE/log" "$STATE/run" "$STATE/spool"
[[ -f $CONF && $(<"$CONF") == "$NEW_CONF" ]] || printf '%s\n' "$NEW_CONF" > "$CONF"
install -d /etc/slurm
[[ $(readlink "$SYS_CONF" 2>/dev/null) == "$CONF" ]] || ln -sfn "$CONF" "$SYS_CONF"

# --- node names: job node lists say node1,node2; the trainer connects to the first of them ------------
HOSTS_LINE="127.0.0.1 $(for (( i = 1; i <= N; i++ )); do printf 'node%d ' "$i"; done)# $MARK"
if ! grep -qxF "$HOSTS_LINE" /etc/hosts; then
    # Rewritten in place (not renamed): /etc/hosts is often a bind mount in containers.
    { grep -vF "# $MARK" /etc/hosts || true; echo "$HOSTS_LINE"; } > "$STATE/hosts.new"
    cat "$STATE/hosts.new" > /etc/hosts
    rm -f "$STATE/hosts.new"
fi
for (( i = 1; i <= N; i++ )); do
    getent hosts "node$i" | grep -q '^127\.0\.0\.1 ' || die "node$i does not resolve to 127.0.0.1 (another /etc/hosts line wins?)"
done

# --- already up? -------------------------------------------------------------------------------------
all_up=1
alive "$STATE/run/slurmctld.pid" slurmctld >/dev/null || all_up=0
for (( i = 1; i <= N; i++ )); do alive "$STATE/run/slurmd-node$i.pid" slurmd >/dev/null || all_up=0; done
if (( all_up )) && [[ $(usable_nodes) == "$N" ]]; then
    echo "SLURM cluster with $N node(s) already up ($STATE)"
    exit 0
fi

# --- daemons -----------------------------------------------------------------------------------------
# The controller keeps its state (job ids keep counting up across restarts); only what is not running starts.
if ! alive "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    echo "starting slurmctld (log: $STATE/log/slurmctld.log)"
    slurmctld -f "$CONF"
fi
for (( i = 1; i <= N; i++ )); do
    if ! alive "$STATE/run/slurmd-node$i.pid" slurmd >/dev/null; then
        echo "starting slurmd node$i on port $(( CTLD_PORT + i )) (log: $STATE/log/slurmd-node$i.log)"
        slurmd -f "$CONF" -N "node$i"
    fi
done

echo -n "waiting for $N idle node(s)"
resumed=0
for (( t = 0; t < 60; t++ )); do
    idle=$(timeout 10 sinfo -h -o '%D %t' 2>/dev/null | awk '$2 == "idle" {s += $1} END {print s + 0}')
    [[ $idle == "$N" ]] && break
    # A node drained or downed in an earlier life of this cluster keeps that state in StateSaveLocation;
    # ReturnToService=2 does not undo an admin drain, so give them one explicit resume.
    if (( t == 10 && !resumed )); then
        bad=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(drain|drng|down)/ {print $1}' | paste -sd, -)
        [[ -n $bad ]] && scontrol update nodename="$bad" state=resume 2>/dev/null || true
        resumed=1
    fi
    echo -n .
    sleep 1
done
echo
if [[ $idle != "$N" ]]; then
    echo "start.sh: only $idle of $N node(s) idle after 60 s" >&2
    timeout 10 sinfo -N -l >&2 || true
    for log in "$STATE"/log/slurmctld.log "$STATE"/log/slurmd-node*.log; do
        [[ -f $log ]] && { echo "--- tail $log" >&2; tail -n 20 "$log" >&2; }
    done
    exit 1
fi

cat <<EOF
SLURM cluster up: $N node(s) node[1-$N] in partition 'debug', $CPUS CPU(s) each, state in $STATE
  $SYS_CONF -> $CONF, so sinfo / squeue / sbatch / srun work from any shell
  (or export SLURM_CONF=$CONF)
  sinfo; srun -N $N -n $N hostname; sbatch --wrap 'echo ok'
  logs: $STATE/log/   stop: bash $HERE/stop.sh
EOF
timeout 10 sinfo || true
