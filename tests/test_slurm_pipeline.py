"""The tiny pipeline on the project's real SLURM cluster, through the real `sbatch`.

One full run (module fixture `slurm_run`) is shared by the tests on submission, `status`,
`afterok` ordering, the beta array, idempotent relaunch and `logs`; a second, separate run is
cancelled while its SFT job runs and then relaunched (`cancelled_run`). `--dry-run` and refused
resource values submit nothing.

Every run gets a unique `name` (job names are `<name>-<stage>`), so the assertions that nothing was
submitted look only at this module's jobs and stay valid when someone else uses the cluster too.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from conftest import launch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STAGES = ["sft", "pairs", "pairs_merge", "dpo", "eval_sft", "eval_arms", "eval"]
UPSTREAM = {"sft": [], "pairs": ["sft"], "pairs_merge": ["pairs"], "dpo": ["pairs_merge"], "eval_sft": ["sft"],
            "eval_arms": ["dpo"], "eval": ["eval_sft", "eval_arms"]}
CORRESPONDING = {"eval_arms": "dpo"}  # task i waits for the upstream array's task i alone (aftercorr)
TINY_TASKS = {"sft": [None], "pairs": ["0", "1"], "pairs_merge": [None], "dpo": ["0.05", "0.1", "1.0"],
              "eval_sft": ["sft"], "eval_arms": ["0.05", "0.1", "1.0"], "eval": [None]}
ROW_KEYS = {"stage", "task", "job_id", "state", "done", "node", "elapsed_s", "step", "total_steps", "restarts",
            "resumed_from", "lost_steps", "last_checkpoint", "eta_s", "submissions", "stop_save_s", "warnings", "summary"}
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}
BROKEN = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}

PIPELINE_TIMEOUT_S = 15 * 60   # the whole tiny pipeline takes ~2-4 min on 2 idle cores
POLL_S = 2.5                   # between two `status --json` polls
SLURM_WAIT_S = 120             # for the queue / accounting to catch up (cancel, dependency evaluation)


# ------------------------------------------------------------------ helpers
def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def slurm_cmd(*cmd: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def status_rows(run_dir: Path) -> list[dict]:
    return json.loads(launch("status", "--run-dir", str(run_dir), "--json", timeout=180).stdout)


def submissions(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"]


def latest_ids(run_dir: Path) -> dict[tuple[str, str], str]:
    """(stage, task key) -> job id of the newest submission, as jobs.json records it."""
    found = {}
    for sub in submissions(run_dir):
        for task, job_id in sub["tasks"].items():
            found[(sub["stage"], task)] = job_id
    return found


def squeue() -> dict[str, dict]:
    """Every job the controller lists now (pending, running, completing), one entry per array task."""
    out = slurm_cmd("squeue", "-h", "-r", "-o", "%i|%j|%T|%r|%E")
    jobs = {}
    for line in out.splitlines():
        if line.strip():
            job_id, name, state, reason, dependency = line.split("|", 4)
            jobs[job_id] = {"name": name, "state": state, "reason": reason, "dependency": dependency}
    return jobs


def queued_jobs_named(name: str) -> dict[str, dict]:
    return {i: j for i, j in squeue().items() if j["name"].startswith(f"{name}-")}


def sacct_by_ids(job_ids) -> dict[str, dict]:
    """JobID -> {submit, start, end, state} (state normalised: 'CANCELLED by 0' -> 'CANCELLED')."""
    out = slurm_cmd("sacct", "-X", "-P", "-n", "-j", ",".join(sorted(set(job_ids))),
                    "-o", "JobID,Submit,Start,End,State")
    rows = {}
    for line in out.splitlines():
        if line.strip():
            job_id, submit, start, end, state = line.split("|")
            rows[job_id] = {"submit": _when(submit), "start": _when(start), "end": _when(end),
                            "state": state.split()[0].rstrip("+") if state.strip() else "UNKNOWN"}
    return rows


def sacct_ids_named(name: str, since: float) -> set[str]:
    """Ids of every job (array tasks included) whose name is `<name>-<stage>`, submitted after `since`."""
    names = ",".join(f"{name}-{stage}" for stage in STAGES)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 120))
    out = slurm_cmd("sacct", "-X", "-P", "-n", "-S", start, "--name", names, "-o", "JobID,JobName")
    return {line.split("|")[0] for line in out.splitlines() if line.strip()}


def _when(text: str) -> datetime | None:
    text = text.strip()
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # Unknown / None for a job that never started or has not ended
        return None


def stage_of(job_id: str, run_dir: Path) -> str:
    parent = job_id.split("_")[0]
    for sub in submissions(run_dir):
        if sub["job_id"] == parent:
            return sub["stage"]
    raise AssertionError(f"job {job_id} is not in {run_dir}/jobs/jobs.json")


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def submit_tiny(run_dir: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm",
                  "--set", f"name={name}", *extra, timeout=180)


def cancel_and_drain(run_dir: Path, name: str) -> None:
    """Best effort clean-up: cancel the run's jobs and wait until none of them is queued."""
    if (run_dir / "jobs" / "jobs.json").is_file():
        launch("cancel", "--run-dir", str(run_dir), check=False, timeout=180)
    ids = list(queued_jobs_named(name))
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    deadline = time.time() + SLURM_WAIT_S
    while queued_jobs_named(name) and time.time() < deadline:
        time.sleep(1)


