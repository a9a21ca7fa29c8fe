"""Big sweeps stay readable: one line per stage for a large array instead of one entry per task.

`run --dry-run` and `run` name a stage's tasks with `describe_tasks` (the keys themselves when there are
few; else the arms as method x strengths x seeds, or a shard range); `status` folds a stage with many
task rows into one row of counts per state (`summarise_rows`), unless asked for every row (`status --all`)
or for some tasks (`status --task PATTERN`, `select_rows`).
"""
from __future__ import annotations

import fnmatch
from collections import Counter

from pipeline.registry import Arm, Task, get_stage, task_key

LIST_AT_MOST = 8  # a stage with more tasks than this is summarised
NAME_IDS_AT_MOST = 32  # `cancel` names each id up to this many (a tiny sweep: 12), else the parents


def _values(values: list) -> str:
    """'0.01, 0.1' for a few values; '0.01 .. 2.0' for many (sorted, as numbers)."""
    ordered = sorted(set(values))
    if len(ordered) <= 3:
        return ", ".join(map(str, ordered))
    return f"{ordered[0]} .. {ordered[-1]}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_arms(arms: list[Arm]) -> str:
    """'600 arms: {dpo, ipo, hinge} x 10 strengths (0.01 .. 2.0) x 20 seeds (0 .. 19)' (methods with the same
    grid together, in order of appearance; a method whose arms are not a full grid is given as its count)."""
    by_method: dict[str, list[Arm]] = {}
    for arm in arms:
        by_method.setdefault(arm.method, []).append(arm)
    grids: dict[str, list[str]] = {}  # the grid's text -> the methods with that grid
    for method, group in by_method.items():
        strengths = [a.strength for a in group if a.strength is not None]
        seeds = [a.seed for a in group if a.seed is not None]
        grid = max(len(set(strengths)), 1) * max(len(set(seeds)), 1)
        if grid != len(group) or len(strengths) not in (0, len(group)) or len(seeds) not in (0, len(group)):
            grids.setdefault(f" ({_plural(len(group), 'arm')})", []).append(method)
            continue
        text = f" x {_plural(len(set(strengths)), 'strength')} ({_values(strengths)})" if strengths else ""
        text += f" x {_plural(len(set(seeds)), 'seed')} ({_values(seeds)})" if seeds else ""
        grids.setdefault(text, []).append(method)
    parts = [(methods[0] if len(methods) == 1 else "{" + ", ".join(methods) + "}") + text
             for text, methods in grids.items()]
    return f"{_plural(len(arms), 'arm')}: {'; '.join(parts)}"


def describe_tasks(tasks: list[Task]) -> str:
    """A stage's tasks in one short line: their keys when few, else a summary."""
    keys = [task_key(task) for task in tasks]
    if len(keys) <= LIST_AT_MOST:
        return ", ".join(keys)
    if all(isinstance(task, Arm) for task in tasks):
        return describe_arms(tasks)
    return f"{_plural(len(keys), 'task')}: {', '.join(keys[:3])} .. {keys[-1]}"


def state_counts(rows: list[dict]) -> str:
    """'COMPLETED 12, RUNNING 4, PENDING 584' (most frequent first)."""
    return ", ".join(f"{state} {n}" for state, n in Counter(r["state"] for r in rows).most_common())


def select_rows(rows: list[dict], pattern: str) -> list[dict]:
    """The rows whose task key matches a shell pattern (`ipo:*`, `*:seed3`, `0.1`), or whose stage is it;
    a pattern matching nothing is refused with the stages' task summaries."""
    chosen = [r for r in rows if r["stage"] == pattern or (r["task"] and fnmatch.fnmatchcase(r["task"], pattern))]
    if not chosen:
        summary = "; ".join(f"{r['stage']}: {r['task']}" for r in summarise_rows(rows) if r["task"])
        raise ValueError(f"--task {pattern!r} matches no task of the run; its tasks are {summary} (a key such "
                         "as 0.1 or ipo:0.5, a shell pattern such as 'ipo:*' or '*:seed3', or a stage name)")
    return chosen


def fold_note(shown: list[dict]) -> str | None:
    """The line under a folded table saying how to see every row."""
    folded = sum(r.get("summarised", 0) for r in shown)
    return (f"({folded} task rows summarised; `status --all` lists them, `status --task PATTERN` some, "
            "e.g. --task 'ipo:*' or --task '*:seed3')") if folded else None


def submitted_tasks(tasks: list[Task]) -> str:
    """What `run` says it submitted for an array: '3 tasks', or for a big one its summary."""
    return _plural(len(tasks), "task") if len(tasks) <= LIST_AT_MOST else describe_tasks(tasks)


def summarise_rows(rows: list[dict]) -> list[dict]:
    """`status` rows with each stage of more than LIST_AT_MOST tasks folded into one row: the task column
    describes the tasks (`describe_tasks`), the state column counts them per state, steps and restarts
    are summed, the job column names the array job(s)."""
    by_stage: dict[str, list[dict]] = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    folded = []
    for stage, group in by_stage.items():
        if len(group) <= LIST_AT_MOST:
            folded.extend(group)
            continue
        parents = sorted({r["job_id"].split("_")[0] for r in group if r["job_id"]})
        done_steps = [r["step"] or 0 for r in group]
        totals = [r["total_steps"] for r in group]
        folded.append({
            **{key: None for key in group[0]},
            "stage": stage,
            "task": describe_tasks([get_stage(stage).parse_task(r["task"]) for r in group]),
            "job_id": ",".join(parents[:3]) + (" .." if len(parents) > 3 else "") if parents else None,
            "state": state_counts(group),
            "done": all(r["done"] for r in group),
            "step": sum(done_steps),
            "total_steps": sum(totals) if all(totals) else None,
            "restarts": sum(r["restarts"] for r in group),
            "resumed_from": [],
            "lost_steps": sum(r["lost_steps"] for r in group),
            "warnings": [w for r in group for w in r["warnings"]],
            "summarised": len(group),
        })
    return folded


def job_ids_line(job_ids: list[str]) -> str:
    """The ids `cancel` names: all of them when few, else the jobs and arrays they belong to."""
    if len(job_ids) <= NAME_IDS_AT_MOST:
        return " ".join(job_ids)
    parents = list(dict.fromkeys(job_id.split("_")[0] for job_id in job_ids))
    return f"jobs and arrays {' '.join(parents)}"
