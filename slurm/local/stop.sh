#!/usr/bin/env bash
# Stops the local cluster of slurm/local/start.sh: cancels its jobs, then its slurmds, then slurmctld,
# each found by its pid file under $ADVCL_SLURM_DIR (default /tmp/advcl-slurm). Idempotent.
# munged is left running: it is a host-wide service other programs may rely on.
# The config, the /etc/slurm/slurm.conf link, the /etc/hosts line and the controller state stay, so
# the next start.sh keeps counting job ids where this cluster stopped.
set -euo pipefail

STATE=${ADVCL_SLURM_DIR:-/tmp/advcl-slurm}
export SLURM_CONF=$STATE/slurm.conf

alive() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/$pid/comm) == "$comm" ]] && echo "$pid"
}

# SIGTERM, then SIGKILL for a daemon that has not gone after 15 s.
stop_daemon() {
    local pidfile=$1 comm=$2 name=$3 pid
    pid=$(alive "$pidfile" "$comm") || return 0
    echo "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 60); do [[ -e /proc/$pid ]] || break; sleep 0.25; done
    if [[ -e /proc/$pid ]]; then echo "$name did not stop in 15 s; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$pidfile"
}

stopped=0
if alive "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    stopped=1
    # Cancel while the slurmds still run: they are the ones that kill the job processes.
    jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        echo "cancelling job(s): $(echo $jobs)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 30); do
            [[ -z $(timeout 10 squeue -h -o '%A' 2>/dev/null || true) ]] && break
            sleep 1
        done
        left=$(timeout 10 squeue -h -o '%A %T' 2>/dev/null || true)
        [[ -z $left ]] || echo "warning: jobs still not finished after 30 s: $left"
    fi
fi

for pidfile in "$STATE"/run/slurmd-*.pid; do
    [[ -e $pidfile ]] || continue
    node=${pidfile##*/slurmd-}
    alive "$pidfile" slurmd >/dev/null && stopped=1
    stop_daemon "$pidfile" slurmd "slurmd ${node%.pid}"
done
stop_daemon "$STATE/run/slurmctld.pid" slurmctld slurmctld

if (( stopped )); then
    echo "local SLURM cluster in $STATE stopped; munged left running"
else
    echo "no local SLURM cluster running from $STATE"
fi
