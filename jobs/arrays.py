"""Job arrays within the scheduler's `MaxArraySize`: a stage with more tasks is submitted as several arrays.

The planner (`jobs.launcher.plan_slurm`) plans one job per stage; `split` cuts an array stage's job
into chunks of at most `MaxArraySize` tasks (SLURM refuses an array whose task index reaches it) and
rewires what waits on it. In a plan, `<stage>` stands for every array of that stage (afterok waits for
all of them) and `<stage.k>` for its k-th array alone: an array stage whose task i waits for task i of
its upstream (aftercorr) waits, chunk by chunk, for the upstream's chunk k when both are cut the same
way, and for the whole upstream stage otherwise. The job records keep one submission per array, so
`status`, `logs`, `cancel` and a relaunch see the stage's tasks as usual (each task has its own job id).
"""
from __future__ import annotations

import dataclasses

from pipeline.registry import task_key


def chunk_size(max_array_size: int | None) -> int | None:
    """Tasks per array under `MaxArraySize` (None: no limit known; 0 means arrays are disabled: one task each)."""
    return None if max_array_size is None else max(1, max_array_size)


def split(planned: list, max_array_size: int | None) -> list:
    """The planned jobs with every array stage of more than `MaxArraySize` tasks cut into chunks (see module doc).

    Jobs that fit are returned unchanged (same objects, same placeholders)."""
    size = chunk_size(max_array_size)
    cuts: dict[str, list[list[str]]] = {}  # stage planned now -> task keys of each of its arrays
    out = []
    for job in planned:
        if size is None or not job.stage.is_array or len(job.tasks) <= size:
            cuts[job.stage.name] = [[task_key(t) for t in job.tasks]]
            out.append(job)
            continue
        parts = [job.tasks[i:i + size] for i in range(0, len(job.tasks), size)]
        cuts[job.stage.name] = [[task_key(t) for t in part] for part in parts]
        for k, part in enumerate(parts):
            deps, corresponding, keys = list(job.depends_on), [], [task_key(t) for t in part]
            for upstream in job.corresponding:
                up_cut = cuts.get(upstream[1:-1]) if upstream.startswith("<") else None
                lined_up = up_cut is not None and len(up_cut) > 1 and k < len(up_cut) and up_cut[k] == keys
                up = upstream[1:-1]
                if lined_up and len(part) > 1:
                    corresponding.append(f"<{up}.{k}>")      # task i of this array after task i of chunk k
                elif lined_up:
                    deps.append(f"<{up}.{k}>")               # a one-task chunk is a plain job: after chunk k
                else:
                    deps.append(upstream)                    # not lined up: after the whole upstream
            out.append(dataclasses.replace(job, tasks=part, depends_on=deps, corresponding=corresponding, chunk=k))
    return out


def resolve(ids: list[str], submitted: dict[str, list[str]]) -> list[str]:
    """Job ids for a planned job's dependencies: `<stage>` -> every array submitted for it, `<stage.k>` -> its
    k-th, an id -> itself."""
    out = []
    for dep in ids:
        if not dep.startswith("<"):
            out.append(dep)
            continue
        stage, _, k = dep[1:-1].partition(".")
        out.extend(submitted[stage] if not k else [submitted[stage][int(k)]])
    return out
