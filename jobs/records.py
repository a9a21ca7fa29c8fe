"""Which job ran (or runs) each stage task of a run: `RUN/jobs/jobs.json`.

Each submission appends one entry; the latest entry for a (stage, task) wins. This is what makes
relaunching idempotent and lets `status`, `logs` and `cancel` find the jobs.

A SLURM submission is recorded twice: as an intent (no job ids yet, a unique `intent` that also
goes into the job's comment) before `sbatch`, then with its ids after. An intent left without ids
(the launcher died in between) is reconciled on the next launch from the queue.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field

from pipeline.rundir.layout import RunLayout, atomic_write_json, read_json
from pipeline.registry import task_key  # noqa: F401  (records are keyed by it)


@dataclass
class Submission:
    stage: str
    job_id: str                          # the SLURM job id (array parent) or the local PID
    tasks: dict[str, str]                # task name ("" for a single job) -> job id ("123_0" for arrays)
    executor: str                        # slurm | local
    folder: str                          # submitit folder with the sbatch script and logs
    submitted_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    intent: str = ""                     # unique per submission; the SLURM job's comment is comment_for(intent)

    @property
    def recorded(self) -> bool:
        """False for an intent whose `sbatch` has not been confirmed yet."""
        return bool(self.job_id)


def new_intent() -> str:
    return uuid.uuid4().hex[:16]


def comment_for(intent: str) -> str:
    return f"slurm-dpo:{intent}"


def load(layout: RunLayout) -> list[Submission]:
    data = read_json(layout.jobs / "jobs.json", {"submissions": []})
    return [Submission(**entry) for entry in data["submissions"]]


def _save(layout: RunLayout, entries: list[Submission]) -> None:
    atomic_write_json(layout.jobs / "jobs.json", {"submissions": [asdict(e) for e in entries]})


def append(layout: RunLayout, submission: Submission) -> None:
    _save(layout, load(layout) + [submission])


def replace(layout: RunLayout, intent: str, submission: Submission | None) -> None:
    """Replace the entry of `intent` (with its job ids, or None to drop an intent that never became a job)."""
    entries = [e for e in load(layout) if e.intent != intent or not intent]
    if submission is not None:
        entries.append(submission)
    _save(layout, entries)


def unconfirmed(layout: RunLayout) -> list[Submission]:
    return [e for e in load(layout) if not e.recorded]


def latest(layout: RunLayout) -> dict[tuple[str, str], tuple[Submission, str]]:
    """(stage, task) -> (submission, task job id) for the newest submission of each task."""
    found: dict[tuple[str, str], tuple[Submission, str]] = {}
    for submission in load(layout):
        if submission.recorded:
            for task, job_id in submission.tasks.items():
                found[(submission.stage, task)] = (submission, job_id)
    return found


def all_job_ids(layout: RunLayout) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(stage, task) -> [(executor, task job id), ...] of every submission of each task, oldest first."""
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for submission in load(layout):
        for task, job_id in submission.tasks.items() if submission.recorded else ():
            found.setdefault((submission.stage, task), []).append((submission.executor, job_id))
    return found


def attempts(layout: RunLayout) -> dict[tuple[str, str], int]:
    """How many times each (stage, task) was submitted (resubmissions after failures count)."""
    counts: dict[tuple[str, str], int] = {}
    for submission in load(layout):
        for task in submission.tasks if submission.recorded else ():
            counts[(submission.stage, task)] = counts.get((submission.stage, task), 0) + 1
    return counts