def failure_logs(run_dir: Path, rows: list[dict]) -> str:
    parts = []
    for row in rows:
        if row["state"] in BROKEN:
            args = ["logs", row["stage"], "--run-dir", str(run_dir), "--stderr", "--lines", "40"]
            if row["task"] is not None:
                args += ["--task", row["task"]]
            proc = launch(*args, check=False, timeout=60)
            parts.append(f"--- {row['stage']}[{row['task']}] {row['job_id']} {row['state']}\n{proc.stdout}{proc.stderr}")
    return "\n".join(parts)


# ------------------------------------------------------------------ the shared full run
@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """Submit the whole tiny pipeline, then poll `status --json` until eval/frontier.csv exists and
    every job finished. Yields the run dir, the submit output and every poll (time, rows)."""
    run_dir = tmp_path_factory.mktemp("slurm_pipeline") / "run"
    name = unique_name("tsp")
    started = time.time()
    proc = submit_tiny(run_dir, name)
    submit_s = time.time() - started
    polls: list[tuple[float, list[dict]]] = []
    try:
        deadline = time.time() + PIPELINE_TIMEOUT_S
        while True:
            rows = status_rows(run_dir)
            polls.append((time.time(), rows))
            broken = [r for r in rows if r["state"] in BROKEN]
            if broken:
                pytest.fail(f"a job of the SLURM run failed: {broken}\n{failure_logs(run_dir, rows)}")
            finished = all(r["done"] and r["state"] not in ACTIVE for r in rows)
            if (run_dir / "eval" / "frontier.csv").is_file() and finished:
                break
            if time.time() > deadline:
                pytest.fail(f"the tiny pipeline did not finish within {PIPELINE_TIMEOUT_S}s; last status: "
                            f"{[(r['stage'], r['task'], r['state'], r['step']) for r in rows]}")
            time.sleep(POLL_S)
        yield {"run_dir": run_dir, "name": name, "submit": proc, "submit_s": submit_s, "started": started,
               "polls": polls}
    finally:
        cancel_and_drain(run_dir, name)


