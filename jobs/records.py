"""Which job ran (or runs) each stage task of a run: `RUN/jobs/jobs.json`.

Each submission appends one entry; the latest entry for a (stage, task) wins. This is what makes
relaunching idempotent and lets `status`, `logs` and `cancel` find the jobs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from pipeline.layout import RunLayout, atomic_write_json, read_json
from pipeline.registry import task_key  # noqa: F401  (records are keyed by it)


@dataclass
class Submission:
    stage: str
    job_id: str                          # the SLURM job id (array parent) or the local PID
    tasks: dict[str, str]                # task name ("" for a single job) -> job id ("123_0" for arrays)
    executor: str                        # slurm | local
    folder: str                          # submitit folder with the sbatch script and logs
    submitted_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


def load(layout: RunLayout) -> list[Submission]:
    data = read_json(layout.jobs / "jobs.json", {"submissions": []})
    return [Submission(**entry) for entry in data["submissions"]]


def append(layout: RunLayout, submission: Submission) -> None:
    entries = load(layout) + [submission]
    atomic_write_json(layout.jobs / "jobs.json", {"submissions": [asdict(e) for e in entries]})


def latest(layout: RunLayout) -> dict[tuple[str, str], tuple[Submission, str]]:
    """(stage, task) -> (submission, task job id) for the newest submission of each task."""
    found: dict[tuple[str, str], tuple[Submission, str]] = {}
    for submission in load(layout):
        for task, job_id in submission.tasks.items():
            found[(submission.stage, task)] = (submission, job_id)
    return found


def attempts(layout: RunLayout) -> dict[tuple[str, str], int]:
    """How many times each (stage, task) was submitted (resubmissions after failures count)."""
    counts: dict[tuple[str, str], int] = {}
    for submission in load(layout):
        for task in submission.tasks:
            counts[(submission.stage, task)] = counts.get((submission.stage, task), 0) + 1
    return counts
