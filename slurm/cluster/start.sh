#!/usr/bin/env bash
# Install (if needed), configure and start a Slurm 22.05 cluster of 1-3 nodes with
# slurmdbd accounting (or none: SLURM_DPO_ACCOUNTING=none) on localhost. Idempotent: daemons already running are left alone.
#
#   SLURM_DPO_FRESH=1  wipe slurmctld state + accounting DB first (job ids restart at 1)
#   see common.sh for the other SLURM_DPO_* knobs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

T0=$(date +%s.%N)
[[ $EUID -eq 0 ]] || { echo "start.sh must run as root" >&2; exit 1; }

# ---------------------------------------------------------------- packages
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing: ${missing[*]}"
    local t=$SECONDS prc=/usr/sbin/policy-rc.d backup=""
    # No init system here: keep maintainer scripts from starting a system MariaDB/munge/slurm.
    if [[ -e $prc ]]; then backup="$prc.slurm-dpo.bak"; mv "$prc" "$backup"; fi
    printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod 755 "$prc"
    # shellcheck disable=SC2064
    trap "rm -f '$prc'; [ -n '$backup' ] && mv '$backup' '$prc'; true" EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >"$SLURM_DPO_LOG/apt-install.log" 2>&1 || {
        tail -n 40 "$SLURM_DPO_LOG/apt-install.log" >&2; exit 1; }
    rm -f "$prc"; [[ -n $backup ]] && mv "$backup" "$prc"
    trap - EXIT
    log "packages installed in $((SECONDS - t)) s"
}