# ------------------------------------------------------------------ --dry-run and refused values
def test_dry_run_prints_every_sbatch_script_and_submits_nothing(slurm_cluster, tmp_path):
    run_dir = tmp_path / "dry" / "run"
    name = unique_name("tdry")
    queued_before = set(squeue())
    started = time.time()
    proc = submit_tiny(run_dir, name, "--dry-run")
    out = proc.stdout

    blocks = dict(re.findall(r"^# ---- stage (\w+)[^\n]*\n(.*?)(?=^# ---- stage |\Z)", out, re.M | re.S))
    assert list(blocks) == STAGES, out
    assert re.search(r"^# ---- stage dpo tasks 0\.05, 0\.1, 1\.0$", out, re.M), out
    assert re.search(r"^# ---- stage eval_arms tasks 0\.05, 0\.1, 1\.0$", out, re.M), out
    assert re.search(r"^# ---- stage pairs tasks 0, 1$", out, re.M), out
    for stage, script in blocks.items():
        assert script.lstrip().startswith("#!/bin/bash"), (stage, script)
        assert f"#SBATCH --job-name={name}-{stage}\n" in script, (stage, script)
        assert "#SBATCH --time=30\n" in script, (stage, script)  # tiny: 00:30:00
        assert re.search(r"^srun .* -m submitit\.core\._submit ", script, re.M), (stage, script)
        deps = re.findall(r"^#SBATCH --dependency=(.*)$", script, re.M)
        if stage in CORRESPONDING:
            assert [d.strip("'\"") for d in deps] == [f"aftercorr:<{CORRESPONDING[stage]}>"], (stage, deps)
        elif UPSTREAM[stage]:
            wanted = "afterok:" + ":".join(f"<{up}>" for up in UPSTREAM[stage])
            assert [d.strip("'\"") for d in deps] == [wanted], (stage, deps)
        else:
            assert deps == [], (stage, deps)
        arrays = re.findall(r"^#SBATCH --array=(.*)$", script, re.M)
        expected = {"pairs": r"0-1(%\d+)?", "dpo": r"0-2(%\d+)?", "eval_arms": r"0-2(%\d+)?"}.get(stage)
        if expected:
            assert len(arrays) == 1 and re.fullmatch(expected, arrays[0]), (stage, arrays)
            assert "%A_%a_0_log.out" in script, (stage, script)
        else:
            assert arrays == [], (stage, arrays)

    assert not run_dir.exists() and not run_dir.parent.exists(), "a dry run must create no run directory"
    assert not queued_jobs_named(name)
    new = {i: j for i, j in squeue().items() if i not in queued_before}
    assert not [i for i, j in new.items() if j["name"].startswith(f"{name}-")], new
    assert not sacct_ids_named(name, started)


@pytest.mark.parametrize("assignment, field", [
    ("slurm.dpo.partition=gpu;rm -rf /", "slurm.dpo.partition"),
    ("slurm.sft.time=2h", "slurm.sft.time"),
    ("slurm.eval.account=$(touch /tmp/pwned)", "slurm.eval.account"),
    ("slurm.pairs.qos=normal\n#SBATCH --mem=1T", "slurm.pairs.qos"),
])
def test_refused_resource_values_submit_nothing(slurm_cluster, tmp_path, assignment, field):
    run_dir = tmp_path / "refused" / "run"
    name = unique_name("tbad")
    queued_before = squeue()
    started = time.time()
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm",
                  "--set", f"name={name}", "--set", assignment, check=False, timeout=180)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert field in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "submitted job" not in proc.stdout, proc.stdout
    assert not run_dir.exists() and not run_dir.parent.exists()
    # the queue holds no job of this launch (jobs other users queue meanwhile are not ours to count)
    queued_after = squeue()
    assert not queued_jobs_named(name)
    new = set(queued_after) - set(queued_before)
    assert not [i for i in new if queued_after[i]["name"].startswith(f"{name}-")], new
    assert not sacct_ids_named(name, started)


