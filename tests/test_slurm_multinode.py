"""Multi-node jobs on the project's test cluster: several `slurmd -N NAME` on this host (vm, vm2, vm3).

A DPO stage runs on 2 nodes x 1 task under ZeRO-2 (gloo on the CPU): it survives its time limit
with no lost step, continues on 1 node from the same step, and survives a node losing power (its
slurmd and every process of the job on it SIGKILLed) with no command from the user, on the spare node.
"""
import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, clone_before_dpo, launch, outlast_the_limit, wait_for_step
from test_slurm_requeue import SHORT_LIMIT, sacct_history, submitted_job, wait_for_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = REPO / "slurm" / "cluster"
TWO_NODES = {"nodes": 2, "gpus_per_node": 1}  # one task per node (per fake GPU)


def job_nodes(job_id: str) -> list[list[str]]:
    """The nodes of every run of the job (requeued runs included), oldest first."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True,
                         text=True, check=True).stdout
    runs = []
    for line in out.splitlines():
        if line.strip() and line.strip() != "None assigned":
            names = subprocess.run(["scontrol", "show", "hostnames", line.strip()], capture_output=True, text=True,
                                   check=True).stdout.split()
            runs.append(names)
    return runs


def progress(stage_dir: Path) -> dict:
    try:
        return json.loads((stage_dir / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_until(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not after {timeout} s")


def test_two_nodes_survive_a_time_limit_then_continue_on_one_node(tiny_run, tmp_path, slurm_cluster):
    # 12 x 75 = 900 steps; one requeue allowed, then the job gives up
    epochs = 12
    changes = {"dpo": {"betas": [0.1], "epochs": float(epochs)}, "distributed": {"zero_stage": 2},
               "slurm": {"dpo": {**SHORT_LIMIT, **TWO_NODES, "max_requeues": 1}}}
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", **changes)
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    stage_dir = run_dir / "dpo" / "beta-0.1"
    job_id = submitted_job(run_dir, "dpo")
    # both attempts outlast their limit whatever the machine's speed (conftest.outlast_the_limit): the first
    # once it saved a checkpoint, the second once it trained past the step it resumed from
    outlast_the_limit(run_dir, "dpo", "dpo/beta-0.1/checkpoints/checkpoint-*/COMPLETE.json", ranks=2)

    def second_attempt_training() -> bool:
        now = progress(stage_dir)
        restarts = now.get("restarts") or []
        return len(restarts) == 1 and now.get("status") == "running" and now.get("step", 0) > restarts[0]["resumed_from_step"]

    outlast_the_limit(run_dir, "dpo", second_attempt_training, ranks=2)

    # 1. on 2 nodes: the time limit requeues it once (same job id), then it gives up with a checkpoint
    history = wait_until(lambda: (h := sacct_history(job_id)) and h[-1][1] in ("FAILED", "COMPLETED") and h,
                         600, f"job {job_id} to end after its requeue budget")
    assert [state for _, state in history] == ["REQUEUED", "FAILED"], history
    assert all(len(set(nodes)) == 2 for nodes in job_nodes(job_id)), job_nodes(job_id)  # two nodes each run
    logs = sorted((run_dir / "jobs" / "dpo").glob(f"{job_id}_*_log.out"))
    assert len(logs) == 2, logs  # one log per task (rank)
    assert "gave up after 1 requeues" in (run_dir / "jobs" / "dpo" / f"{job_id}_0_log.err").read_text()
    on_two = progress(stage_dir)
    (timeout_restart,) = on_two["restarts"]
    assert timeout_restart["cause"] == "timeout" and timeout_restart["world_size"] == 2
    assert timeout_restart["resumed_from_step"] == timeout_restart["step_before"] > 0  # 0 steps lost
    stopped_at = on_two["step"]
    assert on_two["status"] == "interrupted" and on_two["stop_reason"] == "timeout"
    assert on_two["last_checkpoint"] == f"checkpoint-{stopped_at}"  # saved at the stop, not before it
    # the stop-save was timed on the cluster; status warns exactly when it used over half of SLURM's warning time
    row = next(r for r in json.loads(launch("status", "--run-dir", str(run_dir), "--json").stdout) if r["stage"] == "dpo")
    saved = json.loads((stage_dir / "checkpoints" / f"checkpoint-{stopped_at}" / "COMPLETE.json").read_text())
    assert row["stop_save_s"] == on_two["stop_save_s"] == saved["save_s"] > 0 and saved["reason"] == "timeout"
    assert bool(row["warnings"]) == (row["stop_save_s"] > SHORT_LIMIT["signal_lead_s"] / 2), row

    # 2. resubmitted on 1 node (fewer nodes are free): the same step, one process, a universal checkpoint
    proc = launch("resume", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo",
                  "--set", "slurm.dpo.nodes=1", "--set", "slurm.dpo.time=30")
    assert "slurm resources changed for the jobs submitted from now on: slurm.dpo.nodes, slurm.dpo.time" in proc.stdout
    second_job = submitted_job(run_dir, "dpo")
    assert second_job != job_id
    wait_for_step(stage_dir / "progress.json", stopped_at + 5, None, timeout=300)
    on_one = progress(stage_dir)
    restart = on_one["restarts"][-1]
    assert restart["resumed_from_step"] == restart["step_before"] == stopped_at  # continues, nothing lost
    assert restart["world_size"] == 1 and restart["universal_checkpoint"]
    assert (stage_dir / "checkpoints" / f"checkpoint-{stopped_at}" / "latest_universal").is_file()
    assert len(job_nodes(second_job)[-1]) == 1
    launch("cancel", "--run-dir", str(run_dir))


@pytest.fixture
def node_to_power_off():
    """The node this test powers off; brought back (and resumed) afterwards for the tests that follow."""
    powered_off = []
    yield powered_off
    if powered_off:
        subprocess.run(["bash", str(CLUSTER / "start.sh")], capture_output=True, timeout=300, check=True)


def test_a_node_that_loses_power_requeues_the_job_onto_the_spare_node(tiny_run, tmp_path, slurm_cluster,
                                                                      node_to_power_off):
    """Rank 1's node loses power mid-training: rank 0's collective fails; rather than failing the job it
    waits for the controller to mark the node DOWN, SLURM ends the job NODE_FAIL and requeues it (same
    id) on the spare node; it resumes from the last periodic checkpoint and the stage completes with no
    command from the user."""
    changes = {"dpo": {"betas": [0.1], "epochs": 2.0}, "distributed": {"zero_stage": 2},
               "slurm": {"dpo": {"time": "30", **TWO_NODES, "max_requeues": 3}}}
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", **changes)
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    stage_dir = run_dir / "dpo" / "beta-0.1"
    job_id = submitted_job(run_dir, "dpo")
    killed_at = wait_for_step(stage_dir / "progress.json", 28, None, timeout=600)
    (first_nodes,) = job_nodes(job_id)
    victim = first_nodes[-1]  # rank 1's node; never the controller's host (sorted first when allocated)
    started = time.time()
    node_to_power_off.append(victim)
    subprocess.run(["bash", str(CLUSTER / "power_off.sh"), victim], check=True, capture_output=True)

    wait_for_file(stage_dir / "DONE.json", 600, job_id, run_dir)
    recovered_s = time.time() - started
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    assert len(json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"]) == 1  # no user command
    (restart,) = manifest["restarts"]
    assert restart["resumed_from_step"] == 25 and restart["step_before"] >= killed_at
    assert manifest["lost_steps"] == restart["step_before"] - 25 <= 25  # at most one checkpoint interval
    assert manifest["metrics"]["global_step"] == 2 * math.ceil(math.ceil(manifest["inputs"]["num_pairs"] / 2) / 16)
    history = wait_until(lambda: (h := sacct_history(job_id)) and h[-1][1] == "COMPLETED" and h, 60,
                         "sacct to show the job completed")
    # the surviving rank kept the job alive until SLURM declared the node dead: NODE_FAIL, then requeued
    assert {jid for jid, _ in history} == {job_id} and [s for _, s in history] == ["NODE_FAIL", "COMPLETED"], history
    runs = job_nodes(job_id)
    assert victim not in runs[-1] and len(set(runs[-1])) == 2, runs  # the spare node took its place
    node_state = subprocess.run(["sinfo", "-h", "-N", "-n", victim, "-o", "%T"], capture_output=True,
                                text=True).stdout.strip()
    assert node_state.startswith("down") or node_state.endswith("*"), node_state  # DOWN, or still not answering
    out = (run_dir / "jobs" / "dpo" / f"{job_id}_0_log.out").read_text()
    assert "lost a peer" in out and f"node(s) {victim} stopped answering" in out
    print(f"node {victim} powered off at step {killed_at}: {manifest['lost_steps']} steps lost, "
          f"stage done {recovered_s:.0f} s later")
