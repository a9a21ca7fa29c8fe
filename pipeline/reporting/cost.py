"""What a run cost, per stage and per array task (arm): GPU-hours (CPU-hours for jobs without GPUs)
over all attempts, the share spent in attempts that did not finish their task (requeues) and the
training steps lost. Read from the run directory's attempt records (pipeline.rundir.attempts), so
`status` and report.md give the same figures with or without SLURM's accounting database."""
from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.registry import STAGES, task_key
from pipeline.rundir.attempts import Cost, describe, read_cost
from pipeline.rundir.layout import RunLayout, read_json
from pipeline.rundir.progress import lost_steps


def cost_rows(cfg: PipelineConfig, layout: RunLayout, now: float | None = None) -> list[dict]:
    """One row per stage task: {stage, task, cost (Cost), lost_steps}."""
    rows = []
    for stage in STAGES:
        for task in stage.task_list(cfg):
            progress = read_json(stage.progress_path(layout, task), {}) if stage.writes_progress else {}
            rows.append({"stage": stage.name, "task": task.key if task is not None else None,
                         "cost": read_cost(layout, stage.name, task_key(task), now),
                         "lost_steps": lost_steps((progress or {}).get("restarts", []))})
    return rows


def totals(rows: list[dict]) -> dict[str, tuple[Cost, int]]:
    """Per stage (in registry order) and 'total': the summed cost and lost steps."""
    sums: dict[str, tuple[Cost, int]] = {}
    for row in rows:
        for name in (row["stage"], "total"):
            cost, lost = sums.get(name, (Cost(), 0))
            sums[name] = (cost + row["cost"], lost + row["lost_steps"])
    if "total" in sums:
        sums["total"] = sums.pop("total")  # last
    return sums


def summary_lines(rows: list[dict]) -> list[str]:
    """For `status`: one line per stage that ran, and the total."""
    lines = []
    for name, (cost, lost) in totals(rows).items():
        if cost.attempts or name == "total":
            lines.append(f"cost {name}: {describe(cost)}; {cost.attempts} attempt(s), {lost} step(s) lost")
    return lines


def cost_markdown(rows: list[dict]) -> str:
    """report.md's cost section: per stage and per array task (an arm, a shard)."""
    def hours(cost: Cost) -> tuple[str, str, str]:
        shares = [f"{requeued:.3g} {kind}-h ({100 * requeued / spent:.0f}%)"
                  for kind, spent, requeued in (("GPU", cost.gpu_hours, cost.requeued_gpu_hours),
                                                ("CPU", cost.cpu_hours, cost.requeued_cpu_hours)) if spent]
        return f"{cost.gpu_hours:.4g}", f"{cost.cpu_hours:.4g}", " + ".join(shares) or "0"

    lines = ["## Cost", "",
             "GPU-hours (allocated GPUs × wall time, every attempt) and CPU-hours of jobs without GPUs, from the "
             "attempt records the jobs wrote (`jobs/attempts/`); *requeued* is the time of attempts that did not "
             "finish their task (time limits, preemptions, failures before a relaunch). The eval job that writes "
             "this report counts up to now.", "",
             "| stage | task | attempts | GPU-h | CPU-h | requeued | steps lost |", "|---|---|---|---|---|---|---|"]
    by_stage = totals(rows)
    for name, (cost, lost) in by_stage.items():
        tasks = [r for r in rows if r["stage"] == name and r["task"] is not None]
        if name != "total" and not cost.attempts:
            continue
        if len(tasks) > 1:
            for r in tasks:
                lines.append(f"| {name} | {r['task']} | {r['cost'].attempts} | {' | '.join(hours(r['cost']))} "
                             f"| {r['lost_steps']} |")
        label = "**total**" if name == "total" else name
        task = "" if name == "total" else ("all" if len(tasks) > 1 else "")
        lines.append(f"| {label} | {task} | {cost.attempts} | {' | '.join(hours(cost))} | {lost} |")
    unmeasured = by_stage.get("total", (Cost(), 0))[0].unmeasured
    if unmeasured:
        lines += ["", f"{unmeasured} attempt(s) were killed outright (no end recorded) and are not counted."]
    return "\n".join(lines) + "\n"