# ------------------------------------------------------------------ the full run
def test_run_submits_every_stage_and_returns_at_once(slurm_run):
    run_dir, out = slurm_run["run_dir"], slurm_run["submit"].stdout
    subs = submissions(run_dir)
    assert [s["stage"] for s in subs] == STAGES
    assert all(s["executor"] == "slurm" for s in subs)
    for sub in subs:
        assert re.search(rf"^\s*{sub['stage']}: submitted job {sub['job_id']}\b", out, re.M), out
        tasks = TINY_TASKS[sub["stage"]]
        assert sorted(sub["tasks"]) == sorted("" if t is None else t for t in tasks)
        assert Path(sub["folder"]) == run_dir / "jobs" / sub["stage"]
    # the dependency chain as printed: each stage after its upstream job's id
    ids = {s["stage"]: s["job_id"] for s in subs}
    for stage, ups in UPSTREAM.items():
        if stage in CORRESPONDING:
            assert re.search(rf"^\s*{stage}: submitted job {ids[stage]}.* task by task after {ids[ups[0]]}$",
                             out, re.M), out
        elif ups:
            after = ",".join(ids[up] for up in ups)
            assert re.search(rf"^\s*{stage}: submitted job {ids[stage]}.* after {after}$", out, re.M), out
    # it returned at once: long before the pipeline could finish
    assert slurm_run["submit_s"] < 90, slurm_run["submit_s"]
    first = {(r["stage"], r["task"]): r for r in slurm_run["polls"][0][1]}
    assert not first[("eval", None)]["done"] and first[("eval", None)]["state"] == "PENDING"
    assert not first[("sft", None)]["done"]


def test_status_rows_have_the_documented_keys(slurm_run):
    expected_order = [(stage, task) for stage in STAGES for task in TINY_TASKS[stage]]
    for _, rows in slurm_run["polls"]:
        assert [(r["stage"], r["task"]) for r in rows] == expected_order
        for row in rows:
            missing = ROW_KEYS - set(row)
            assert not missing, (missing, row)
            assert row["job_id"], row
            assert isinstance(row["done"], bool) and isinstance(row["resumed_from"], list), row


def test_status_shows_the_running_stage_step_advancing(slurm_run):
    polls = slurm_run["polls"]
    assert len(polls) >= 3, "too few status polls to see progress"
    advancing = []
    for (_, before), (_, after) in zip(polls, polls[1:]):
        for old, new in zip(before, after):
            if (new["stage"] in ("sft", "dpo") and old["state"] == new["state"] == "RUNNING"
                    and isinstance(old["step"], int) and isinstance(new["step"], int) and new["step"] > old["step"]):
                advancing.append((new["stage"], new["task"], old["step"], new["step"], new["total_steps"]))
                assert new["total_steps"] and new["step"] <= new["total_steps"], new
    assert advancing, [[(r["stage"], r["task"], r["state"], r["step"]) for r in rows] for _, rows in polls]
    running = [r for _, rows in polls for r in rows if r["state"] == "RUNNING" and r["stage"] in ("sft", "dpo")]
    assert all(r["node"] and r["elapsed_s"] is not None for r in running), running
    # the ETA shows once a running attempt made progress
    assert any(isinstance(r["eta_s"], (int, float)) and r["eta_s"] >= 0 for r in running), running
    # states seen, in order: the dependants waited PENDING while sft ran
    seen = {(r["stage"], r["state"]) for _, rows in polls for r in rows}
    assert ("sft", "RUNNING") in seen and ("dpo", "RUNNING") in seen and ("eval", "PENDING") in seen, seen


def test_afterok_ordering_in_sacct(slurm_run):
    run_dir = slurm_run["run_dir"]
    subs = submissions(run_dir)
    acct = sacct_by_ids(s["job_id"] for s in subs)
    by_stage: dict[str, dict[str, dict]] = {}
    for job_id, row in acct.items():
        by_stage.setdefault(stage_of(job_id, run_dir), {})[job_id] = row
    recorded = {job_id for s in subs for job_id in s["tasks"].values()}
    assert set(acct) == recorded, (sorted(acct), sorted(recorded))
    assert {stage: len(jobs) for stage, jobs in by_stage.items()} == {s: len(t) for s, t in TINY_TASKS.items()}
    for job_id, row in acct.items():
        assert row["state"] == "COMPLETED", (job_id, row)
        assert row["start"] and row["end"] and row["start"] <= row["end"], (job_id, row)
    for stage, ups in UPSTREAM.items():
        for up in ups:
            last_end = max(r["end"] for r in by_stage[up].values())
            for job_id, row in by_stage[stage].items():
                if CORRESPONDING.get(stage) == up:  # task i after the upstream's task i
                    index = job_id.split("_")[1]
                    (up_end,) = [r["end"] for i, r in by_stage[up].items() if i.split("_")[1] == index]
                    assert row["start"] >= up_end, (f"{stage} task {job_id} started {row['start']} before its "
                                                    f"{up} task ended {up_end}")
                    continue
                assert row["start"] >= last_end, (f"{stage} job {job_id} started {row['start']} before "
                                                  f"{up} ended {last_end}")
    # all stages were submitted at once, before the first one ended (the chain is SLURM's doing)
    sft_end = max(r["end"] for r in by_stage["sft"].values())
    assert all(r["submit"] <= sft_end for r in acct.values()), acct


