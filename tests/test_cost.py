"""What a run cost: attempt records -> GPU/CPU-hours, the requeued share, and how status and report show it."""
from __future__ import annotations

import json

import pytest

from pipeline.reporting.cost import cost_markdown, summary_lines, totals
from pipeline.rundir.attempts import Cost, attempts_path, cost_of, describe, end_attempt, start_attempt
from pipeline.rundir.layout import RunLayout
from slurm.environment import allocation

HOUR = 3600.0


def attempt(started, ended, outcome, gpus=0, cpus=1):
    return {"job_id": "1", "restart": 0, "gpus": gpus, "cpus": cpus, "started": started, "ended": ended,
            "outcome": outcome}


def test_gpu_hours_are_gpus_times_wall_time_over_all_attempts_with_the_requeued_share():
    rows = [attempt(0, 1 * HOUR, "requeued:timeout", gpus=4), attempt(2 * HOUR, 2.5 * HOUR, "completed", gpus=4)]
    cost = cost_of(rows)
    assert cost.gpu_hours == pytest.approx(6.0) and cost.requeued_gpu_hours == pytest.approx(4.0)
    assert cost.cpu_hours == 0 and cost.attempts == 2 and cost.unmeasured == 0
    assert describe(cost) == "6 GPU-h (requeued 4, 67%)"


def test_cpu_jobs_count_cpu_hours_and_a_killed_attempt_is_not_counted_but_said():
    rows = [attempt(0, None, None, cpus=8),  # killed outright: a later attempt started, no end recorded
            attempt(HOUR, 1.5 * HOUR, "stopped:terminated", cpus=8),  # followed by another attempt: requeued
            attempt(2 * HOUR, None, None, cpus=8)]  # still running: counts up to now
    cost = cost_of(rows, now=3 * HOUR)
    assert cost.cpu_hours == pytest.approx(8 * 0.5 + 8 * 1.0) and cost.requeued_cpu_hours == pytest.approx(4.0)
    assert cost.unmeasured == 1 and cost.gpu_hours == 0
    assert describe(cost).endswith("1 attempt(s) killed outright, not counted")
    assert Cost.from_dict(cost.as_dict()) == Cost(**{k: pytest.approx(v) for k, v in vars(cost).items()})


def test_attempt_records_open_and_close_in_the_run_directory(tmp_path):
    path = attempts_path(RunLayout(tmp_path), "dpo", "ipo:0.5")
    start_attempt(path, job_id="7_1", restart=0, executor="slurm", nodes=1, gpus=2, cpus=16)
    end_attempt(path, "requeued:timeout")
    start_attempt(path, job_id="7_1", restart=1, executor="slurm", nodes=1, gpus=2, cpus=16)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["restart"], r["outcome"]) for r in rows] == [(0, "requeued:timeout"), (1, None)]
    assert rows[0]["ended"] >= rows[0]["started"] and rows[1]["ended"] is None
    assert path.parent == tmp_path / "jobs" / "attempts" / "dpo"


def test_allocation_reads_the_jobs_gpus_and_cpus_from_slurm():
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "8", "SLURM_NTASKS": "8"}
    assert allocation(env) == {"nodes": 2, "gpus": 8, "cpus": 64}
    assert allocation({"SLURM_CPUS_PER_TASK": "2"}) == {"nodes": 1, "gpus": 0, "cpus": 2}


