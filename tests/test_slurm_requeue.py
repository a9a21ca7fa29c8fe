"""Requeue on the real SLURM cluster: time limits, preemption and SIGKILL lose no (or bounded) work.

Each test clones the finished stages of the tiny run, lengthens the stage under test, submits it
with `launch.py run --until STAGE` and compares the result with the same stage run uninterrupted.
The time-limit tests hold the job once it saved its first checkpoint until SLURM's warning reaches it
(conftest.outlast_the_limit): on a fast machine the tiny stage would otherwise end before it.
"""
import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.rundir.attempts import read_cost
from pipeline.rundir.layout import RunLayout
from conftest import clone_before_dpo, launch, max_weight_difference, outlast_the_limit, start_stage_job, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# USR2 arrives 30-60 s after the start (coarse); a slow machine may need a few requeues
SHORT_LIMIT = {"time": "2", "signal_lead_s": 60, "max_requeues": 6}


def submitted_job(run_dir: Path, stage: str) -> str:
    entries = json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"]
    return [e for e in entries if e["stage"] == stage][-1]["job_id"]


def sacct_history(job_id: str) -> list[tuple[str, str]]:
    """(JobID, State) of every run of the job, requeued ones included (sacct -D), oldest first."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "JobID,State,Submit"],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")[:2]) for line in out.splitlines() if line]


def wait_for_file(path: Path, timeout: float, job_id: str, run_dir: Path) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            status = launch("status", "--run-dir", str(run_dir), check=False).stdout
            raise AssertionError(f"{path} missing after {timeout} s\n{status}\n{sacct_history(job_id)}")
        time.sleep(2)


def assert_requeued_and_finished(run_dir: Path, stage_dir: Path, stage: str, cause: str) -> dict:
    job_id = submitted_job(run_dir, stage)
    wait_for_file(stage_dir / "DONE.json", 480, job_id, run_dir)
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    assert len(json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"]) == 1  # never resubmitted
    for _ in range(30):  # sacct lags the job's end by a moment
        history = sacct_history(job_id)
        if history and history[-1][1] == "COMPLETED":
            break
        time.sleep(1)
    assert {jid for jid, _ in history} == {job_id}, history      # the same job id throughout
    assert "REQUEUED" in [state for _, state in history] and history[-1][1] == "COMPLETED", history
    assert len(manifest["restarts"]) >= 1 and {r["cause"] for r in manifest["restarts"]} == {cause}
    assert manifest["lost_steps"] == 0, manifest["restarts"]
    for restart in manifest["restarts"]:
        assert restart["resumed_from_step"] == restart["step_before"] > 0
    return manifest


def test_dpo_requeues_on_its_time_limit_and_matches_an_uninterrupted_run(tiny_run, tmp_path, slurm_cluster):
    epochs = 2  # 150 steps: held from the first checkpoint (25) until the warning, then resumed across an epoch
    changes = {"dpo": {"betas": [0.1], "epochs": float(epochs)}, "slurm": {"dpo": SHORT_LIMIT}}
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", wandb={"enabled": True, "mode": "offline"}, **changes)
    reference = clone_before_dpo(tiny_run, tmp_path / "reference", **changes)
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    uninterrupted = start_stage_job(reference, "dpo", "0.1")
    stage_dir = run_dir / "dpo" / "beta-0.1"
    outlast_the_limit(run_dir, "dpo", "dpo/beta-0.1/checkpoints/checkpoint-*/COMPLETE.json")  # training
    manifest = assert_requeued_and_finished(run_dir, stage_dir, "dpo", "timeout")
    assert manifest["metrics"]["global_step"] == epochs * 75
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out
    assert max_weight_difference(stage_dir / "final", reference / "dpo" / "beta-0.1" / "final") <= 1e-6
    # every attempt logged to the same offline wandb run (offline-run-<date>_<time>-<id> per attempt)
    attempts = [p for p in (run_dir / "wandb").rglob("offline-run-*") if p.is_dir()]
    assert len(attempts) == 1 + len(manifest["restarts"])
    assert {p.name.split("-", 3)[-1] for p in attempts} == {json.loads((stage_dir / "wandb_run.json").read_text())["id"]}
    rows = json.loads(launch("status", "--run-dir", str(run_dir), "--json").stdout)
    dpo_row = next(r for r in rows if r["stage"] == "dpo")
    assert dpo_row["restarts"] >= 1 and dpo_row["lost_steps"] == 0 and dpo_row["state"] == "COMPLETED"
    # what the requeues cost: every attempt recorded by the job itself, the requeued ones as such
    records = [json.loads(line) for line in (run_dir / "jobs" / "attempts" / "dpo" / "0.1.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["requeued:timeout"] * dpo_row["restarts"] + ["completed"]
    assert [r["restart"] for r in records] == list(range(len(records))) and records[0]["executor"] == "slurm"
    cost = dpo_row["cost"]  # from the accounting database: every run of the job, requeued ones as such
    assert cost["source"] == "sacct" and cost["attempts"] == len(records) and cost["gpu_hours"] == 0, cost
    assert 0 < cost["requeued_cpu_hours"] < cost["cpu_hours"]
    # sacct times the whole allocation, the job's records from the moment its Python started the stage
    recorded = read_cost(RunLayout(run_dir), "dpo", "0.1")
    assert recorded.cpu_hours - len(records) / 3600 <= cost["cpu_hours"] <= recorded.cpu_hours + 120 * len(records) / 3600
    print(f"dpo arm with {len(records)} attempt(s): sacct {cost}; the job's records {recorded}")


def test_lora_dpo_requeues_on_its_time_limit_and_matches_an_uninterrupted_run(tiny_run, tmp_path, slurm_cluster):
    from test_lora import LORA, adapter_difference

    epochs = 2  # 150 steps, as the full fine-tune above
    changes = {"dpo": {"betas": [0.1], "epochs": float(epochs), "lora": LORA}, "slurm": {"dpo": SHORT_LIMIT}}
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", **changes)
    reference = clone_before_dpo(tiny_run, tmp_path / "reference", **changes)
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    uninterrupted = start_stage_job(reference, "dpo", "0.1")
    stage_dir = run_dir / "dpo" / "beta-0.1"
    outlast_the_limit(run_dir, "dpo", "dpo/beta-0.1/checkpoints/checkpoint-*/COMPLETE.json")  # training
    manifest = assert_requeued_and_finished(run_dir, stage_dir, "dpo", "timeout")
    assert manifest["metrics"]["global_step"] == epochs * 75
    assert not list(stage_dir.rglob("model*.safetensors"))  # adapters only, checkpoints and final alike
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out
    assert adapter_difference(stage_dir / "final", reference / "dpo" / "beta-0.1" / "final") <= 1e-6


def test_sft_requeues_on_its_time_limit_and_matches_an_uninterrupted_run(tiny_run, tmp_path, slurm_cluster):
    changes = {"sft": {"epochs": 2.0}, "slurm": {"sft": SHORT_LIMIT}}
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", stages=("data",), **changes)
    reference = clone_before_dpo(tiny_run, tmp_path / "reference", stages=("data",), **changes)
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "sft")
    uninterrupted = start_stage_job(reference, "sft", None)
    outlast_the_limit(run_dir, "sft", "sft/checkpoints/checkpoint-*/COMPLETE.json")  # training
    manifest = assert_requeued_and_finished(run_dir, run_dir / "sft", "sft", "timeout")
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out
    assert manifest["metrics"]["global_step"] == json.loads((reference / "sft" / "DONE.json").read_text())[
        "metrics"]["global_step"]
    assert max_weight_difference(run_dir / "sft" / "final", reference / "sft" / "final") <= 1e-6


def test_preemption_by_scontrol_requeue_loses_no_steps(tiny_run, tmp_path, slurm_cluster):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", dpo={"betas": [0.1], "epochs": 2.0})
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    stage_dir = run_dir / "dpo" / "beta-0.1"
    job_id = submitted_job(run_dir, "dpo")
    wait_for_step(stage_dir / "progress.json", 40, None, timeout=300)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    manifest = assert_requeued_and_finished(run_dir, stage_dir, "dpo", "terminated")
    assert manifest["metrics"]["global_step"] == 150


def test_sigkill_then_resume_continues_from_the_last_complete_checkpoint(tiny_run, tmp_path, slurm_cluster):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "slurm", dpo={"betas": [0.1], "epochs": 2.0})
    launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    stage_dir = run_dir / "dpo" / "beta-0.1"
    first_job = submitted_job(run_dir, "dpo")
    wait_for_step(stage_dir / "progress.json", 32, None, timeout=300)
    # the job's Python process dies without any warning (as on a node failure)
    subprocess.run(["pkill", "-KILL", "-f", f"submitit.core._submit {run_dir}/jobs/dpo"], check=True)
    deadline = time.time() + 120
    while sacct_history(first_job)[-1][1] not in ("FAILED", "CANCELLED", "NODE_FAIL"):
        assert time.time() < deadline, sacct_history(first_job)
        time.sleep(1)
    killed_at = json.loads((stage_dir / "progress.json").read_text())["step"]
    proc = launch("resume", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo")
    second_job = submitted_job(run_dir, "dpo")
    assert second_job != first_job and "submitted job" in proc.stdout
    wait_for_file(stage_dir / "DONE.json", 480, second_job, run_dir)
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    (restart,) = manifest["restarts"]
    assert restart["cause"] == "killed" and restart["resumed_from_step"] == 25
    assert manifest["lost_steps"] == killed_at - 25 and manifest["metrics"]["global_step"] == 150
    rows = json.loads(launch("status", "--run-dir", str(run_dir), "--json").stdout)
    cost = next(r for r in rows if r["stage"] == "dpo")["cost"]
    # from the accounting database, which timed the killed job too (all of it lost: a new job redid the task)
    assert cost["source"] == "sacct" and cost["attempts"] == 2 and cost["unmeasured_attempts"] == 0, cost
    assert 0 < cost["requeued_cpu_hours"] < cost["cpu_hours"], cost
    recorded = read_cost(RunLayout(run_dir), "dpo", "0.1")
    assert recorded.attempts == 2 and recorded.unmeasured == 1  # the job's own records: the killed one has no end


def test_peer_loss_is_recognised_through_the_exception_chain():
    from jobs.stages import lost_a_peer

    class DistBackendError(RuntimeError):
        pass

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    wrapped = ValueError("training step failed")
    wrapped.__cause__ = gloo
    assert lost_a_peer(gloo) and lost_a_peer(wrapped) and lost_a_peer(DistBackendError("NCCL error"))
    assert not lost_a_peer(RuntimeError("CUDA out of memory")) and not lost_a_peer(KeyError("loss"))
