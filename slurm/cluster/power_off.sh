#!/usr/bin/env bash
# Simulate a power loss of one node of the test cluster: its slurmd and every process of every job
# step on it (the step's slurmstepd and all its descendants) die at once with SIGKILL, with no
# warning and nothing flushed. The controller notices after SlurmdTimeout and marks the node DOWN.
# `start.sh` brings the node back (ReturnToService=2 returns it to service).
#
#   power_off.sh NODE
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

node=${1:?usage: power_off.sh NODE}
node_names | grep -qx "$node" || { echo "power_off.sh: no node $node (nodes: $(node_names | paste -sd' '))" >&2; exit 2; }
[[ $node != "$SLURM_DPO_NODE" ]] || { echo "power_off.sh: $node also runs the controller; power off another node" >&2; exit 2; }

victims=()
pf="$(pidfile_of "$(slurmd_of "$node")")"
[[ -f $pf ]] && victims+=("$(cat "$pf")")
# A job's processes on that node carry SLURMD_NODENAME=NODE; climb from each to its slurmstepd.
for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    # (grep reads a process substitution: under pipefail, `tr | grep -q` could fail by SIGPIPE on a match)
    grep -qx "SLURMD_NODENAME=$node" < <(tr '\0' '\n' 2>/dev/null <"$environ") || continue
    while [[ $pid -gt 1 ]]; do
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurmstepd ]]; then victims+=("$pid"); break; fi
        pid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || echo 1)
    done
done
# the slurmstepds and everything below them
descendants() { local child; for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done; }
all=()
for pid in $(printf '%s\n' "${victims[@]}" | sort -u); do all+=("$pid"); while read -r d; do all+=("$d"); done < <(descendants "$pid"); done
kill -STOP "${all[@]}" 2>/dev/null || true   # freeze first: no process gets to react to another's death
kill -KILL "${all[@]}" 2>/dev/null || true
rm -f "$pf"
log "node $node powered off: killed ${#all[@]} process(es) (slurmd and job steps)"
