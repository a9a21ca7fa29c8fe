"""A cluster without an accounting database (AccountingStorageType=accounting_storage/none, no slurmdbd),
as many small clusters run: `sacct` fails, so `status`, relaunch and `cancel` see live jobs through
`squeue` and finished ones through the run directory (DONE markers, progress, RUN/jobs/jobs.json).

The test cluster is restarted that way for this module (slurm/cluster/start.sh with
SLURM_DPO_ACCOUNTING=none) and restored afterwards, also on failure. The pipeline is tiny's with fewer
SFT steps, prompts and eval samples: every stage runs, as cheaply as it can.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cluster_with, launch
from test_slurm_pipeline import (ACTIVE, BROKEN, STAGES, TINY_TASKS, failure_logs, status_rows, submissions,
                                 unique_name, wait_for)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CHEAP = ("--set", "sft.epochs=0.25", "--set", "pairs.num_prompts=32", "--set", "eval.num_prompts=8")
PIPELINE_TIMEOUT_S = 10 * 60


def known_to_controller(name: str) -> dict[str, str]:
    """job id -> state of every job named `<name>-*` the controller still holds (finished ones for MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%j|%T"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return {i: s for i, j, s in (line.split("|") for line in out.splitlines() if line.strip())
            if j.startswith(f"{name}-")}


def relaunch(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch("run", "--run-dir", str(run_dir), "--executor", "slurm", *extra, timeout=180)


@pytest.fixture(scope="module")
def no_accounting(slurm_cluster):
    with cluster_with({"SLURM_DPO_ACCOUNTING": "none"}) as config:
        assert re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none\s*$", config, re.M), config
        sacct = subprocess.run(["sacct", "-X", "-n", "-j", "1"], capture_output=True, text=True, timeout=60)
        assert sacct.returncode != 0, (sacct.stdout, sacct.stderr)  # no database to ask
        yield sacct.stderr.strip()


@pytest.fixture(scope="module")
def finished_run(no_accounting, tmp_path_factory):
    """The cheap tiny pipeline submitted, relaunched at once (while queued), polled until it finished."""
    run_dir = tmp_path_factory.mktemp("noacct") / "run"
    name = unique_name("tna")
    started = time.time()
    submit = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm",
                    "--set", f"name={name}", *CHEAP, timeout=180)
    jobs_json = (run_dir / "jobs" / "jobs.json").read_bytes()
    again = relaunch(run_dir)
    assert (run_dir / "jobs" / "jobs.json").read_bytes() == jobs_json
    polls = []
    try:
        deadline = time.time() + PIPELINE_TIMEOUT_S
        while True:
            rows = status_rows(run_dir)
            polls.append(rows)
            broken = [r for r in rows if r["state"] in BROKEN or r["state"] == "ENDED"]
            assert not broken, f"{broken}\n{failure_logs(run_dir, rows)}"
            if all(r["done"] and r["state"] not in ACTIVE for r in rows):
                break
            assert time.time() < deadline, [(r["stage"], r["task"], r["state"]) for r in rows]
            time.sleep(2.5)
        yield {"run_dir": run_dir, "name": name, "submit": submit, "again": again, "polls": polls,
               "pipeline_s": time.time() - started}
    finally:
        launch("cancel", "--run-dir", str(run_dir), check=False, timeout=180)


def test_a_relaunch_while_the_jobs_are_queued_submits_nothing(finished_run):
    subs = submissions(finished_run["run_dir"])
    assert [s["stage"] for s in subs] == STAGES
    again = finished_run["again"].stdout
    assert "nothing to submit" in again and "submitted job" not in again, again


