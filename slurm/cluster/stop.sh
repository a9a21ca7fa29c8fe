#!/usr/bin/env bash
# Stop the slurm-dpo cluster daemons (reverse start order) via their pidfiles.
# Tolerant of daemons that are already stopped. Optional args: daemon names to
# stop (e.g. `stop.sh slurmd slurmctld`); default is all of them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

# `slurmd` means every node daemon (slurmd, slurmd-NAME...); `slurmd-NAME` one node.
if [[ $# -gt 0 ]]; then
    targets=()
    for name in "$@"; do
        if [[ $name == slurmd ]]; then
            # the configured nodes and any left from a larger cluster
            for pf in "$SLURM_DPO_RUN"/slurmd.pid "$SLURM_DPO_RUN"/slurmd-*.pid; do
                [[ -e $pf ]] && targets+=("$(basename "$pf" .pid)")
            done
        else targets+=("$name"); fi
    done
else targets=(); for ((i=${#DAEMONS[@]}-1; i>=0; i--)); do targets+=("${DAEMONS[i]}"); done; fi

for name in "${targets[@]}"; do
    pf="$(pidfile_of "$name")"
    if ! is_running "$name"; then
        rm -f "$pf"; log "$name not running"; continue
    fi
    log "stopping $name (pid $(cat "$pf"))"
    # TERM, wait up to 30 s, then KILL. mariadbd needs the TERM path for a clean InnoDB shutdown.
    start-stop-daemon --stop --retry TERM/30/KILL/5 --pidfile "$pf" --exec "$(exe_of "$name")" \
        --remove-pidfile --oknodo >/dev/null || log "WARNING: could not stop $name"
done