def test_beta_sweep_is_one_job_array(slurm_run):
    run_dir = slurm_run["run_dir"]
    dpo_subs = [s for s in submissions(run_dir) if s["stage"] == "dpo"]
    assert len(dpo_subs) == 1, dpo_subs
    parent = dpo_subs[0]["job_id"]
    assert re.fullmatch(r"\d+", parent)
    assert dpo_subs[0]["tasks"] == {"0.05": f"{parent}_0", "0.1": f"{parent}_1", "1.0": f"{parent}_2"}
    assert sorted(sacct_by_ids([parent])) == [f"{parent}_0", f"{parent}_1", f"{parent}_2"]
    rows = [r for r in status_rows(run_dir) if r["stage"] == "dpo"]
    assert [(r["task"], r["job_id"]) for r in rows] == [("0.05", f"{parent}_0"), ("0.1", f"{parent}_1"),
                                                        ("1.0", f"{parent}_2")]
    # the pairs shards are one array as well
    pairs = next(s for s in submissions(run_dir) if s["stage"] == "pairs")
    assert pairs["tasks"] == {"0": f"{pairs['job_id']}_0", "1": f"{pairs['job_id']}_1"}
    # and every beta's DPO result reached the frontier
    with open(run_dir / "eval" / "frontier.csv") as handle:
        betas = {float(r["beta"]) for r in csv.DictReader(handle) if r["policy"] == "dpo"}
    assert betas == {0.05, 0.1, 1.0}


def test_final_status_is_all_completed(slurm_run):
    rows = status_rows(slurm_run["run_dir"])
    for row in rows:
        assert row["state"] == "COMPLETED" and row["done"] is True, row
        assert row["node"] and row["elapsed_s"] is not None and row["eta_s"] is None, row
        assert row["restarts"] == 0 and row["lost_steps"] == 0 and row["submissions"] == 1, row
    dpo = [r for r in rows if r["stage"] == "dpo"]
    assert len(dpo) == 3
    for row in dpo + [r for r in rows if r["stage"] == "sft"]:
        assert row["total_steps"] and row["step"] == row["total_steps"], row
        assert row["last_checkpoint"], row
    # what it cost, from the accounting database: one run of one CPU per task, its elapsed time
    for row in rows:
        cost = row["cost"]
        assert cost["source"] == "sacct" and cost["attempts"] == 1 and cost["requeued_cpu_hours"] == 0, row
        assert cost["cpu_hours"] == round(row["elapsed_s"] / 3600, 6), row


def test_relaunch_of_a_finished_run_submits_nothing(slurm_run):
    run_dir, name = slurm_run["run_dir"], slurm_run["name"]
    jobs_json = (run_dir / "jobs" / "jobs.json").read_bytes()
    recorded = {job_id for s in submissions(run_dir) for job_id in s["tasks"].values()}
    queued_before = set(squeue())
    proc = launch("run", "--run-dir", str(run_dir), "--executor", "slurm", timeout=180)
    assert "nothing to submit" in proc.stdout, proc.stdout
    assert "submitted job" not in proc.stdout, proc.stdout
    assert (run_dir / "jobs" / "jobs.json").read_bytes() == jobs_json
    assert not queued_jobs_named(name)
    new = {i: j for i, j in squeue().items() if i not in queued_before}
    assert not [i for i, j in new.items() if j["name"].startswith(f"{name}-")], new
    assert sacct_ids_named(name, slurm_run["started"]) == recorded


