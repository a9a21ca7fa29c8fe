#!/usr/bin/env bash
# Smoke test of the running slurm-dpo cluster: plain, array, dependency, --mem,
# fake-GPU GRES and requeue jobs, all checked through accounting (sacct).
#   SMOKE_TIMEOUT=120  seconds to wait for all jobs
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

TIMEOUT="${SMOKE_TIMEOUT:-120}"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
fail() { log "SMOKE FAILED: $*"; exit 1; }

T0=$(now)
OUT="$(mktemp -d /tmp/slurm-dpo-smoke.XXXXXX)"
chmod 755 "$OUT"
log "job output in $OUT"
sinfo -h -o '%P %a %D %T' >/dev/null || fail "sinfo cannot reach slurmctld (is start.sh done?)"

sub() { sbatch --parsable --chdir="$OUT" "$@" | cut -d';' -f1; }

# ---- submit everything first so the jobs run concurrently
plain=$(sub -J smoke-plain -o "$OUT/plain-%j.out" --wrap 'hostname')
array=$(sub -J smoke-array -o "$OUT/array-%A_%a.out" --array=1-3 --wrap 'echo task $SLURM_ARRAY_TASK_ID')
dep1=$(sub -J smoke-dep1 -o "$OUT/dep1-%j.out" --dependency="afterok:$plain" --wrap 'echo dep1')
dep2=$(sub -J smoke-dep2 -o "$OUT/dep2-%j.out" --dependency="afterok:$dep1" --wrap 'echo dep2')
mem=$(sub -J smoke-mem -o "$OUT/mem-%j.out" --mem=2G --wrap 'echo mem $SLURM_MEM_PER_NODE')
gpu=$(sub -J smoke-gpu -o "$OUT/gpu.out" --gres=gpu:2 --wrap 'echo $CUDA_VISIBLE_DEVICES')
# kill_invalid_depend: the job behind a failed afterok must be cancelled, not pend forever.
bad=$(sub -J smoke-fail -o "$OUT/fail-%j.out" --wrap 'exit 3')
orphan=$(sub -J smoke-orphan -o "$OUT/orphan-%j.out" --dependency="afterok:$bad" --wrap 'echo never')
# Rendezvous: each job waits for the other's marker, so both COMPLETE only if a
# job without --mem runs alongside one with --mem (DefMemPerCPU, not whole node).
rdv='touch "$OUT/$ME"; for i in $(seq 150); do [ -e "$OUT/$PEER" ] && exit 0; sleep 0.1; done; exit 1'
pairA=$(OUT=$OUT ME=a PEER=b sub -J smoke-pairA -o "$OUT/pairA-%j.out" --export=ALL --wrap "$rdv")
pairB=$(OUT=$OUT ME=b PEER=a sub -J smoke-pairB -o "$OUT/pairB-%j.out" --export=ALL --mem=4G --wrap "$rdv")
# Second run (SLURM_RESTART_COUNT=1) exits at once; append mode keeps both runs' output.
rq=$(sub -J smoke-requeue -o "$OUT/requeue.out" --open-mode=append \
     --wrap 'echo "run restart=${SLURM_RESTART_COUNT:-0}"; [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] || sleep 30')
log "submitted: plain=$plain array=$array dep1=$dep1 dep2=$dep2 mem=$mem gpu=$gpu fail=$bad orphan=$orphan pair=$pairA,$pairB requeue=$rq ($(since "$T0") s)"

# ---- requeue the sleeping job once it has really started
deadline=$((SECONDS + TIMEOUT))
until grep -q 'restart=0' "$OUT/requeue.out" 2>/dev/null; do
    (( SECONDS < deadline )) || fail "requeue job $rq never started (squeue: $(squeue -h -j "$rq" -o '%T %r' 2>&1))"
    sleep 0.3
done
t_rq=$(now)
scontrol requeue "$rq" || fail "scontrol requeue $rq was refused"
log "requeued job $rq"

# ---- wait for every job to reach a final state in accounting
final_re='^(COMPLETED|FAILED|CANCELLED.*|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL|BOOT_FAIL|DEADLINE|PREEMPTED)$'
ids="$plain,$array,$dep1,$dep2,$mem,$gpu,$bad,$orphan,$pairA,$pairB,$rq"
while :; do
    rows="$(sacct -X -n -P -o JobID,State -j "$ids" 2>/dev/null || true)"
    # 10 single jobs + 3 array tasks, all final
    n_final=$(awk -F'|' -v re="$final_re" '$2 ~ re' <<<"$rows" | wc -l)
    (( n_final == 13 )) && [[ $(wc -l <<<"$rows") -eq 13 ]] && break
    if (( SECONDS >= deadline )); then
        echo "$rows" >&2; squeue >&2 || true
        fail "jobs not finished after ${TIMEOUT}s"
    fi
    sleep 0.5
done
log "all jobs finished ($(since "$T0") s since first submit; requeue->done $(since "$t_rq") s)"

# ---- checks
state_of() { awk -F'|' -v id="$1" '$1 == id {print $2}' <<<"$rows"; }
[[ $(state_of "$bad") == FAILED ]] || fail "job $bad (exit 3) is '$(state_of "$bad")', expected FAILED"
[[ $(state_of "$orphan") == CANCELLED* ]] || fail "job $orphan behind a failed dependency is '$(state_of "$orphan")', expected CANCELLED"
notok="$(awk -F'|' -v a="$bad" -v b="$orphan" '$1 != a && $1 != b && $2 != "COMPLETED"' <<<"$rows")"
[[ -z $notok ]] || { echo "$rows" >&2; fail "jobs not COMPLETED: $(tr '\n' ' ' <<<"$notok")"; }
for t in 1 2 3; do grep -q "^${array}_$t|" <<<"$rows" || fail "array task ${array}_$t missing in sacct"; done

got_gpu="$(tr -d '[:space:]' <"$OUT/gpu.out")"
[[ $got_gpu == 0,1 ]] || fail "--gres=gpu:2 job printed CUDA_VISIBLE_DEVICES='$got_gpu', expected 0,1"

grep -q 'restart=1' "$OUT/requeue.out" || fail "requeued job $rq did not rerun with SLURM_RESTART_COUNT=1: $(cat "$OUT/requeue.out")"
# sacct -D lists every run of the job id: the requeued one and the final one.
runs="$(sacct -D -X -n -P -o JobID,State -j "$rq" | tr '\n' ' ')"
[[ $runs == *"$rq|REQUEUED"*"$rq|COMPLETED"* ]] || fail "sacct -D for job $rq: '$runs', expected REQUEUED then COMPLETED"

grep -qx "$SLURM_DPO_NODE" "$OUT"/plain-*.out || fail "hostname job output: $(cat "$OUT"/plain-*.out)"

echo "$rows" | sed 's/^/    /' >&2
log "SMOKE OK in $(since "$T0") s (gpu job saw CUDA_VISIBLE_DEVICES=$got_gpu; requeue kept id $rq)"
