"""The stage graph and the job callable that runs one stage (or array task) of a run.

The graph: sft -> pairs (one task per prompt shard) -> pairs_merge -> dpo (one task per beta) -> eval.
Every job only needs the run directory: it reads `RUN/config.yaml` and the upstream files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout, beta_tag


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
    """The callable submitit pickles for each job / array task."""

    def __init__(self, run_dir: str | Path, stage: str, task: str | None = None):
        self.run_dir = str(Path(run_dir).resolve())
        self.stage = stage
        self.task = task

    def __call__(self):
        return run_stage(self.run_dir, self.stage, self.task)

    def __repr__(self) -> str:
        return f"StageJob({self.stage}{'' if self.task is None else '[' + self.task + ']'} @ {self.run_dir})"