def test_logs_prints_the_dpo_task_log(slurm_run):
    run_dir = slurm_run["run_dir"]
    job_id = latest_ids(run_dir)[("dpo", "0.1")]
    proc = launch("logs", "dpo", "--task", "0.1", "--run-dir", str(run_dir), "--lines", "0", timeout=60)
    header = proc.stdout.splitlines()[0]
    assert header == f"==> {run_dir / 'jobs' / 'dpo' / f'{job_id}_0_log.out'} <==", header
    assert "Job completed successfully" in proc.stdout, proc.stdout[-3000:]
    assert "'loss'" in proc.stdout or "train_loss" in proc.stdout, proc.stdout[-3000:]
    err = launch("logs", "dpo", "--task", "0.1", "--run-dir", str(run_dir), "--stderr", timeout=60)
    assert err.stdout.startswith(f"==> {run_dir / 'jobs' / 'dpo' / f'{job_id}_0_log.err'} <==")


# ------------------------------------------------------------------ cancel, then relaunch
@pytest.fixture(scope="module")
def cancelled_run(slurm_cluster, tmp_path_factory):
    """A fresh tiny run, cancelled with `launch.py cancel` while its sft job is RUNNING."""
    run_dir = tmp_path_factory.mktemp("slurm_cancel") / "run"
    name = unique_name("tcx")
    try:
        submit_tiny(run_dir, name)
        first_ids = latest_ids(run_dir)

        def sft_running():
            rows = status_rows(run_dir)
            return rows if rows[0]["stage"] == "sft" and rows[0]["state"] == "RUNNING" else None

        rows_running = wait_for(sft_running, 300, "the sft job to be RUNNING", interval_s=1.0)
        proc = launch("cancel", "--run-dir", str(run_dir), timeout=180)
        wait_for(lambda: not queued_jobs_named(name), SLURM_WAIT_S, "the cancelled jobs to leave squeue")
        yield {"run_dir": run_dir, "name": name, "cancel": proc, "ids": first_ids, "rows_running": rows_running}
    finally:
        cancel_and_drain(run_dir, name)


def test_cancel_ends_every_job_cancelled_and_nothing_downstream_runs(cancelled_run):
    run_dir, ids = cancelled_run["run_dir"], cancelled_run["ids"]
    out = cancelled_run["cancel"].stdout
    assert out.startswith(f"cancelled {len(ids)} job(s):"), out
    assert set(out.split(":", 1)[1].split()) == set(ids.values()), out
    assert not queued_jobs_named(cancelled_run["name"])

    parents = {s["job_id"]: s["stage"] for s in submissions(run_dir)}

    def all_cancelled():
        acct = sacct_by_ids(parents)
        covered = {job_id.split("_")[0] for job_id in acct}
        return acct if covered == set(parents) and all(r["state"] == "CANCELLED" for r in acct.values()) else None

    acct = wait_for(all_cancelled, 60, "sacct to show every job of the run CANCELLED")
    for job_id, row in acct.items():
        stage = parents[job_id.split("_")[0]]
        if stage == "sft":
            assert row["start"] is not None, (job_id, row)  # it was running when cancelled
        else:
            # sacct may stamp Start = End at the moment a pending job is cancelled: that is no run
            never_ran = row["start"] is None or row["start"] == row["end"]
            assert never_ran, f"{stage} job {job_id} started although sft was cancelled: {row}"
    # nothing downstream ran: no outputs, no job logs
    assert not (run_dir / "sft" / "DONE.json").exists()
    assert not list(run_dir.glob("pairs/shards/*.jsonl")) and not (run_dir / "pairs" / "DONE.json").exists()
    assert not list(run_dir.glob("dpo/*/progress.json")) and not list(run_dir.glob("dpo/*/DONE.json"))
    assert not (run_dir / "eval" / "frontier.csv").exists()
    for stage in STAGES[1:]:
        assert not list((run_dir / "jobs" / stage).glob("*_log.out")), stage
    rows = status_rows(run_dir)
    assert not any(r["done"] for r in rows), rows
    assert rows[0]["stage"] == "sft" and rows[0]["state"] == "CANCELLED", rows[0]


