"""What a run cost: one record per attempt of each job (its first run and every requeue), and the
GPU-hours (CPU-hours for jobs without GPUs) they add up to.

The job callable (jobs.stages) writes a record when an attempt starts and completes it when the
attempt ends: `RUN/jobs/attempts/<stage>/<task>.jsonl`, one JSON object per attempt:
    {"job_id": "123_4", "restart": 0, "executor": "slurm", "nodes": 1, "gpus": 4, "cpus": 32,
     "started": 1764840000.0, "ended": 1764843600.0, "outcome": "requeued:timeout"}
`outcome` is "completed", "requeued:<reason>" (the job requeued itself: time limit, preemption, a lost
peer), "stopped:terminated" (SIGTERM: SLURM requeued or cancelled it), "failed:error" or null while the
attempt runs; an attempt killed outright (SIGKILL, a node that lost power) never
gets its end written, so its time is not counted (`unmeasured` says how many such attempts there are).
Records are what the job itself saw, so they exist with or without SLURM's accounting database.

The cost of an attempt is its allocated GPUs x its wall time (CPUs x wall time when it had no GPU);
the "requeued" share is the time of attempts that did not finish the task: they requeued themselves, or
a later attempt (a requeue, or a relaunch after a failure) followed them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.rundir.layout import RunLayout, atomic_write_jsonl, read_jsonl

REQUEUED = "requeued"


def attempts_path(layout: RunLayout, stage: str, task_key: str) -> Path:
    return layout.jobs / "attempts" / stage / f"{(task_key or 'job').replace('/', '_')}.jsonl"


def start_attempt(path: Path, **record) -> None:
    """Append the record of an attempt that starts now (`record`: job_id, restart, executor, nodes,
    gpus, cpus). An earlier attempt of the same job id left open was killed before it could end."""
    rows = read_jsonl(path) if path.is_file() else []
    rows.append({**record, "started": time.time(), "ended": None, "outcome": None})
    atomic_write_jsonl(path, rows)


def end_attempt(path: Path, outcome: str) -> None:
    """Complete the newest open record (the attempt running in this process)."""
    rows = read_jsonl(path) if path.is_file() else []
    if rows and rows[-1]["ended"] is None:
        rows[-1].update(ended=time.time(), outcome=outcome)
        atomic_write_jsonl(path, rows)


@dataclass
class Cost:
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0          # jobs without GPUs only: a GPU job's CPUs come with its GPUs
    requeued_gpu_hours: float = 0.0  # of those, spent in attempts that did not finish the task
    requeued_cpu_hours: float = 0.0
    attempts: int = 0
    unmeasured: int = 0             # attempts killed outright: no end recorded, not counted

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    @classmethod
    def from_dict(cls, d: dict) -> "Cost":
        return cls(d["gpu_hours"], d["cpu_hours"], d["requeued_gpu_hours"], d["requeued_cpu_hours"], d["attempts"],
                   d["unmeasured_attempts"])

    def as_dict(self) -> dict:
        return {"gpu_hours": round(self.gpu_hours, 6), "cpu_hours": round(self.cpu_hours, 6),
                "requeued_gpu_hours": round(self.requeued_gpu_hours, 6),
                "requeued_cpu_hours": round(self.requeued_cpu_hours, 6), "attempts": self.attempts,
                "unmeasured_attempts": self.unmeasured}


def cost_of(rows: list[dict], now: float | None = None) -> Cost:
    """The cost of one job's attempts; a running attempt (the newest, still open) counts up to `now`."""
    now = time.time() if now is None else now
    cost = Cost(attempts=len(rows))
    for index, row in enumerate(rows):
        ended = row["ended"]
        if ended is None:
            if index < len(rows) - 1:  # a later attempt started: this one was killed before it could end
                cost.unmeasured += 1
                continue
            ended = now
        hours = max(0.0, ended - row["started"]) / 3600
        requeued = str(row.get("outcome") or "").startswith(REQUEUED) or index < len(rows) - 1
        if row.get("gpus"):
            cost.gpu_hours += row["gpus"] * hours
            cost.requeued_gpu_hours += row["gpus"] * hours if requeued else 0.0
        else:
            cost.cpu_hours += row.get("cpus", 1) * hours
            cost.requeued_cpu_hours += row.get("cpus", 1) * hours if requeued else 0.0
    return cost


def read_cost(layout: RunLayout, stage: str, task_key: str, now: float | None = None) -> Cost:
    path = attempts_path(layout, stage, task_key)
    return cost_of(read_jsonl(path) if path.is_file() else [], now)


def describe(cost: Cost) -> str:
    """'0.42 GPU-h (requeued 0.10, 24%) + 0.05 CPU-h (requeued 0%)'; only the kinds the job used."""
    parts = []
    for kind, total, requeued in (("GPU", cost.gpu_hours, cost.requeued_gpu_hours),
                                  ("CPU", cost.cpu_hours, cost.requeued_cpu_hours)):
        if total > 0 or (kind == "CPU" and not parts):
            share = f"{100 * requeued / total:.0f}%" if total > 0 else "0%"
            parts.append(f"{total:.4g} {kind}-h (requeued {requeued:.3g}, {share})")
    text = " + ".join(parts)
    return text + (f"; {cost.unmeasured} attempt(s) killed outright, not counted" if cost.unmeasured else "")
