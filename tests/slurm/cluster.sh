#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine, for the tests in tests/slurm/.
#
#   source tests/slurm/cluster.sh
#   cluster_start DIR      # writes DIR/etc/slurm.conf, starts munged, slurmctld, slurmd; exports SLURM_CONF
#   cluster_stop  DIR      # stops the three daemons it started (by their pid files)
#
# Everything (config, state, spool, logs, munge key and socket) lives under DIR, so it never
# touches a system SLURM. Runs as root: SlurmUser=root, no cgroups (proctrack/linuxproc,
# task/none), no accounting. AuthInfo cred_expire is lowered so that a requeued job may start
# again after ~10 s instead of the default 120 s.

cluster_log() { echo "[cluster] $*" >&2; }

cluster_free_port() {
    python3 - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

cluster_write_conf() {
    local dir=$1 host cpus mem ctld_port slurmd_port
    # The node is called "localhost" (slurmd -N), whatever the machine's host name: a CI
    # container's name may not resolve, and the scripts use the node name as MASTER_ADDR.
    host=localhost
    cpus=$(nproc)
    # RealMemory a little under the machine's, so slurmd never marks the node invalid.
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    ctld_port=$(cluster_free_port)
    slurmd_port=$(cluster_free_port)
    mkdir -p "$dir"/{etc,state,spool/slurmd-"$host",log,run,munge}
    cat >"$dir/etc/slurm.conf" <<CONF
ClusterName=pathgan-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
SchedulerParameters=sched_interval=2
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    # Eight pretend GPUs (device files that are links to /dev/null), so that the scripts' own
    # `--gres=gpu:N` requests schedule here unchanged; torch sees no CUDA, so launch/train.sh
    # takes the CPU path.
    mkdir -p "$dir/dev"
    for i in 0 1 2 3 4 5 6 7; do ln -sf /dev/null "$dir/dev/gpu$i"; done
    echo "Name=gpu File=$dir/dev/gpu[0-7]" >"$dir/etc/gres.conf"
}

cluster_start() {
    local dir=$1 i
    cluster_write_conf "$dir"
    export SLURM_CONF=$dir/etc/slurm.conf

    # munge: a private key and socket under DIR.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 700 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" || { cluster_log "munged failed to start"; return 1; }
    for i in $(seq 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
    munge -S "$dir/munge/munge.socket" -n | unmunge -S "$dir/munge/munge.socket" >/dev/null \
        || { cluster_log "munge round trip failed"; return 1; }

    slurmctld -f "$SLURM_CONF" -i || { cluster_log "slurmctld failed"; tail -n 20 "$dir/log/slurmctld.log" >&2; return 1; }
    slurmd -f "$SLURM_CONF" -N localhost || { cluster_log "slurmd failed"; tail -n 20 "$dir/log/slurmd.log" >&2; return 1; }

    # Wait until the node is idle.
    for i in $(seq 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
            cluster_log "up: $(sinfo -h -o '%P %D %T %C')"
            return 0
        fi
        sleep 1
    done
    cluster_log "node never became idle: $(sinfo 2>&1)"
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2
    return 1
}

cluster_stop() {
    local dir=$1 f pid i
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    # Cancel leftover jobs first and wait for them (KillWait is 20 s), so that no job step
    # outlives slurmd.
    if SLURM_CONF=$dir/etc/slurm.conf squeue -h >/dev/null 2>&1; then
        SLURM_CONF=$dir/etc/slurm.conf scancel --full --quiet --user="$(id -un)" 2>/dev/null
        for i in $(seq 40); do
            [ -z "$(SLURM_CONF=$dir/etc/slurm.conf squeue -h 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    for f in "$dir"/run/slurmd*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
        [ -f "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null) || continue
        [ -n "$pid" ] || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    # A job step daemon of this cluster that is still there (slurmd gone) goes too: found by
    # the SLURM_CONF it inherited from our slurmd, so nothing else is touched.
    for f in /proc/[0-9]*/comm; do
        [ "$(cat "$f" 2>/dev/null)" = slurmstepd ] || continue
        pid=${f#/proc/}; pid=${pid%/comm}
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$dir/etc/slurm.conf"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}
