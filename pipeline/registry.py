"""The stage registry: every stage of a run declared once.

A stage is: its name, the stages it waits for, its tasks (none: one job; else typed array tasks,
each with one canonical key), its directory, its done check, its run function and the section of
`cfg.slurm` that sizes its jobs. The launcher, the local runner, `status`, `logs` and the job glue
read this table; nothing outside it and the stage modules branches on a stage's name.

Import-light on purpose (no torch, no scheduler): a stage's code is imported only when it runs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout
from pipeline.methods import DEFAULT_METHOD, METHODS


# ------------------------------------------------------------------ typed array tasks
@dataclass(frozen=True)
class Shard:
    """One prompt shard of the pairs stage."""
    index: int

    @property
    def key(self) -> str:
        """How the task is named in job records, `--task` and logs."""
        return str(self.index)

    dirname = None  # shards share their stage's directory

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            return cls(int(str(text).strip()))
        except ValueError:
            raise ValueError(f"task {text!r}: a shard is a number, e.g. --task 0") from None


@dataclass(frozen=True)
class Arm:
    """One arm of the DPO sweep: a method (`pipeline.methods`), its strength (TRL's beta) and a training
    seed (None = the run's `seed`). Its key and tag are made here and nowhere else.

    The default arm (method dpo, the run's seed) keeps the beta-only names of runs made before the
    sweep had methods and seeds: key '0.1', tag 'beta-0.1'. Other arms name what differs: keys
    'ipo:0.5', 'dpo:0.1:seed1'; tags 'ipo-beta-0.5', 'dpo-beta-0.1-seed-1'.
    """
    beta: float
    method: str = DEFAULT_METHOD
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "beta", float(self.beta))
        if self.method not in METHODS:
            raise ValueError(f"arm method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"arm seed {self.seed!r}: a seed is an integer >= 0")

    @property
    def strength(self) -> float:
        """The method's strength; TRL's `beta` for every method."""
        return self.beta

    @property
    def is_default(self) -> bool:
        return self.method == DEFAULT_METHOD and self.seed is None

    @property
    def key(self) -> str:
        """As typed in records and `--task`: '0.05', '1.0' (dpo, run seed); 'ipo:0.5', 'dpo:0.1:seed1'."""
        if self.is_default:
            return repr(self.beta)
        return f"{self.method}:{self.beta!r}" + ("" if self.seed is None else f":seed{self.seed}")

    @property
    def tag(self) -> str:
        """The arm's name in paths, wandb runs, policy ids and metric names: 'beta-0.1', 'ipo-beta-0.5',
        'dpo-beta-0.1-seed-1'."""
        if self.is_default:
            return f"beta-{self.beta!r}"
        return f"{self.method}-beta-{self.beta!r}" + ("" if self.seed is None else f"-seed-{self.seed}")

    @property
    def dirname(self) -> str:
        return self.tag

    def training_seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed

    @classmethod
    def parse(cls, text: str) -> "Arm":
        """A key, any spelling of its numbers: '1', '1.0', '1e0'; 'ipo:0.5'; 'dpo:0.1:seed1' ('seed01')."""
        usage = ("a DPO task is a beta, e.g. --task 0.1, or METHOD:BETA[:seedN], e.g. --task ipo:0.5 or "
                 f"--task dpo:0.1:seed1 (methods: {', '.join(METHODS)})")
        parts = [part.strip() for part in str(text).strip().split(":")]
        if len(parts) > 3 or (len(parts) == 1 and not parts[0]):
            raise ValueError(f"task {text!r}: {usage}")
        method = parts[0].lower() if len(parts) > 1 else DEFAULT_METHOD
        if method not in METHODS:
            raise ValueError(f"task {text!r}: unknown method {parts[0]!r}; {usage}")
        try:
            beta = float(parts[-1] if len(parts) == 1 else parts[1])
            seed = None
            if len(parts) == 3:
                if not parts[2].lower().startswith("seed"):
                    raise ValueError
                seed = int(parts[2][4:])
            return cls(beta, method, seed)
        except ValueError:
            raise ValueError(f"task {text!r}: {usage}") from None


Task = Union[Shard, Arm, None]


def task_key(task: Task) -> str:
    """The task's name in job records ('' for a stage that runs as one job)."""
    return "" if task is None else task.key


# ------------------------------------------------------------------ stages
@dataclass(frozen=True)
class Stage:
    name: str
    after: tuple[str, ...]                 # stages whose jobs must finish ok first
    run: str                               # "module:function", called as f(cfg, layout[, task])
    resources: str                         # section of cfg.slurm that sizes its jobs
    directory: str                         # its directory under the run root
    tasks: Callable[[PipelineConfig], list] | None = None  # array tasks; None = one job
    task_type: type | None = None          # parses `--task` and job-record keys
    done_check: Callable[[RunLayout, Task], bool] | None = None  # default: its DONE.json exists
    writes_progress: bool = True           # keeps progress.json (else status shows done as 1/1)
    multi_process: bool = False            # may run on several nodes / GPUs (else one process per job)
    needs_gpu: bool = True                 # False: its job asks for no GPU whatever its section says
    scale_hint: str = ""                   # how to use more GPUs when multi_process is False

    @property
    def is_array(self) -> bool:
        return self.tasks is not None

    def task_list(self, cfg: PipelineConfig) -> list[Task]:
        return self.tasks(cfg) if self.tasks else [None]

    def parse_task(self, text: str | None) -> Task:
        if not self.is_array:
            if text not in (None, ""):
                raise ValueError(f"stage {self.name} runs as one job; it has no task {text!r}")
            return None
        if text in (None, ""):
            raise ValueError(f"stage {self.name} is an array: name a task with --task")
        return self.task_type.parse(text)

    def path(self, layout: RunLayout, task: Task = None) -> Path:
        return layout.stage_dir(self.directory, task)

    def done_path(self, layout: RunLayout, task: Task = None) -> Path:
        return layout.done_path(self.directory, task)

    def progress_path(self, layout: RunLayout, task: Task = None) -> Path:
        return layout.progress_path(self.directory, task)

    def is_done(self, layout: RunLayout, task: Task = None) -> bool:
        return self.done_check(layout, task) if self.done_check else self.done_path(layout, task).is_file()

    def label(self, task: Task = None) -> str:
        return self.name if task is None else f"{self.name}[{task.key}]"

    def execute(self, cfg: PipelineConfig, layout: RunLayout, task: Task = None) -> Any:
        module, function = self.run.split(":")
        fn = getattr(importlib.import_module(module), function)
        return fn(cfg, layout) if task is None else fn(cfg, layout, task)


def _pairs_shard_done(layout: RunLayout, shard: Shard) -> bool:
    return layout.is_done("pairs") or layout.pairs_shard(shard.index).is_file()


def sweep_arms(cfg: PipelineConfig) -> list[Arm]:
    """The DPO stage's arms: methods x strengths x seeds, in config order (seeds innermost)."""
    seeds = cfg.sweep.seeds or [None]
    return [Arm(strength, method, seed) for method in cfg.sweep.methods
            for strength in cfg.sweep.strengths_of(method, cfg.dpo.betas) for seed in seeds]


STAGES: list[Stage] = [
    Stage("sft", (), "pipeline.stages.sft:run", "sft", "sft", multi_process=True),
    Stage("pairs", ("sft",), "pipeline.stages.pairs:run_shard", "pairs", "pairs",
          tasks=lambda cfg: [Shard(i) for i in range(cfg.pairs.num_shards)], task_type=Shard,
          done_check=_pairs_shard_done, writes_progress=False, scale_hint="raise pairs.num_shards to use more GPUs"),
    Stage("pairs_merge", ("pairs",), "pipeline.stages.pairs:merge", "pairs", "pairs", writes_progress=False,
          needs_gpu=False),
    Stage("dpo", ("pairs_merge",), "pipeline.stages.dpo:run", "dpo", "dpo", tasks=sweep_arms, task_type=Arm,
          multi_process=True),
    Stage("eval", ("dpo",), "pipeline.stages.eval:run", "eval", "eval", scale_hint="eval runs one process"),
]
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def get_stage(name: str) -> Stage:
    if name not in STAGE_BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_BY_NAME)}")
    return STAGE_BY_NAME[name]


def stages_until(last: str | None) -> list[Stage]:
    """The stages up to and including `last` (all of them for None)."""
    if last is None:
        return list(STAGES)
    if last not in STAGE_BY_NAME:
        raise ValueError(f"--until {last!r}: unknown stage; choose one of {', '.join(STAGE_BY_NAME)}")
    return STAGES[:[s.name for s in STAGES].index(last) + 1]
