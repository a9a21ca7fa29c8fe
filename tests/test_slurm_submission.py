"""Atomic submission on the real cluster: a refused stage undoes the launch, a launcher killed between
`sbatch` and its record submits no duplicate when relaunched, two launches at once submit once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch
from test_slurm_pipeline import cancel_and_drain, queued_jobs_named, sacct_by_ids, unique_name, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def recorded(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"]


def test_a_refused_stage_cancels_what_the_launch_submitted(slurm_cluster, tmp_path):
    name = unique_name("rej")
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm", "--set", f"name={name}",
                  "--set", "slurm.eval.partition=nosuchpartition", check=False, timeout=300)
    try:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "stage eval_sft: SLURM refused the job" in proc.stderr and "nvalid partition" in proc.stderr
        assert "cancelled the 4 job(s) this launch had submitted" in proc.stderr
        submitted = [line.split("submitted job ")[1].split()[0] for line in proc.stdout.splitlines()
                     if "submitted job" in line]
        assert len(submitted) == 4  # sft, pairs, pairs_merge, dpo (eval_sft, the first stage on slurm.eval, refused)
        wait_for(lambda: not queued_jobs_named(name), 120, "the cancelled jobs to leave the queue")
        states = sacct_by_ids(submitted)
        assert {states[j]["state"] for j in submitted if j in states} <= {"CANCELLED"}
        assert not run_dir.exists()  # a new run refused before any job remained: nothing left behind
    finally:
        cancel_and_drain(run_dir, name)


def test_a_launcher_killed_after_sbatch_submits_no_duplicate(slurm_cluster, tmp_path):
    name = unique_name("kil")
    run_dir = tmp_path / "run"
    args = ("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm", "--set", f"name={name}",
            "--until", "pairs_merge")
    try:
        died = launch(*args, check=False, timeout=300, env={"SLURM_DPO_FAULT_AFTER_SBATCH": "pairs"})
        assert died.returncode == 70, died.stderr
        entries = recorded(run_dir)
        assert [(e["stage"], bool(e["job_id"])) for e in entries] == [("sft", True), ("pairs", False)]
        queued = queued_jobs_named(name)
        pairs_ids = sorted(i for i, j in queued.items() if j["name"] == f"{name}-pairs")
        assert len(pairs_ids) == 2  # the job exists although its record does not
        assert launch("status", "--run-dir", str(run_dir), "--json").returncode == 0  # an intent does not confuse it

        again = launch(*args[:-2], "--until", "pairs_merge", timeout=300)
        assert "pairs: found job" in again.stdout and "not submitting it again" in again.stdout
        queued = queued_jobs_named(name)
        by_stage = {}
        for job_id, job in queued.items():
            by_stage.setdefault(job["name"][len(name) + 1:], set()).add(job_id.split("_")[0])
        assert {stage: len(ids) for stage, ids in by_stage.items() if stage != "sft"} == {"pairs": 1, "pairs_merge": 1}
        entries = recorded(run_dir)
        assert all(e["job_id"] for e in entries)
        pairs = [e for e in entries if e["stage"] == "pairs"]
        assert len(pairs) == 1 and sorted(pairs[0]["tasks"].values()) == pairs_ids
        merge = next(e for e in entries if e["stage"] == "pairs_merge")
        assert f"afterok:{pairs[0]['job_id']}" in queued[merge["job_id"]]["dependency"]  # wired to the found job
    finally:
        cancel_and_drain(run_dir, name)


def test_two_launches_at_once_submit_one_sft_job(slurm_cluster, tmp_path):
    name = unique_name("two")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch.py"), "run", "--preset", "tiny", "--run-dir", str(run_dir),
           "--executor", "slurm", "--set", f"name={name}", "--until", "sft"]
    try:
        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        codes = sorted(p.returncode for p in procs)
        sft_jobs = {i for i, j in queued_jobs_named(name).items() if j["name"] == f"{name}-sft"}
        sft_records = [e for e in recorded(run_dir) if e["stage"] == "sft"]
        assert len(sft_jobs) <= 1 and len(sft_records) == 1, outs
        texts = " ".join(out + err for out, err in outs)
        if codes == [0, 2]:  # they overlapped: the second was refused
            assert "is being launched by pid" in texts
        else:  # the second came after the first: it found the job queued
            assert codes == [0, 0] and "nothing to submit" in texts
    finally:
        cancel_and_drain(run_dir, name)


def test_cancel_also_cancels_a_job_whose_record_was_lost(slurm_cluster, tmp_path):
    name = unique_name("kc")
    run_dir = tmp_path / "run"
    try:
        died = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm", "--set",
                      f"name={name}", "--until", "pairs", check=False, timeout=300,
                      env={"SLURM_DPO_FAULT_AFTER_SBATCH": "pairs"})
        assert died.returncode == 70
        assert {j["name"] for j in queued_jobs_named(name).values()} == {f"{name}-sft", f"{name}-pairs"}
        out = launch("cancel", "--run-dir", str(run_dir), timeout=180).stdout
        assert out.startswith("cancelled 3 job(s)"), out  # sft and the two pairs tasks
        wait_for(lambda: not queued_jobs_named(name), 120, "every job of the run to leave the queue")
    finally:
        cancel_and_drain(run_dir, name)
