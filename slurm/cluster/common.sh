# Shared settings for start.sh / stop.sh / smoke.sh (sourced, not executed).
# Everything can be overridden from the environment.

SLURM_DPO_CLUSTER="${SLURM_DPO_CLUSTER:-slurmdpo}"        # accounting cluster name
SLURM_DPO_STATE="${SLURM_DPO_STATE:-/var/lib/slurm-dpo}"  # mysql datadir, ctld/slurmd state, fake GPUs
SLURM_DPO_LOG="${SLURM_DPO_LOG:-/var/log/slurm-dpo}"      # one log per daemon
SLURM_DPO_RUN="${SLURM_DPO_RUN:-/run/slurm-dpo}"          # pidfiles + mysql socket
SLURM_DPO_DB_PORT="${SLURM_DPO_DB_PORT:-3306}"            # mariadbd TCP port (127.0.0.1 only)
SLURM_DPO_DB_PASS="${SLURM_DPO_DB_PASS:-slurmdpo}"        # password of the `slurm` DB user (local only)
SLURM_DPO_TIMEOUT="${SLURM_DPO_TIMEOUT:-60}"              # seconds to wait for each daemon
SLURM_DPO_NODE="${SLURM_DPO_NODE:-$(hostname -s)}"
# Node daemons on this host (`slurmd -N NAME`): the first is $SLURM_DPO_NODE, then ${SLURM_DPO_NODE}2, ...
# Three by default: multi-node jobs take two, and the third is the spare a job requeues onto when a
# node fails.
SLURM_DPO_NODES="${SLURM_DPO_NODES:-3}"
SLURM_DPO_SLURMD_PORT="${SLURM_DPO_SLURMD_PORT:-17001}"    # first node's slurmd port; the next nodes count up
# task/none: tasks run on any CPU, and each node advertises 8 CPUs so several test jobs run at once.
# task/affinity: SLURM binds each task to the CPUs it was given (as most sites do); binding needs the
# CPU ids the host really has, so each node then advertises this host's CPUs (`nproc`).
SLURM_DPO_TASK_PLUGIN="${SLURM_DPO_TASK_PLUGIN:-task/none}"
case "$SLURM_DPO_TASK_PLUGIN" in
    task/none) SLURM_DPO_NODE_CPUS=8 ;;
    task/affinity) SLURM_DPO_NODE_CPUS=$(nproc --all) ;;
    *) echo "SLURM_DPO_TASK_PLUGIN=$SLURM_DPO_TASK_PLUGIN: use task/none or task/affinity" >&2; exit 2 ;;
esac

# slurmdbd: accounting on MariaDB (sacct knows every job). none: AccountingStorageType=accounting_storage/none,
# no slurmdbd, as on small clusters without an accounting database (sacct then fails).
SLURM_DPO_ACCOUNTING="${SLURM_DPO_ACCOUNTING:-slurmdbd}"
case "$SLURM_DPO_ACCOUNTING" in
    slurmdbd|none) ;;
    *) echo "SLURM_DPO_ACCOUNTING=$SLURM_DPO_ACCOUNTING: use slurmdbd or none" >&2; exit 2 ;;
esac
# MaxArraySize of the controller (an array's task indices must be below it); empty: Slurm's default (1001).
SLURM_DPO_MAX_ARRAY_SIZE="${SLURM_DPO_MAX_ARRAY_SIZE:-}"
[[ -z $SLURM_DPO_MAX_ARRAY_SIZE || $SLURM_DPO_MAX_ARRAY_SIZE =~ ^[0-9]+$ ]] || {
    echo "SLURM_DPO_MAX_ARRAY_SIZE=$SLURM_DPO_MAX_ARRAY_SIZE: use a number (or leave it unset)" >&2; exit 2; }

MYSQL_DATADIR="$SLURM_DPO_STATE/mysql"
MYSQL_SOCKET="$SLURM_DPO_RUN/mysql/mysqld.sock"

# node_names: one name per node daemon, in order
node_names() {
    local i
    echo "$SLURM_DPO_NODE"
    for ((i = 2; i <= SLURM_DPO_NODES; i++)); do echo "$SLURM_DPO_NODE$i"; done
}
# the daemon (pidfile, log) name of a node's slurmd: `slurmd` for the first node, `slurmd-NAME` after
slurmd_of() { if [[ $1 == "$SLURM_DPO_NODE" ]]; then echo slurmd; else echo "slurmd-$1"; fi; }
SLURMDS=(); while read -r _node; do SLURMDS+=("$(slurmd_of "$_node")"); done < <(node_names)

# Order matters: start.sh starts left to right, stop.sh stops right to left.
DAEMONS=(munged mariadbd slurmdbd slurmctld "${SLURMDS[@]}")

log() { printf '[slurm-dpo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# pidfile written by start-stop-daemon --make-pidfile (not the daemons' own pidfiles)
pidfile_of() { echo "$SLURM_DPO_RUN/$1.pid"; }

exe_of() {
    case "$1" in
        munged) echo /usr/sbin/munged ;;
        mariadbd) echo /usr/sbin/mariadbd ;;
        slurmd-*) echo /usr/sbin/slurmd ;;
        *) echo "/usr/sbin/$1" ;;
    esac
}

# True when the pidfile names a live process running the expected binary.
is_running() {
    local pf; pf="$(pidfile_of "$1")"
    [[ -f "$pf" ]] || return 1
    start-stop-daemon --status --pidfile "$pf" --exec "$(exe_of "$1")" >/dev/null 2>&1
}

# Weaker check used while waiting for a just-started daemon: right after the
# fork the pid may still be start-stop-daemon itself (not yet exec'd), which
# is_running's --exec test would wrongly report as dead.
# Zombies (exited, not yet reaped by PID 1) count as dead.
is_alive() {
    local pf st; pf="$(pidfile_of "$1")"
    [[ -f "$pf" ]] || return 1
    st="$(ps -o stat= -p "$(cat "$pf")" 2>/dev/null)" || return 1
    [[ -n $st && $st != Z* ]]
}