def test_the_pipeline_completes_and_status_shows_every_stage(finished_run):
    run_dir = finished_run["run_dir"]
    expected = [(stage, task) for stage in STAGES for task in TINY_TASKS[stage]]
    for rows in finished_run["polls"]:
        assert [(r["stage"], r["task"]) for r in rows] == expected
        assert all(r["job_id"] and r["state"] for r in rows), rows
    seen = {(r["stage"], r["state"]) for rows in finished_run["polls"] for r in rows}
    assert ("sft", "RUNNING") in seen and ("eval", "PENDING") in seen, seen  # live states from squeue
    assert (run_dir / "eval" / "frontier.csv").is_file()
    # once the controller forgot the jobs (MinJobAge), the run directory still says what finished
    wait_for(lambda: not known_to_controller(finished_run["name"]), 120, "the controller to forget the jobs")
    rows = status_rows(run_dir)
    assert [(r["stage"], r["task"], r["state"], r["done"]) for r in rows] == [
        (stage, task, "COMPLETED", True) for stage, task in expected]
    dpo = [r for r in rows if r["stage"] == "dpo"]
    assert all(r["step"] == r["total_steps"] and r["total_steps"] > 0 for r in dpo), dpo
    table = launch("status", "--run-dir", str(run_dir), timeout=180).stdout
    assert len(re.findall(r"\bCOMPLETED\b", table)) == len(expected), table
    # what it cost: no accounting database to ask, so from the attempt records the jobs wrote themselves
    assert all(r["cost"]["source"] == "run directory" and r["cost"]["attempts"] == 1 for r in rows), rows
    assert re.search(r"^cost total: .* CPU-h .*; 12 attempt\(s\), 0 step\(s\) lost \(from the jobs' attempt records\)$",
                     table, re.M), table


def test_a_relaunch_of_the_finished_run_submits_nothing(finished_run):
    run_dir, name = finished_run["run_dir"], finished_run["name"]
    wait_for(lambda: not known_to_controller(name), 120, "the controller to forget the jobs")
    jobs_json = (run_dir / "jobs" / "jobs.json").read_bytes()
    proc = relaunch(run_dir)
    assert "nothing to submit" in proc.stdout and "submitted job" not in proc.stdout, proc.stdout
    assert (run_dir / "jobs" / "jobs.json").read_bytes() == jobs_json
    assert not known_to_controller(name)
    print(f"no-accounting tiny pipeline: {finished_run['pipeline_s']:.0f} s from submission to the last job")


def test_cancel_and_a_relaunch_after_it(no_accounting, tmp_path):
    run_dir = tmp_path / "run"
    name = unique_name("tnc")
    args = ("--until", "sft")
    try:
        launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm", "--set", f"name={name}",
               *CHEAP, *args, timeout=180)
        (first,) = [s["job_id"] for s in submissions(run_dir)]
        assert [r["state"] for r in status_rows(run_dir) if r["stage"] == "sft"][0] in ("PENDING", "RUNNING")
        proc = launch("cancel", "--run-dir", str(run_dir), timeout=180)
        assert proc.stdout.strip() == f"cancelled 1 job(s): {first}", proc.stdout
        wait_for(lambda: not known_to_controller(name), 120, "the cancelled job to leave the controller")
        (sft,) = [r for r in status_rows(run_dir) if r["stage"] == "sft"]
        assert (sft["state"], sft["done"], sft["job_id"]) == ("ENDED", False, first), sft  # gone, not done
        assert launch("cancel", "--run-dir", str(run_dir), timeout=180).stdout.strip() == "no queued or running jobs"
        # the relaunch resubmits the task SLURM forgot without finishing it
        again = relaunch(run_dir, *args).stdout
        (second,) = re.findall(r"sft: submitted job (\d+)", again)
        assert second != first
        assert json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"][-1]["job_id"] == second
        (sft,) = [r for r in status_rows(run_dir) if r["stage"] == "sft"]
        assert sft["job_id"] == second and sft["state"] in ("PENDING", "RUNNING") and sft["submissions"] == 2, sft
        assert launch("cancel", "--run-dir", str(run_dir), timeout=180).stdout.strip() == \
            f"cancelled 1 job(s): {second}"
    finally:
        launch("cancel", "--run-dir", str(run_dir), check=False, timeout=180)
        wait_for(lambda: not {i for i, s in known_to_controller(name).items() if s in ACTIVE}, 120,
                 "the run's jobs to leave the queue")