def controller_lists(job_ids) -> set[str]:
    """Ids slurmctld still holds, finished ones included (it forgets them MinJobAge after they end)."""
    proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i"],
                          capture_output=True, text=True, timeout=60)
    return set(proc.stdout.split()) if proc.returncode == 0 else set()  # all unknown: 'Invalid job id'


def test_status_shows_every_cancelled_task_cancelled(cancelled_run):
    run_dir = cancelled_run["run_dir"]
    ids = list(cancelled_run["ids"].values())
    # until slurmctld forgets the jobs (MinJobAge=10 s on the test cluster) squeue still answers for them;
    # what status shows must not depend on that
    wait_for(lambda: not controller_lists(ids), SLURM_WAIT_S, "slurmctld to forget the cancelled jobs")
    rows = status_rows(run_dir)
    assert [(r["stage"], r["task"], r["state"]) for r in rows if r["state"] != "CANCELLED"] == []
    # and `status --watch` sees a finished run, so it returns
    launch("status", "--run-dir", str(run_dir), "--watch", "--interval", "1", timeout=30)


def test_relaunch_after_cancel_resubmits_and_rewires(cancelled_run):
    run_dir, name, old = cancelled_run["run_dir"], cancelled_run["name"], cancelled_run["ids"]
    n_before = len(submissions(run_dir))
    try:
        proc = launch("run", "--run-dir", str(run_dir), "--executor", "slurm", timeout=180)
        new = latest_ids(run_dir)
        subs = submissions(run_dir)
        # every not-done stage task got a new job id; nothing was done, so that is all of them
        assert [s["stage"] for s in subs[n_before:]] == STAGES, proc.stdout
        assert set(new) == set(old)
        for key in old:
            assert new[key] != old[key], (key, old[key], new[key])
        parents = {s["stage"]: s["job_id"] for s in subs[n_before:]}
        assert not set(parents.values()) & {i.split("_")[0] for i in old.values()}
        for stage, parent in parents.items():
            assert re.search(rf"^\s*{stage}: submitted job {parent}\b", proc.stdout, re.M), proc.stdout

        # squeue: the downstream jobs wait on Dependency, each on the NEW job of its upstream stage
        downstream = {job_id: stage for (stage, _), job_id in new.items() if stage != "sft"}

        def waiting_on_new_jobs():
            queued = squeue()
            ok = all(job_id in queued and queued[job_id]["state"] == "PENDING"
                     and queued[job_id]["reason"] == "Dependency" for job_id in downstream)
            return queued if ok else None

        queued = wait_for(waiting_on_new_jobs, 60, "the relaunched downstream jobs to pend on Dependency")
        for job_id, stage in downstream.items():
            dep = queued[job_id]["dependency"]
            kind = "aftercorr" if stage in CORRESPONDING else "afterok"
            upstream_ids = re.findall(rf"{kind}:(\d+)", dep)
            assert upstream_ids == [parents[up] for up in UPSTREAM[stage]], (stage, job_id, dep)
        status = {(r["stage"], r["task"]): r for r in status_rows(run_dir)}
        assert all(r["submissions"] == 2 for r in status.values()), status
        assert all(status[(s, t or None)]["job_id"] == j for (s, t), j in new.items())
    finally:
        launch("cancel", "--run-dir", str(run_dir), check=False, timeout=180)
        wait_for(lambda: not queued_jobs_named(name), SLURM_WAIT_S, "the relaunched jobs to leave squeue")
