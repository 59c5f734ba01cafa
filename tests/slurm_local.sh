#!/usr/bin/env bash
# A real single-node Slurm on this machine: controller + node daemon on localhost, with two
# fake GPUs (character devices), so the Slurm backend is tested against the engine users run.
#
#   tests/slurm_local.sh start    # write configs, start munged, slurmctld, slurmd; wait for `idle`
#   tests/slurm_local.sh stop     # stop the three daemons by the PIDs in their pid files
#   tests/slurm_local.sh status   # daemons, node state, queue
#
# Needs root and Debian's `slurm-wlm` (apt-get install -y slurm-wlm). Configs go to
# /etc/slurm (where Debian's tools look); a slurm.conf/gres.conf that this script did not
# write is backed up once to <file>.bak-<date> before being replaced. `start` is idempotent:
# running daemons are left alone (restarted only if the config had to change).
# Environment: SLURM_LOCAL_TIMEOUT (seconds to wait for `idle`, default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MARKER="# written by tests/slurm_local.sh"
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: ERROR: $*" >&2; exit 1; }

cpus() { nproc --all; }
# Slightly under the real memory: a node that reports less than RealMemory is drained.
real_memory_mb() { awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo; }

slurm_conf() {
    cat <<EOF
$MARKER: a single-node cluster for development and tests.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
GresTypes=gpu
NodeName=localhost CPUs=$(cpus) RealMemory=$(real_memory_mb) Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

gres_conf() {
    cat <<EOF
$MARKER: two fake GPUs (character devices made by mknod).
AutoDetect=off
NodeName=localhost Name=gpu File=/dev/fakegpu[0-1]
EOF
}

# pid_alive PIDFILE NAME: the pid file names a live process whose command is NAME.
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$2" ]]
}

# install_conf PATH CONTENT: writes CONTENT to PATH (temp + rename); returns 0 if it changed.
install_conf() {
    local path=$1 content=$2
    if [[ -f $path ]] && [[ $(<"$path") == "$content" ]]; then
        return 1
    fi
    if [[ -f $path ]] && ! grep -qF "$MARKER" "$path"; then
        local backup
        backup="$path.bak-$(date +%Y%m%d-%H%M%S)"
        cp -p "$path" "$backup"
        say "backed up existing $path to $backup"
    fi
    printf '%s\n' "$content" >"$path.tmp.$$"
    chmod 644 "$path.tmp.$$"
    mv -f "$path.tmp.$$" "$path"
    say "wrote $path"
    return 0
}

make_fake_gpu() {
    local dev=$1
    if [[ -e $dev && ! -c $dev ]]; then
        rm -f "$dev"   # a regular file is rejected by gres ("not a valid character device")
    fi
    [[ -c $dev ]] || mknod "$dev" c 1 3
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME
    local pidfile=$1 name=$2 pid i
    if ! pid_alive "$pidfile" "$name"; then
        say "$name not running"
        return 0
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || { say "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    say "$name (pid $pid) did not stop within 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1 || true; }

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        [[ -f $f ]] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
    done
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it writes /etc/slurm and starts daemons)"
    local cmd
    for cmd in munged slurmctld slurmd sinfo scontrol; do
        command -v "$cmd" >/dev/null \
            || die "$cmd not found; install Slurm with: apt-get install -y slurm-wlm"
    done

    mkdir -p "$CONF_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" \
        "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chown slurm:slurm /var/spool/slurmctld "$LOG_DIR" "$RUN_DIR"
    chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chmod 755 "$MUNGE_RUN"
    make_fake_gpu /dev/fakegpu0
    make_fake_gpu /dev/fakegpu1

    local changed=0
    install_conf "$CONF_DIR/slurm.conf" "$(slurm_conf)" && changed=1
    install_conf "$CONF_DIR/gres.conf" "$(gres_conf)" && changed=1
    if ((changed)); then  # running daemons must re-read the config
        stop_pidfile "$SLURMD_PID" slurmd
        stop_pidfile "$CTLD_PID" slurmctld
    fi

    if ! pid_alive "$MUNGE_PID" munged && ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        if [[ ! -f /etc/munge/munge.key ]]; then
            command -v mungekey >/dev/null || die "/etc/munge/munge.key missing (reinstall munge)"
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
            say "created /etc/munge/munge.key"
        fi
        runuser -u munge -- munged --pid-file="$MUNGE_PID" \
            || die "munged did not start (see /var/log/munge/munged.log)"
        say "started munged"
    fi
    if ! pid_alive "$CTLD_PID" slurmctld && ! scontrol ping 2>/dev/null | grep -q "is UP"; then
        slurmctld || { show_logs; die "slurmctld did not start"; }
        say "started slurmctld"
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        slurmd -N localhost || { show_logs; die "slurmd did not start"; }
        say "started slurmd"
    fi

    local state="" waited=0
    while ((waited < TIMEOUT * 10)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated) say "node localhost is $state"; return 0 ;;
            drain* | down* | inval*)
                # A drain survives restarts (e.g. an earlier bad gres.conf); clear it.
                scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.1
        waited=$((waited + 1))
    done
    show_logs
    die "node localhost not idle after ${TIMEOUT}s (last state: '${state:-none}'; reason: $(sinfo -h -n localhost -o %E 2>/dev/null || true))"
}

stop() {
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGE_PID" munged
}

status() {
    local rc=0 pair
    for pair in "$MUNGE_PID:munged" "$CTLD_PID:slurmctld" "$SLURMD_PID:slurmd"; do
        if pid_alive "${pair%%:*}" "${pair##*:}"; then
            say "${pair##*:} running (pid $(<"${pair%%:*}"))"
        else
            say "${pair##*:} not running"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo -o "%P %a %D %T %G" || rc=1
        squeue || rc=1
    fi
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