def test_status_and_report_sum_per_stage_and_in_total():
    rows = [{"stage": "dpo", "task": "0.1", "lost_steps": 0,
             "cost": cost_of([attempt(0, HOUR, "requeued:timeout", gpus=1), attempt(HOUR, 2 * HOUR, "completed", gpus=1)])},
            {"stage": "dpo", "task": "1.0", "lost_steps": 3, "cost": cost_of([attempt(0, HOUR, "completed", gpus=1)])},
            {"stage": "eval", "task": None, "lost_steps": 0, "cost": cost_of([attempt(0, HOUR, "completed", cpus=2)])},
            {"stage": "sft", "task": None, "lost_steps": 0, "cost": Cost()}]  # never ran
    sums = totals(rows)
    assert list(sums) == ["dpo", "eval", "sft", "total"]
    assert sums["dpo"][0].gpu_hours == pytest.approx(3.0) and sums["dpo"][1] == 3
    assert sums["total"][0].cpu_hours == pytest.approx(2.0) and sums["total"][0].attempts == 4
    lines = summary_lines(rows)
    assert lines == ["cost dpo: 3 GPU-h (requeued 1, 33%); 3 attempt(s), 3 step(s) lost",
                     "cost eval: 2 CPU-h (requeued 0, 0%); 1 attempt(s), 0 step(s) lost",
                     "cost total: 3 GPU-h (requeued 1, 33%) + 2 CPU-h (requeued 0, 0%); 4 attempt(s), 3 step(s) lost"]
    table = cost_markdown(rows)
    assert "| dpo | 0.1 | 2 | 2 | 0 | 1 GPU-h (50%) | 0 |" in table and "| dpo | all | 3 | 3 | 0 | 1 GPU-h (33%) | 3 |" in table
    assert "| **total** |  | 4 | 3 | 2 | 1 GPU-h (33%) + 0 CPU-h (0%) | 3 |" in table and "| sft |" not in table


def test_sacct_usage_counts_every_run_with_its_allocation():
    from slurm.queue import parse_sacct

    gpus = "billing=32,cpu=32,gres/gpu=4,gres/gpu:h100=4,mem=200G,node=1"
    out = "\n".join([
        f"7|REQUEUED|n1|3600|2024-05-01T10:00:00|2024-05-01T11:00:00|0:0|2024-05-01T09:00:00|{gpus}",
        f"7|RUNNING|n2|1800|2024-05-01T11:10:00|Unknown|0:0|2024-05-01T11:00:00|{gpus}",
        "8_[0-1]|PENDING|None assigned|0|Unknown|Unknown|0:0|2024-05-01T09:00:00|billing=2,cpu=2,node=1",
        "9|COMPLETED|n1|900|2024-05-01T10:00:00|2024-05-01T10:15:00|0:0|2024-05-01T09:00:00|billing=2,cpu=2,node=1",
    ])
    records = parse_sacct(out)
    usage = records["7"].usage  # a GPU job: its CPUs come with its GPUs
    assert (usage.gpu_s, usage.cpu_s, usage.requeued_gpu_s, usage.runs) == (4 * 5400, 0, 4 * 3600, 2)
    assert records["8_1"].usage.runs == 0 and records["8_1"].usage.cpu_s == 0  # never started: no attempt
    assert (records["9"].usage.cpu_s, records["9"].usage.requeued_cpu_s, records["9"].usage.runs) == (1800, 0, 1)


def test_status_takes_the_cost_from_sacct_when_it_knows_every_job_of_the_task():
    from jobs.status import _cost
    from slurm.queue import JobRecord, Usage

    recorded = Cost(cpu_hours=0.5, attempts=1, unmeasured=1)  # the jobs' own records: one attempt killed outright
    first = JobRecord("5", "FAILED", "n1", 1800, None, None, "0:9", usage=Usage(cpu_s=2 * 1800, runs=1))
    second = JobRecord("6_0", "COMPLETED", "n1", 900, None, None, "0:0",
                       usage=Usage(cpu_s=2 * 1800, requeued_cpu_s=2 * 900, runs=2))
    cost = _cost([("slurm", "5"), ("slurm", "6_0")], {"5": first, "6_0": second}, recorded)
    # the relaunched-over job is lost time in full; the killed run is measured by the accounting database
    assert cost == {"gpu_hours": 0, "cpu_hours": 2.0, "requeued_gpu_hours": 0, "requeued_cpu_hours": 1.5,
                    "attempts": 3, "unmeasured_attempts": 0, "source": "sacct"}
    squeue_only = JobRecord("6_0", "RUNNING", "n1", 900, None, None, None)  # no usage: sacct did not answer
    assert _cost([("slurm", "5"), ("slurm", "6_0")], {"5": first, "6_0": squeue_only}, recorded) == {
        **recorded.as_dict(), "source": "run directory"}
    assert _cost([("local", "4242")], {}, recorded)["source"] == "run directory"
