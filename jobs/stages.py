"""The stage graph and the job callable that runs one stage (or array task) of a run.

The graph: sft -> pairs (one task per prompt shard) -> pairs_merge -> dpo (one task per beta) -> eval.
Every job only needs the run directory: it reads `RUN/config.yaml` and the upstream files.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import interrupt
from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout, beta_tag
from slurm import environment


@dataclass(frozen=True)
class Stage:
    name: str
    resources: str                                        # section of cfg.slurm that sizes its jobs
    after: tuple[str, ...]                                # stages whose jobs must finish ok first
    tasks: Callable[[PipelineConfig], list[str]] | None   # array tasks; None = a single job
    help: str


STAGES: list[Stage] = [
    Stage("sft", "sft", (), None, "supervised fine-tuning (and data preparation)"),
    Stage("pairs", "pairs", ("sft",), lambda cfg: [str(s) for s in range(cfg.pairs.num_shards)],
          "sample + score completions, one array task per prompt shard"),
    Stage("pairs_merge", "pairs", ("pairs",), None, "join shards into the preference-pair file"),
    Stage("dpo", "dpo", ("pairs_merge",), lambda cfg: [beta_tag(b) for b in cfg.dpo.betas],
          "DPO, one array task per beta"),
    Stage("eval", "eval", ("dpo",), None, "reward vs KL for SFT and every DPO checkpoint"),
]
STAGE_BY_NAME = {s.name: s for s in STAGES}


def stages_until(last: str | None) -> list[Stage]:
    """The stages up to and including `last` (all of them for None)."""
    if last is None:
        return list(STAGES)
    if last not in STAGE_BY_NAME:
        raise ValueError(f"--until {last!r}: unknown stage; choose one of {', '.join(STAGE_BY_NAME)}")
    return STAGES[:[s.name for s in STAGES].index(last) + 1]


def stage_tasks(stage: Stage, cfg: PipelineConfig) -> list[str | None]:
    return stage.tasks(cfg) if stage.tasks else [None]


def is_task_done(layout: RunLayout, stage: str, task: str | None) -> bool:
    if stage == "pairs":
        return layout.is_done("pairs") or layout.pairs_shard(int(task)).is_file()
    if stage == "pairs_merge":
        return layout.is_done("pairs")
    return layout.is_done(stage, task)


def run_stage(run_dir: str | Path, stage: str, task: str | None = None) -> dict | int:
    """Run one stage (or one array task) of the run in `run_dir`; idempotent."""
    from jobs.config import load_run_config
    from pipeline.stages import dpo, eval as evaluation, pairs, sft

    cfg = load_run_config(run_dir)
    layout = RunLayout(run_dir)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(layout.compile_cache))
    if stage == "sft":
        return sft.run(cfg, layout)
    if stage == "pairs":
        return pairs.run(cfg, layout) if task is None else pairs.run_shard(cfg, layout, int(task))
    if stage == "pairs_merge":
        return pairs.merge(cfg, layout)
    if stage == "dpo":
        if task is None:
            return {tag: dpo.run(cfg, layout, float(tag)) for tag in STAGE_BY_NAME["dpo"].tasks(cfg)}
        return dpo.run(cfg, layout, float(task))
    if stage == "eval":
        return evaluation.run(cfg, layout)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_BY_NAME)}")


class StageJob:
    """The callable submitit pickles for each job / array task.

    It replaces submitit's signal handling (which checkpoints from rank 0 only, inside the handler)
    with the cooperative one: USR2 (SLURM's early warning, `--signal=USR2@lead`) and SIGTERM (a
    requeue, preemption or cancel) only set a flag; the stage saves at its next step boundary on
    every rank and raises StageInterrupted; then rank 0 requeues the job (same job id) when the
    stop was a time-out or an early preemption warning. SIGTERM needs no requeue from us: SLURM
    already requeues (or cancels) the job.
    """

    def __init__(self, run_dir: str | Path, stage: str, task: str | None = None, *, time_limit_s: int | None = None,
                 signal_lead_s: int = 0, max_requeues: int = 3):
        self.run_dir = str(Path(run_dir).resolve())
        self.stage = stage
        self.task = task
        self.time_limit_s = time_limit_s
        self.signal_lead_s = signal_lead_s
        self.max_requeues = max_requeues
        self._started = time.time()

    def _on_usr2(self, signum, frame):
        # SLURM may send the warning up to a minute early; well before that it is a preemption notice
        elapsed = time.time() - self._started
        near_limit = self.time_limit_s is None or elapsed >= self.time_limit_s - self.signal_lead_s - 120
        interrupt.request_stop("timeout" if near_limit else "preempted")

    def _on_term(self, signum, frame):
        interrupt.request_stop("terminated")

    def __call__(self):
        self._started = time.time()
        # torch would otherwise use every core of the node, not the job's share
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        environment.export_torch_distributed()
        interrupt.clear()
        signal.signal(signal.SIGUSR2, self._on_usr2)
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            return run_stage(self.run_dir, self.stage, self.task)
        except interrupt.StageInterrupted as stop:
            job = environment.current_job()
            if stop.reason in ("timeout", "preempted") and job.in_slurm:
                if job.restart_count >= self.max_requeues:
                    raise RuntimeError(f"{self!r} gave up after {job.restart_count} requeues ({stop}); raise the "
                                       "stage's slurm time or max_requeues, then `launch.py resume`") from None
                if job.global_rank == 0:
                    print(f"{self!r}: {stop}; requeueing job {job.job_id} "
                          f"(restart {job.restart_count + 1} of at most {self.max_requeues})", flush=True)
                    environment.requeue(job.job_id)
            raise

    def __repr__(self) -> str:
        return f"StageJob({self.stage}{'' if self.task is None else '[' + self.task + ']'} @ {self.run_dir})"
