"""Submit a run's stages: all at once as dependent SLURM jobs, or one after another locally.

Relaunching is idempotent: tasks whose DONE marker exists are skipped, tasks whose job is still
queued or running are left alone (their job ids become the dependencies of what is submitted
now), and failed or cancelled tasks are submitted again with their dependants rewired.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs import arrays, records
from jobs.config import (ExperimentConfig, config_differences, load_run_config, resolve_config, save_config,
                         stage_resources)
from jobs.presets import PRESETS
from jobs.stages import StageJob
from jobs.summary import describe_tasks, submitted_tasks
from pipeline.rundir.layout import RunLayout
from pipeline.registry import STAGES, Stage, Task, stages_until
from slurm import queue, submit
from slurm.resources import SlurmResources

REPO_ROOT = Path(__file__).resolve().parents[1]

EXECUTORS = ("auto", "slurm", "local")


def choose_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if executor == "auto":
        return "slurm" if submit.sbatch_available() else "local"
    if executor == "slurm" and not submit.sbatch_available():
        raise ValueError("--executor slurm: `sbatch` is not on the PATH; run from a cluster login node or use "
                         "--executor local")
    return executor


def check_executor_fits(requested: str, kind: str, cfg: ExperimentConfig) -> None:
    """Refuse to run a GPU configuration on a machine that cannot run it (a login node, by accident)."""
    asks_gpus = sorted({f"slurm.{s.resources}" for s in STAGES if getattr(cfg.slurm, s.resources).gpus_per_node > 0})
    if requested == "auto" and kind == "local" and asks_gpus:
        raise ValueError(f"--executor auto found no `sbatch` on the PATH, so the run would start here, but "
                         f"{', '.join(asks_gpus)} ask for GPUs: this looks like a login node without the SLURM "
                         "module. Load it (e.g. `module load slurm`) so that `sbatch` is found, or pass "
                         "--executor local to run on this machine on purpose")
    if kind == "local" and cfg.device != "cpu" and (cfg.device == "cuda" or asks_gpus) and submit.count_gpus() == 0:
        raise ValueError(f"--executor local: this machine has no GPU and the config needs one (device={cfg.device}"
                         f"{', ' + ', '.join(asks_gpus) + ' ask for GPUs' if asks_gpus else ''}); run it on a GPU "
                         "node, or --set device=cpu to run it on this CPU on purpose")


def prepare_run(run_dir: str | Path, preset: str | None, config_file: str | None,
                sets: list[str], log=print) -> tuple[ExperimentConfig, RunLayout, bool]:
    """Resolve the config of a new run, or load (and check) the stored config of an existing one.

    An existing run keeps its ML config; its SLURM resources may change on a relaunch (more time,
    fewer nodes after a failure, another partition): they apply to the jobs submitted from then on.
    Writes nothing (the caller saves the config once every check passed, so a bad value leaves no
    run directory). Returns (config, layout, whether the config is to be saved: a new run or
    changed resources).
    """
    layout = RunLayout(run_dir)
    if layout.config.is_file():
        cfg = load_run_config(layout.root)
        if preset or config_file or sets:
            base = None if preset or config_file else dataclasses.asdict(cfg)
            wanted = resolve_config(preset, config_file, sets, base=base)
            changed = config_differences(cfg, wanted)
            fixed = [key for key in changed if not key.startswith("slurm.")]
            if fixed:
                raise ValueError(f"{layout.config} already holds this run's config and the new options change "
                                 f"{', '.join(fixed[:8])}{' ...' if len(fixed) > 8 else ''}; only slurm.* "
                                 "resources may change on a relaunch: relaunch without the other options to "
                                 "continue the run, or use a new --run-dir")
            if changed:
                log(f"slurm resources changed for the jobs submitted from now on: {', '.join(changed)}")
                return wanted, layout, True
        return cfg, layout, False
    if preset is None and config_file is None:
        raise ValueError(f"{layout.root} is not a run directory yet: give --preset ({', '.join(PRESETS)}) "
                         "and/or --config")
    return resolve_config(preset, config_file, sets), layout, True


def prefetch(cfg: ExperimentConfig, layout: RunLayout, log=print) -> dict:
    """Pin and download every hub model and dataset of the run (on the login node, before any job
    exists); jobs then read them offline. A run directory this call created is removed again if the
    prefetch fails, so a bad reference (or a LoRA target module the model lacks, or a reward model with
    more than one output) leaves nothing behind."""
    from pipeline.data import hub
    from pipeline.models.adapters import check_lora_targets
    from pipeline.models.reward import check_reward_model

    created = not layout.root.exists()
    try:
        fetched = hub.prefetch(cfg, layout.root, log=log)
        if cfg.pairs.source == "dataset":  # refused here, before any job: columns, splits, usable rows
            from pipeline.data import preferences

            snapshot = fetched.get("pairs.dataset", {}).get("path")
            counts = preferences.check_before_submit(cfg, snapshot)
            if counts["conversational"]:  # message lists need the policy's chat template
                from pipeline.models.chat import check_chat_template

                check_chat_template(cfg, fetched, f"pairs.dataset={cfg.pairs.dataset}")
            log(f"pairs.dataset: {counts['usable']} usable pairs of {counts['rows']} rows, "
                f"{counts['held_out_prompts']} prompts held out for eval; dropped {counts['empty']} empty, "
                f"{counts['identical']} with identical chosen/rejected (rows longer than dpo.max_length are "
                "counted by the pairs stage)")
        if cfg.sft.dataset is not None:  # SFT's own data: split, column, usable rows; a template for chat
            from pipeline.data import sft_data

            counts = sft_data.check_before_submit(cfg, fetched.get("sft.dataset", {}).get("path"))
            if counts["conversational"]:
                from pipeline.models.chat import check_chat_template

                check_chat_template(cfg, fetched, f"sft.dataset={cfg.sft.dataset}")
            log(f"sft.dataset: {counts['usable']} usable {'conversations' if counts['conversational'] else 'texts'} "
                f"of {counts['rows']} rows (dropped {counts['empty']} empty)")
        check_lora_targets(cfg, fetched)  # reads the prefetched model's config: LoRA targets it lacks
        check_reward_model(cfg, fetched)  # a reward model with one output; a classifier's label
        return fetched
    except BaseException:
        if created:
            shutil.rmtree(layout.root, ignore_errors=True)
        raise


# ------------------------------------------------------------------ local: one task after another
def run_local(cfg: ExperimentConfig, layout: RunLayout, until: str | None = None, log=print) -> list[str]:
    """Run each stage task as a submitit LocalExecutor job (a real subprocess), in graph order,
    waiting for each. Returns the tasks that ran (done ones are skipped).
    """
    ran = []
    for stage in stages_until(until):
        for task in stage.task_list(cfg):
            label = stage.label(task)
            if stage.is_done(layout, task):
                log(f"{label:>16}: done, skipped")
                continue
            resources = stage_resources(cfg, stage)
            folder = layout.jobs / "local" / stage.name
            executor = submit.make_executor("local", folder, resources, _job_name(cfg, stage))
            job = executor.submit(stage_job(layout, stage, task, resources))
            records.append(layout, records.Submission(stage.name, str(job.job_id),
                                                      {records.task_key(task): str(job.job_id)}, "local", str(folder)))
            log(f"{label:>16}: running as local job {job.job_id} (logs: {job.paths.stdout})")
            try:
                job.result()
            except Exception as exc:  # submitit re-raises the job's failure with its traceback
                raise RuntimeError(f"stage {label} failed; full log: {job.paths.stderr}\n{exc}") from None
            ran.append(label)
    return ran


# ------------------------------------------------------------------ SLURM: the whole graph at once
@dataclass
class PlannedJob:
    stage: Stage
    tasks: list[Task]
    resources: SlurmResources
    depends_on: list[str] = field(default_factory=list)   # job ids, or "<stage>" placeholders in a plan
    corresponding: list[str] = field(default_factory=list)  # arrays whose task i this job's task i waits for
    chunk: int = 0                       # which of its stage's arrays (a stage over MaxArraySize has several)


def plan_slurm(cfg: ExperimentConfig, layout: RunLayout, states: dict[str, queue.JobRecord] | None = None,
               until: str | None = None) -> tuple[list[PlannedJob], list[str]]:
    """What to submit now: per stage, the tasks neither done nor queued/running.

    A task still PENDING while one of its upstream stages is being resubmitted waits on the old,
    failed job (it would never start, or is about to be cancelled): it is replanned too, behind
    the new job. Returns the planned jobs and the ids of such stale jobs to cancel first.
    """
    latest = records.latest(layout)
    states = states or {}
    active: dict[str, list[str]] = {}
    planned: list[PlannedJob] = []
    stale: list[str] = []
    for stage in stages_until(until):
        upstream_replanned = any(p.stage.name in stage.after for p in planned)
        todo = []
        for task in stage.task_list(cfg):
            if stage.is_done(layout, task):
                continue
            entry = latest.get((stage.name, records.task_key(task)))
            record = states.get(entry[1]) if entry else None
            if record is not None and record.state in queue.ACTIVE_STATES:
                if not (upstream_replanned and record.state == "PENDING"):
                    active.setdefault(stage.name, []).append(entry[1])
                    continue
                stale.append(entry[1])
            todo.append(task)
        if todo:
            deps = [job for upstream in stage.after for job in active.get(upstream, [])]
            deps += [f"<{upstream}>" for upstream in stage.after if any(p.stage.name == upstream for p in planned)]
            corresponding = _corresponding_array(stage, todo, planned, active, latest)
            if corresponding:
                upstream = stage.corresponds_to
                drop = set(active.get(upstream, [])) | {f"<{upstream}>"}
                deps = [d for d in deps if d not in drop]
            planned.append(PlannedJob(stage, todo, stage_resources(cfg, stage), deps, corresponding))
    return planned, stale


def _corresponding_array(stage: Stage, todo: list[Task], planned: list[PlannedJob], active: dict[str, list[str]],
                         latest: dict) -> list[str]:
    """[the upstream array] when task i of the array about to be submitted may wait for task i of it alone
    (SLURM's aftercorr): the upstream array holds the same tasks at the same indices, either planned now
    or submitted earlier (each of its tasks done or still active). Else [] (wait for all: afterok)."""
    upstream = stage.corresponds_to
    if upstream is None or len(todo) < 2:  # one task is submitted as a plain job, not an array
        return []
    keys = [records.task_key(task) for task in todo]
    now = next((p for p in planned if p.stage.name == upstream), None)
    if now is not None:
        aligned = [records.task_key(task) for task in now.tasks] == keys and not active.get(upstream)
        return [f"<{upstream}>"] if aligned else []
    ids = [latest.get((upstream, key), (None, ""))[1] for key in keys]
    parents = {job_id.split("_")[0] for job_id in ids}
    if not active.get(upstream) or len(parents) != 1:
        return []  # nothing to wait for, or tasks from several arrays
    parent = parents.pop()
    return [parent] if ids == [f"{parent}_{i}" for i in range(len(ids))] else []


def stage_job(layout: RunLayout, stage: Stage, task: Task, resources: SlurmResources) -> StageJob:
    return StageJob(layout.root, stage.name, task, time_limit_s=resources.time_seconds,
                    signal_lead_s=resources.signal_lead_s, max_requeues=resources.max_requeues)


def _job_name(cfg: ExperimentConfig, stage: Stage) -> str:
    return f"{cfg.name}-{stage.name}"


def container_args(cfg: ExperimentConfig, layout: RunLayout) -> dict:
    """make_executor/render_sbatch keywords of the run's container: the run directory, the repository
    (the working directory, so it is importable) and the HF cache bound at their own paths."""
    from pipeline.data import hub
    return {"container": cfg.slurm.container, "workdir": str(REPO_ROOT),
            "binds": [str(layout.root.resolve()), str(REPO_ROOT), str(hub.cache_dir(cfg, layout.root))]}


def render_plan(cfg: ExperimentConfig, layout: RunLayout, planned: list[PlannedJob]) -> str:
    parts = []
    for job in planned:
        array = len(job.tasks) if job.stage.is_array else None
        script = submit.render_sbatch(job.resources, layout.jobs / job.stage.name, _job_name(cfg, job.stage),
                                      array_size=array, dependencies=job.depends_on, corresponding=job.corresponding,
                                      **container_args(cfg, layout))
        tasks = f" tasks {describe_tasks(job.tasks)}" if job.stage.is_array else ""  # one line, even for 600 arms
        parts.append(f"# ---- stage {job.stage.name}{tasks}\n{script}")
    return "\n".join(parts)


def reconcile_intents(layout: RunLayout, log=print) -> None:
    """Turn intents left without job ids (a launcher that died between `sbatch` and its record) into
    records of the jobs the queue holds under their comment, or drop them if no such job exists
    (never submitted, or already gone: a finished job left its DONE marker or is resubmitted)."""
    for intent in records.unconfirmed(layout):
        found = queue.jobs_with_comment(records.comment_for(intent.intent))
        if not found:
            records.replace(layout, intent.intent, None)
            continue
        parent = found[0].split("_")[0]
        array = any("_" in job_id for job_id in found)
        tasks = {key: f"{parent}_{i}" if array else parent for i, key in enumerate(intent.tasks)}
        records.replace(layout, intent.intent, dataclasses.replace(intent, job_id=parent, tasks=tasks))
        log(f"{intent.stage:>12}: found job {parent} in the queue (submitted by a launch that died before "
            "recording it); not submitting it again")


def _fault_point(stage: Stage) -> None:
    """Test hook: die right after `sbatch` of this stage, before its record (a killed launcher)."""
    if os.environ.get("SLURM_DPO_FAULT_AFTER_SBATCH") == stage.name:
        os._exit(70)


def submit_slurm(cfg: ExperimentConfig, layout: RunLayout, until: str | None = None,
                 log=print) -> list[records.Submission]:
    """Submit every stage that is not done or active, wired with afterok dependencies; returns at once.

    Each submission is recorded as an intent before `sbatch` and completed after it. If SLURM
    refuses a later stage, the jobs this launch submitted are cancelled: nothing half-submitted
    stays in the queue.
    """
    reconcile_intents(layout, log)
    known = [job_id for _, job_id in records.latest(layout).values()]
    states = queue.query_jobs(known) if known else {}
    planned, stale = plan_slurm(cfg, layout, states, until)
    planned = arrays.split(planned, queue.max_array_size())
    if stale:
        queue.cancel_jobs(stale)
        log(f"cancelled {len(stale)} pending job(s) waiting on failed upstream jobs: {' '.join(stale)}")
    submitted: dict[str, list[str]] = {}  # stage -> its arrays (jobs) submitted now
    made: list[records.Submission] = []
    for job in planned:
        deps, corresponding = arrays.resolve(job.depends_on, submitted), arrays.resolve(job.corresponding, submitted)
        folder = layout.jobs / job.stage.name
        intent = records.Submission(job.stage.name, "", {records.task_key(t): "" for t in job.tasks}, "slurm",
                                    str(folder), intent=records.new_intent())
        records.append(layout, intent)
        try:
            handles = _sbatch(cfg, layout, job, deps, corresponding, folder, records.comment_for(intent.intent))
        except Exception as exc:  # noqa: BLE001 - sbatch's refusal, with SLURM's reason
            records.replace(layout, intent.intent, None)
            raise _undo(layout, made, job.stage, exc) from None
        _fault_point(job.stage)
        parent = handles[0].job_id.split("_")[0]
        submission = dataclasses.replace(intent, job_id=parent,
                                         tasks={records.task_key(t): h.job_id for t, h in zip(job.tasks, handles)})
        records.replace(layout, intent.intent, submission)
        submitted.setdefault(job.stage.name, []).append(parent)
        made.append(submission)
        after = f" after {','.join(deps)}" if deps else ""
        after += f" task by task after {','.join(corresponding)}" if corresponding else ""
        log(f"{job.stage.name:>12}: submitted job {parent}{' (' + submitted_tasks(job.tasks) + ')' if job.stage.is_array else ''}{after}")
    if not made:
        log("nothing to submit: every stage is done or already queued/running")
    return made


def _sbatch(cfg: ExperimentConfig, layout: RunLayout, job: PlannedJob, deps: list[str], corresponding: list[str],
            folder: Path, comment: str):
    executor = submit.make_executor("slurm", folder, job.resources, _job_name(cfg, job.stage), deps, comment=comment,
                                    corresponding=corresponding, **container_args(cfg, layout))
    calls = [stage_job(layout, job.stage, task, job.resources) for task in job.tasks]
    if job.stage.is_array:
        with executor.batch():
            return [executor.submit(call) for call in calls]
    return [executor.submit(calls[0])]


def _undo(layout: RunLayout, made: list[records.Submission], stage: Stage, error: Exception) -> ValueError:
    """Cancel what this launch submitted before SLURM refused `stage`; the error to show."""
    ids = [s.job_id for s in made]
    if ids:
        queue.cancel_jobs(ids)
    for submission in made:
        records.replace(layout, submission.intent, None)
    reason = " ".join(str(error).split())
    undone = f"; cancelled the {len(ids)} job(s) this launch had submitted ({' '.join(ids)})" if ids else ""
    advice = submit.refusal_advice(reason, f"slurm.{stage.resources}")
    return ValueError(f"stage {stage.name}: SLURM refused the job: {reason}{undone}. {advice}")


@contextlib.contextmanager
def run_lock(layout: RunLayout):
    """One `run`/`resume` at a time per run directory (a second one would submit the same stages)."""
    import fcntl

    layout.root.mkdir(parents=True, exist_ok=True)
    path = layout.root / ".launch.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(f"{layout.root} is being launched by {holder}; wait for it to finish (or, if that "
                             f"process is gone, run again: the lock is released when it exits)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def launch(run_dir: str | Path, preset: str | None, config_file: str | None, sets: list[str], executor: str,
           dry_run: bool = False, until: str | None = None, log=print) -> int:
    kind = choose_executor(executor)
    stages_until(until)  # validate before anything is written
    cfg, layout, save = prepare_run(run_dir, preset, config_file, sets, log=log)
    check_executor_fits(executor, kind, cfg)
    if dry_run:
        planned, _ = plan_slurm(cfg, layout, until=until)
        planned = arrays.split(planned, queue.max_array_size())
        log(render_plan(cfg, layout, planned) if planned else "nothing to submit")
        return 0
    existed = layout.root.exists()
    new = not layout.config.is_file()
    prefetch(cfg, layout, log)
    with run_lock(layout):
        if new and layout.config.is_file():  # another launch made this run while we prepared: check against it
            cfg, layout, save = prepare_run(run_dir, preset, config_file, sets, log=log)
            new = False
        try:
            if save:
                save_config(cfg, layout)
            log(f"run directory: {layout.root} (executor: {kind})")
            if kind == "local":
                run_local(cfg, layout, until, log=log)
                log(f"done: {stages_until(until)[-1].path(layout)}")
            else:
                submit_slurm(cfg, layout, until, log=log)
                log(f"watch it: {Path(sys.argv[0]).name} status --run-dir {layout.root} --watch")
        except ValueError:
            if new and not existed and not records.load(layout):  # refused before any job: leave nothing
                shutil.rmtree(layout.root, ignore_errors=True)
            raise
    return 0


def prefetch_only(run_dir: str | Path, preset: str | None, config_file: str | None, sets: list[str],
                  log=print) -> int:
    """`launch.py prefetch`: what `run` does before submitting, alone (the config is not stored)."""
    cfg, layout, _ = prepare_run(run_dir, preset, config_file, sets, log=log)
    fetched = prefetch(cfg, layout, log)
    log(f"prefetched {len(fetched)} hub reference(s); revisions recorded in {layout.hub_revisions}"
        if fetched else "nothing to prefetch: the config names no hub model or dataset")
    return 0
