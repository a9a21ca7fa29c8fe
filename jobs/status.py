"""Queue monitoring for a run: `status`, `logs` and `cancel`.

One row per stage / array task, joining three sources: the job records (which job ran what),
one batched `sacct` call (SLURM state, node, elapsed, requeues) and the stages' own progress
files (step, total steps, restarts, last checkpoint).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from jobs import records
from jobs.config import load_run_config
from jobs.summary import fold_note, job_ids_line, select_rows, summarise_rows
from pipeline.rundir.attempts import Cost
from pipeline.rundir.layout import RunLayout, read_json
from pipeline.reporting import cost as run_cost
from pipeline.rundir.progress import lost_steps
from pipeline.registry import STAGES, Stage, Task, get_stage
from slurm import queue, submit

(COMPLETED,) = queue.DONE_OK_STATES  # what a local job that finished is shown as


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def _progress(layout: RunLayout, stage: Stage, task: Task, done: bool) -> dict:
    if not stage.writes_progress:
        return {"step": int(done), "total_steps": 1}
    return read_json(stage.progress_path(layout, task), {}) or {}


def _eta_s(progress: dict, state: str) -> float | None:
    step, total = progress.get("step"), progress.get("total_steps")
    started, first = progress.get("attempt_started_at"), progress.get("attempt_start_step", 0)
    if state != "RUNNING" or not (step and total and started) or step <= first:
        return None
    rate = (time.time() - started) / (step - first)
    return round(rate * (total - step), 1)


UNREACHABLE = "UNKNOWN (SLURM did not answer)"
# A submitted task that is not done and whose job SLURM no longer knows (neither the queue nor, where there is
# one, the accounting database): it ended without its DONE marker (failed or cancelled); `run` submits it again.
# Without an accounting database this is how every job that did not finish its task ends up once the controller
# forgets it (MinJobAge after its end).
ENDED = "ENDED"


def collect_rows(run_dir: str | Path, notes: list[str] | None = None) -> list[dict]:
    """One row per stage task. When SLURM does not answer (the controller restarting, say), the rows
    still show what the run directory knows, and `notes` gets the reason."""
    layout = RunLayout(run_dir)
    cfg = load_run_config(layout.root)
    latest = records.latest(layout)
    submissions = records.attempts(layout)
    every_job = records.all_job_ids(layout)
    # the latest job of each task for its state; the earlier ones too, for what they cost (one sacct call)
    slurm_ids = list(dict.fromkeys(job_id for jobs in every_job.values() for executor, job_id in jobs
                                   if executor == "slurm"))
    try:
        states = queue.query_jobs(slurm_ids) if slurm_ids else {}
        unreachable = False
    except RuntimeError as exc:
        states, unreachable = {}, True
        if notes is not None:
            notes.append(f"SLURM did not answer, job states are unknown (progress below is from the run directory): "
                         f"{' '.join(str(exc).split())[:400]}")
    costs = {(r["stage"], r["task"]): r["cost"] for r in run_cost.cost_rows(cfg, layout)}
    rows = []
    for stage in STAGES:
        for task in stage.task_list(cfg):
            key = (stage.name, records.task_key(task))
            entry = latest.get(key)
            done = stage.is_done(layout, task)
            job_id = entry[1] if entry else None
            record = states.get(job_id) if job_id else None
            if record is not None:
                state = record.state
            elif entry is not None and entry[0].executor == "local":
                state = COMPLETED if done else ("RUNNING" if _pid_alive(job_id) else "FAILED")
            else:
                state = COMPLETED if done else ("NOT_SUBMITTED" if entry is None else
                                                UNREACHABLE if unreachable else ENDED)
            progress = _progress(layout, stage, task, done)
            restarts = progress.get("restarts", [])
            rows.append({
                "stage": stage.name,
                "task": task.key if task is not None else None,
                "job_id": job_id,
                "state": state,
                "done": done,
                "node": record.node if record else None,
                "elapsed_s": record.elapsed_s if record else None,
                "step": progress.get("step"),
                "total_steps": progress.get("total_steps"),
                "restarts": max(len(restarts), record.restarts if record else 0),
                "resumed_from": [r["resumed_from_step"] for r in restarts],
                "lost_steps": lost_steps(restarts),
                "last_checkpoint": progress.get("last_checkpoint"),
                "eta_s": _eta_s(progress, state),
                "submissions": submissions.get(key, 0),
                "stop_save_s": progress.get("stop_save_s"),
                "cost": _cost(every_job.get(key, []), states, costs[(stage.name, task.key if task is not None else None)]),
                "warnings": save_time_warnings(stage, task, progress, getattr(cfg.slurm, stage.resources)),
                "summary": _summary(layout, stage, task, done),
            })
    return rows


SACCT, RUN_DIRECTORY = "sacct", "run directory"


def _cost(jobs: list[tuple[str, str]], states: dict[str, queue.JobRecord], recorded: Cost) -> dict:
    """A task's cost as the accounting database has it (every run of every job that ran the task: killed ones
    too, which the jobs' own records cannot time) when it knows all of them, else the jobs' own records."""
    usages = [states[job_id].usage if executor == "slurm" and job_id in states else None for executor, job_id in jobs]
    if not usages or None in usages:
        return {**recorded.as_dict(), "source": RUN_DIRECTORY}
    cost = Cost()
    for index, usage in enumerate(usages):
        relaunched = index < len(usages) - 1  # a later job ran the task again: all of this one's time was lost
        cost += Cost(usage.gpu_s / 3600, usage.cpu_s / 3600,
                     (usage.gpu_s if relaunched else usage.requeued_gpu_s) / 3600,
                     (usage.cpu_s if relaunched else usage.requeued_cpu_s) / 3600, attempts=usage.runs)
    return {**cost.as_dict(), "source": SACCT}


def _summary(layout: RunLayout, stage: Stage, task: Task, done: bool) -> str | None:
    """The one-line summary a finished stage wrote into its DONE.json, if any (e.g. the dataset pairs' counts)."""
    return (read_json(stage.done_path(layout, task), {}) or {}).get("summary") if done else None


def save_time_warnings(stage: Stage, task: Task, progress: dict, resources) -> list[str]:
    """A stop-save that used more than half of SLURM's warning time may not finish next time."""
    stop_save_s = progress.get("stop_save_s")
    if stop_save_s is None or stop_save_s <= resources.signal_lead_s / 2:
        return []
    return [f"{stage.label(task)}: the checkpoint saved at its last stop took {stop_save_s:.0f} s, more than half of "
            f"slurm.{stage.resources}.signal_lead_s={resources.signal_lead_s}; raise signal_lead_s so the next "
            "stop-save finishes before the time limit"]


def _fmt_seconds(value) -> str:
    if value is None:
        return "-"
    value = int(value)
    return f"{value // 3600}:{value % 3600 // 60:02d}:{value % 60:02d}"


def format_table(rows: list[dict]) -> str:
    header = ["STAGE", "TASK", "JOB", "STATE", "NODE", "ELAPSED", "STEP", "RESTARTS", "LOST", "CHECKPOINT", "ETA"]
    lines = [header]
    for r in rows:
        step = "-" if r["step"] is None else f"{r['step']}/{r['total_steps'] or '?'}"
        restarts = str(r["restarts"]) + (f" (from {','.join(map(str, r['resumed_from']))})" if r["resumed_from"] else "")
        lines.append([r["stage"], r["task"] or "-", r["job_id"] or "-", r["state"], r["node"] or "-",
                      _fmt_seconds(r["elapsed_s"]), step, restarts, str(r["lost_steps"]), r["last_checkpoint"] or "-",
                      _fmt_seconds(r["eta_s"])])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def cost_lines(rows: list[dict]) -> list[str]:
    """GPU/CPU-hours per stage and in total, with the share requeued attempts took (pipeline.reporting.cost),
    and where the figures come from."""
    lines = run_cost.summary_lines([{"stage": r["stage"], "task": r["task"], "lost_steps": r["lost_steps"],
                                     "cost": Cost.from_dict(r["cost"])} for r in rows])
    from_run_dir = sum(r["cost"]["source"] == RUN_DIRECTORY and r["cost"]["attempts"] > 0 for r in rows)
    measured = sum(r["cost"]["attempts"] > 0 for r in rows)
    if measured:
        lines[-1] += (" (from sacct)" if not from_run_dir else " (from the jobs' attempt records)" if
                      from_run_dir == measured else f" (from sacct; {from_run_dir} task(s) from the jobs' attempt records)")
    return lines


def finished(rows: list[dict]) -> bool:
    return all(r["done"] or r["state"] in queue.FAILED_STATES or r["state"] in ("NOT_SUBMITTED", ENDED) for r in rows)


def show_status(run_dir: str, watch: bool = False, as_json: bool = False, interval: float = 10.0,
                show_all: bool = False, task: str | None = None) -> int:
    """A big array is one summary row per stage unless `show_all`; `task` (a key or shell pattern) picks rows."""
    while True:
        notes: list[str] = []
        rows = collect_rows(run_dir, notes)
        if task is not None:
            rows = select_rows(rows, task)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            if watch:
                print("\033[2J\033[H", end="")
            print(f"{RunLayout(run_dir).root}   {time.strftime('%H:%M:%S')}")
            shown = rows if show_all or task is not None else summarise_rows(rows)
            print(format_table(shown))
            for summary in dict.fromkeys(r["summary"] for r in rows if r["summary"]):  # stages sharing a DONE.json
                print(summary)
            for line in cost_lines(rows):
                print(line)
            if fold_note(shown):
                print(fold_note(shown))
            for warning in (w for r in rows for w in r["warnings"]):
                print(f"warning: {warning}")
        if not watch or finished(rows):
            return 0
        time.sleep(interval)


def cancel_run(run_dir: str) -> int:
    layout = RunLayout(run_dir)
    latest = records.latest(layout)
    slurm_ids = sorted({job_id for sub, job_id in latest.values() if sub.executor == "slurm"})
    states = queue.query_jobs(slurm_ids) if slurm_ids else {}
    active = [job_id for job_id in slurm_ids if states.get(job_id) and states[job_id].state in queue.ACTIVE_STATES]
    for intent in records.unconfirmed(layout):  # submitted by a launch that died before recording them
        active += queue.jobs_with_comment(records.comment_for(intent.intent))
    if active:
        queue.cancel_jobs(active)
    for sub, job_id in latest.values():
        if sub.executor == "local" and _pid_alive(job_id):
            os.kill(int(job_id), 15)
            active.append(job_id)
    print(f"cancelled {len(active)} job(s): {job_ids_line(active)}" if active else "no queued or running jobs")
    return 0


def show_logs(run_dir: str, stage_name: str, task_text: str | None, stderr: bool = False, lines: int = 60,
              follow: bool = False) -> int:
    layout = RunLayout(run_dir)
    stage = get_stage(stage_name)
    task = stage.parse_task(task_text)  # any spelling of the same task: --task 1, 1.0, 1e0
    entry = records.latest(layout).get((stage.name, records.task_key(task)))
    if entry is None:
        known = sorted(f"{s}{'[' + t + ']' if t else ''}" for s, t in records.latest(layout))
        raise ValueError(f"no job recorded for {stage.label(task)}; "
                         f"recorded: {', '.join(known) or 'none (was the run submitted?)'}")
    submission, job_id = entry
    stdout_path, stderr_path = submit.job_log_paths(Path(submission.folder), job_id)
    path = stderr_path if stderr else stdout_path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist yet (job {job_id} may still be pending)")
    with open(path, errors="replace") as handle:
        content = handle.read().splitlines()
        print(f"==> {path} <==")
        print("\n".join(content[-lines:] if lines else content))
        while follow:
            line = handle.readline()
            if line:
                print(line, end="")
            else:
                time.sleep(1)
    return 0