# ---------------------------------------------------------------- helpers
# wait_for NAME CMD... : poll CMD until it succeeds, else dump the daemon log and fail.
wait_for() {
    local name=$1; shift
    local deadline=$((SECONDS + SLURM_DPO_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ! is_alive "$name"; then
            log "ERROR: $name exited during startup"; dump_log "$name"; exit 1
        fi
        if (( SECONDS >= deadline )); then
            log "ERROR: $name not ready after ${SLURM_DPO_TIMEOUT}s (check: $*)"; dump_log "$name"; exit 1
        fi
        sleep 0.3
    done
}

dump_log() {
    local f
    for f in "$SLURM_DPO_LOG/$1.log" "$SLURM_DPO_LOG/$1.out"; do
        [[ -s $f ]] && { echo "----- tail $f" >&2; tail -n 30 "$f" >&2; }
    done
    return 0
}

# start_daemon NAME USER ARGS... : background it via start-stop-daemon unless already alive.
start_daemon() {
    local name=$1 user=$2; shift 2
    if is_running "$name"; then
        log "$name already running (pid $(cat "$(pidfile_of "$name")"))"; return 0
    fi
    rm -f "$(pidfile_of "$name")"
    : >"$SLURM_DPO_LOG/$name.out"
    log "starting $name"
    # --output keeps whatever the daemon prints before its own logging is up.
    start-stop-daemon --start --background --make-pidfile --pidfile "$(pidfile_of "$name")" \
        --chuid "$user" --output "$SLURM_DPO_LOG/$name.out" \
        --exec "$(exe_of "$name")" -- "$@"
}

any_slurmd_running() {
    local pf
    for pf in "$SLURM_DPO_RUN"/slurmd.pid "$SLURM_DPO_RUN"/slurmd-*.pid; do
        [[ -e $pf ]] && is_running "$(basename "$pf" .pid)" && return 0
    done
    return 1
}

mysql_root() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot "$@"; }

# ---------------------------------------------------------------- config
# write_if_changed PATH MODE OWNER < content ; returns 0 if the file changed
write_if_changed() {
    local path=$1 mode=$2 owner=$3 tmp
    tmp="$(mktemp)"; cat >"$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 1; fi
    install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$path"; rm -f "$tmp"
    return 0
}

node_lines() {
    local name port=$SLURM_DPO_SLURMD_PORT
    while read -r name; do
        echo "NodeName=$name NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$port CPUs=$SLURM_DPO_NODE_CPUS RealMemory=16000 Gres=gpu:4 State=UNKNOWN"
        port=$((port + 1))
    done < <(node_names)
}

# Node names must resolve (srun, and MASTER_ADDR when a job's first node is not this host's name).
resolve_node_names() {
    local name
    while read -r name; do
        getent hosts "$name" >/dev/null || echo "127.0.0.1 $name  # slurm-dpo test node" >>/etc/hosts
    done < <(node_names)
}

# The accounting lines of slurm.conf (SLURM_DPO_ACCOUNTING), then MaxArraySize if SLURM_DPO_MAX_ARRAY_SIZE is set.
accounting_and_limit_lines() {
    if [[ $SLURM_DPO_ACCOUNTING == none ]]; then
        echo "# SLURM_DPO_ACCOUNTING=none: no accounting database (sacct fails), as on many small clusters"
        echo "AccountingStorageType=accounting_storage/none"
    else
        printf '%s\n' AccountingStorageType=accounting_storage/slurmdbd AccountingStorageHost=localhost \
            AccountingStoragePort=6819 AccountingStorageTRES=gres/gpu
    fi
    if [[ -n $SLURM_DPO_MAX_ARRAY_SIZE ]]; then echo "MaxArraySize=$SLURM_DPO_MAX_ARRAY_SIZE"; fi
}

write_configs() {
    local changed=0 gpu
    mkdir -p /etc/slurm "$SLURM_DPO_STATE/fakegpu"
    # Four fake GPU device files (gres.conf needs File=; count-only GRES drains the node).
    for gpu in 0 1 2 3; do ln -sfn /dev/null "$SLURM_DPO_STATE/fakegpu/nvidia$gpu"; done

    write_if_changed /etc/slurm/slurm.conf 644 root:root <<CONF && changed=1
# Generated by slurm-dpo/slurm/cluster/start.sh -- edits are overwritten.
ClusterName=$SLURM_DPO_CLUSTER
SlurmctldHost=$SLURM_DPO_NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# Default credential lifetime (120 s) delays the restart of a requeued job.
AuthInfo=cred_expire=10
StateSaveLocation=$SLURM_DPO_STATE/slurmctld
# %n: the node's name, so each node daemon on this host keeps its own spool, pidfile and log
SlurmdSpoolDir=$SLURM_DPO_STATE/slurmd/%n
SlurmctldPidFile=$SLURM_DPO_RUN/daemon/slurmctld.pid
SlurmdPidFile=$SLURM_DPO_RUN/daemon/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DPO_LOG/slurmctld.log
SlurmdLogFile=$SLURM_DPO_LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none

# No usable cgroup freezer here, so no cgroup tracking / task containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=$SLURM_DPO_TASK_PLUGIN
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30

# Memory is a consumable resource; DefMemPerCPU keeps a job without --mem from
# grabbing the whole node (which would serialise everything).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Fast turnaround for tests.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
# A job behind a failed afterok dependency is cancelled instead of pending
# forever. (22.05 reads this from DependencyParameters; in SchedulerParameters
# it is silently ignored.)
DependencyParameters=kill_invalid_depend
JobRequeue=1
MinJobAge=10
KillWait=5
InactiveLimit=0
Waittime=0
ReturnToService=2
# A node that stops answering is marked DOWN (and its jobs requeued) after 20 s, not 5 minutes, so
# the node-failure tests see it in seconds; short enough for tests, long enough for a busy 2-core host.
SlurmdTimeout=20

$(accounting_and_limit_lines)
JobCompType=jobcomp/none

GresTypes=gpu
# Under task/none the nodes advertise more CPUs than the host has (see common.sh), so several test
# jobs run at once.
SlurmdParameters=config_overrides
# Several node daemons share this host: each has its own name and port, all reach 127.0.0.1.
$(node_lines)
PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP
CONF

    write_if_changed /etc/slurm/gres.conf 644 root:root <<CONF && changed=1
AutoDetect=off
Name=gpu File=$SLURM_DPO_STATE/fakegpu/nvidia[0-3]
CONF

    # cgroup/v1 explicitly: autodetect can die with "Hybrid mode is not supported".
    write_if_changed /etc/slurm/cgroup.conf 644 root:root <<CONF && changed=1
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=no
CONF

    write_if_changed /etc/slurm/slurmdbd.conf 600 slurm:slurm <<CONF && changed=1
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$SLURM_DPO_LOG/slurmdbd.log
PidFile=$SLURM_DPO_RUN/daemon/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$SLURM_DPO_DB_PORT
StorageUser=slurm
StoragePass=$SLURM_DPO_DB_PASS
StorageLoc=slurm_acct_db
CONF

    # Running slurm daemons would keep the old config: restart them.
    if (( changed )) && { is_running slurmdbd || is_running slurmctld || any_slurmd_running; }; then
        log "slurm config changed: restarting slurm daemons"
        "$HERE/stop.sh" slurmd slurmctld slurmdbd
    fi
}

make_dirs() {
    mkdir -p "$SLURM_DPO_LOG" "$SLURM_DPO_RUN/daemon" "$SLURM_DPO_STATE" \
             "$SLURM_DPO_STATE/slurmctld" "$SLURM_DPO_STATE/slurmd" "$MYSQL_DATADIR"
    chown slurm:slurm "$SLURM_DPO_STATE/slurmctld" "$SLURM_DPO_RUN/daemon"
    chown mysql:mysql "$MYSQL_DATADIR"
    # Log files are pre-created so unprivileged daemons can append to them.
    touch "$SLURM_DPO_LOG"/{slurmctld,slurmdbd,mariadbd}.log
    chown slurm:slurm "$SLURM_DPO_LOG"/{slurmctld,slurmdbd}.log
    chown mysql:mysql "$SLURM_DPO_LOG/mariadbd.log"
    # The daemons' --output files, written by the child after --chuid.
    touch "$SLURM_DPO_LOG"/munged.{log,out} "$SLURM_DPO_LOG/mariadbd.out"
    chown munge:munge "$SLURM_DPO_LOG"/munged.{log,out}; chown mysql:mysql "$SLURM_DPO_LOG/mariadbd.out"
    chmod 755 "$SLURM_DPO_RUN"
    install -d -o mysql -g mysql -m 755 "$SLURM_DPO_RUN/mysql"   # socket + pidfile of mariadbd
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
}

# ---------------------------------------------------------------- main
mkdir -p "$SLURM_DPO_LOG"
install_packages
make_dirs

if [[ ${SLURM_DPO_FRESH:-0} == 1 ]]; then
    log "SLURM_DPO_FRESH=1: wiping slurmctld/slurmd state and the accounting DB"
    if n=$(squeue -h 2>/dev/null | wc -l) && (( n > 0 )); then
        log "WARNING: dropping $n queued/running job(s)"; fi
    "$HERE/stop.sh" slurmd slurmctld slurmdbd
    rm -rf "${SLURM_DPO_STATE:?}/slurmctld/"* "${SLURM_DPO_STATE:?}/slurmd/"*
    WIPE_DB=1
fi

resolve_node_names
write_configs

# munge: shared key + munged in the foreground (-F) as user munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
# (munged insists on owning its own pidfile dir, so it keeps the default /run/munge/munged.pid)
start_daemon munged munge -F --log-file="$SLURM_DPO_LOG/munged.log"
wait_for munged bash -c 'munge -n | unmunge'

if [[ $SLURM_DPO_ACCOUNTING == none ]]; then
    # no accounting database: slurmdbd is not started (and stopped if an earlier start left it running)
    if is_running slurmdbd; then "$HERE/stop.sh" slurmdbd; fi
else
    # mariadb: private datadir/socket, TCP on 127.0.0.1 only; --no-defaults ignores /etc/mysql
    if [[ ! -d $MYSQL_DATADIR/mysql ]]; then
        log "initialising MariaDB datadir $MYSQL_DATADIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DATADIR" \
            --auth-root-authentication-method=socket >"$SLURM_DPO_LOG/mariadb-install-db.log" 2>&1 || {
            tail -n 30 "$SLURM_DPO_LOG/mariadb-install-db.log" >&2; exit 1; }
    fi
    # innodb sizes: slurmdbd logs an error below half of its recommended values.
    start_daemon mariadbd mysql --no-defaults --datadir="$MYSQL_DATADIR" --socket="$MYSQL_SOCKET" \
        --pid-file="$SLURM_DPO_RUN/mysql/mariadbd.pid" --bind-address=127.0.0.1 --port="$SLURM_DPO_DB_PORT" \
        --skip-name-resolve --log-error="$SLURM_DPO_LOG/mariadbd.log" \
        --innodb-buffer-pool-size=512M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
    wait_for mariadbd mysql_root -e 'SELECT 1'

    if [[ ${WIPE_DB:-0} == 1 ]]; then mysql_root -e 'DROP DATABASE IF EXISTS slurm_acct_db'; fi
    mysql_root <<SQL
DROP USER IF EXISTS ''@'localhost', ''@'$(hostname)';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$SLURM_DPO_DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$SLURM_DPO_DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

    # slurmdbd: drops to SlurmUser itself; ready once sacctmgr can talk to it
    start_daemon slurmdbd root -D
    wait_for slurmdbd sacctmgr -n list cluster
    out="$(sacctmgr -i add cluster "$SLURM_DPO_CLUSTER" 2>&1)" || {
        grep -qi 'already exists' <<<"$out" || { echo "$out" >&2; exit 1; }; }
fi

start_daemon slurmctld root -D
wait_for slurmctld scontrol ping
while read -r node; do
    mkdir -p "$SLURM_DPO_STATE/slurmd/$node"
    start_daemon "$(slurmd_of "$node")" root -D -N "$node"
done < <(node_names)

# Wait for every node to come up; un-drain one an earlier run left drained/down.
# (%T has no '*' suffix only once slurmd has registered, so 'idle' means really up.)
deadline=$((SECONDS + SLURM_DPO_TIMEOUT)); next_resume=0
while read -r node; do
    while :; do
        state="$(sinfo -h -N -n "$node" -o %T 2>/dev/null | head -n1)"
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            drain*|down*|fail*)
                # Retried: right after slurmctld starts, resume can be refused
                # ("Invalid node state specified").
                if (( SECONDS >= next_resume )); then
                    log "node $node is $state ($(sinfo -h -N -n "$node" -o %E)): resuming"
                    scontrol update nodename="$node" state=resume 2>/dev/null || true
                    next_resume=$((SECONDS + 2))
                fi ;;
        esac
        if ! is_alive "$(slurmd_of "$node")"; then
            log "ERROR: slurmd of $node exited"; dump_log "slurmd-$node"; dump_log "$(slurmd_of "$node")"; exit 1
        fi
        if (( SECONDS >= deadline )); then
            log "ERROR: node $node is '${state:-unknown}' after ${SLURM_DPO_TIMEOUT}s, not idle"
            sinfo -N -l >&2 || true; dump_log "slurmd-$node"; dump_log slurmctld; exit 1
        fi
        sleep 0.3
    done
done < <(node_names)

log "cluster '$SLURM_DPO_CLUSTER' up: nodes $(node_names | paste -sd,) idle; logs in $SLURM_DPO_LOG"
log "elapsed $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
