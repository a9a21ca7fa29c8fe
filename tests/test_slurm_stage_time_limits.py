"""Pairs and eval outlast their SLURM time limit and still finish, with no command from the user.

Both sample in batches saved as they go (pipeline.evaluation.sampling.sample_resumable) and check the stop flag
at each batch (and eval at each policy): SLURM's USR2 warning stops them at the next boundary, the
job requeues itself (same id) and the next attempt continues from the saved batches. The two stages
run side by side (two run directories) to share the wait.

The tiny model samples so fast that both stages can finish before SLURM's warning (sent 30-60 s
after the start with a 2-minute limit and a 60 s lead), so each stage is made to outlast its limit
(conftest.outlast_the_limit): held once it has saved its first sampling batch, until the warning
reaches it, then let go. The warning arrives mid-work, with batches already saved.
"""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import clone_before_dpo, launch, outlast_the_limit
from test_slurm_requeue import SHORT_LIMIT, sacct_history, submitted_job, wait_for_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RESTORED = re.compile(r"(\S+ \S+(?: \d+)?): (\d+) sampling batch\(es\) restored")


def requeued_then_completed(job_id: str) -> list[str]:
    """The states of every run of `job_id` (a one-task array's task is listed under the array's id)."""
    deadline = time.time() + 60  # the manifest is written just before the job ends; sacct lags a moment
    while (states := [state for _, state in sacct_history(job_id)])[-1:] != ["COMPLETED"]:
        assert time.time() < deadline, states
        time.sleep(1)
    assert {jid for jid, _ in sacct_history(job_id)} <= {job_id, f"{job_id}_0"}  # the same job throughout
    assert states.count("REQUEUED") >= 1 and states[-1] == "COMPLETED", states
    return states


def job_log(run_dir: Path, stage: str, job_id: str) -> str:
    """Every attempt's stdout (a requeued job appends to its log)."""
    return "".join(p.read_text() for p in sorted((run_dir / "jobs" / stage).glob(f"{job_id}*_log.out")))


def test_pairs_and_eval_survive_their_time_limits(tiny_run, tmp_path, slurm_cluster):
    # pairs: one shard of 200 prompts x 24 completions in 120 sampling batches;
    # eval: every tiny policy (SFT + 3 arms' checkpoints) with 16 samples per prompt in 12 batches each; the
    # SFT row's task (eval_sft) is the one held past its limit, the arms' tasks (eval_arms) run beside it
    pairs_run = clone_before_dpo(tiny_run, tmp_path / "pairs", stages=("data", "sft"),
                                 pairs={"num_shards": 1, "completions_per_prompt": 24, "max_new_tokens": 112,
                                        "batch_size": 40},
                                 slurm={"pairs": SHORT_LIMIT})
    eval_run = clone_before_dpo(tiny_run, tmp_path / "eval", stages=("data", "sft", "pairs", "dpo"),
                                eval={"samples_per_prompt": 16, "batch_size": 64}, slurm={"eval": SHORT_LIMIT})
    launch("run", "--run-dir", str(pairs_run), "--executor", "slurm", "--until", "pairs_merge")
    launch("run", "--run-dir", str(eval_run), "--executor", "slurm", "--until", "eval")
    pairs_job, merge_job, eval_job, assemble_job = (
        submitted_job(pairs_run, "pairs"), submitted_job(pairs_run, "pairs_merge"), submitted_job(eval_run, "eval_sft"),
        submitted_job(eval_run, "eval"))
    with ThreadPoolExecutor(2) as pool:  # both held at once: each job's clock runs from its own start
        holds = [pool.submit(outlast_the_limit, pairs_run, "pairs", "pairs/shards/shard-00000.partial/batch-*.jsonl"),
                 pool.submit(outlast_the_limit, eval_run, "eval_sft", "eval/policies/sft.partial/batch-*.jsonl")]
        for hold in holds:
            hold.result()
    wait_for_file(pairs_run / "pairs" / "DONE.json", 600, pairs_job, pairs_run)
    wait_for_file(eval_run / "eval" / "DONE.json", 600, assemble_job, eval_run)
    for run_dir in (pairs_run, eval_run):  # one launch each, no stage submitted twice: every requeue was the job's own
        stages = [entry["stage"] for entry in json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"]]
        assert len(stages) == len(set(stages)), stages

    # pairs: the shard was stopped and requeued, each attempt continued from the batches saved before it,
    # and the merge behind it (afterok) ran once the shard was done
    pairs_states = requeued_then_completed(pairs_job)
    restored = [int(n) for _, n in RESTORED.findall(job_log(pairs_run, "pairs", pairs_job))]
    # (an attempt stopped before its first batch was saved restores nothing and prints no line)
    assert 1 <= len(restored) <= pairs_states.count("REQUEUED") and restored == sorted(restored) and restored[0] > 0
    manifest = json.loads((pairs_run / "pairs" / "DONE.json").read_text())["metrics"]
    assert manifest["prompts"] == 200 and manifest["completions"] == 200 * 24
    assert manifest["pairs"] + manifest["pairs_dropped_ties"] == 200 * 24 * 23 // 2
    assert [state for _, state in sacct_history(merge_job)] == ["COMPLETED"]
    assert not (pairs_run / "pairs" / "shards" / "shard-00000.partial").exists()  # partial batches cleaned up

    # eval: the SFT row's task stopped and requeued; every restart resumed at the policy it stopped in (no
    # policy redone) and within it from the saved batches; the assembly behind it (afterok) ran once
    eval_states = requeued_then_completed(eval_job)
    progress = json.loads((eval_run / "eval" / "tasks" / "sft" / "progress.json").read_text())
    assert len(progress["restarts"]) == eval_states.count("REQUEUED")
    for restart in progress["restarts"]:
        assert restart["cause"] == "timeout" and restart["resumed_from_step"] == restart["step_before"]
    policies = json.loads((eval_run / "eval" / "DONE.json").read_text())["inputs"]["policies"]
    rows = (eval_run / "eval" / "frontier.csv").read_text().splitlines()[1:]
    assert len(rows) == len(policies) == len(list((eval_run / "eval" / "policies").glob("*.json")))
    in_policy = RESTORED.findall(job_log(eval_run, "eval_sft", eval_job))
    assert in_policy and all(label == "eval sft" and int(n) > 0 for label, n in in_policy), in_policy
    assert [state for _, state in sacct_history(assemble_job)] == ["COMPLETED"]
    print(f"pairs: {pairs_states}, batches restored per restart {restored}; eval: {eval_states}, restarts "
          f"{[(r['step_before'], r['resumed_from_step']) for r in progress['restarts']]}, "
          f"in-policy restores {in_policy}")
