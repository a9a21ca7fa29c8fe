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
from pipeline.rundir.layout import RunLayout
from pipeline.training.methods import DEFAULT_METHOD, METHODS


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
    """One arm of the sweep: a method (`pipeline.training.methods`), its strength (TRL's beta; N for Best-of-N;
    None for a method without one) and a training/sampling seed (None = the run's `seed`). Its key and
    tag are made here and nowhere else. Arms of trained methods are the dpo stage's array tasks
    (`trained_arms`); the eval stage evaluates every arm (`sweep_arms`).

    The default arm (method dpo, the run's seed) keeps the beta-only names of runs made before the
    sweep had methods and seeds: key '0.1', tag 'beta-0.1'. Other arms name what differs: keys
    'ipo:0.5', 'dpo:0.1:seed1', 'preferred_ft', 'preferred_ft:seed1', 'best_of_n:4'; tags 'ipo-beta-0.5',
    'dpo-beta-0.1-seed-1', 'preferred-ft', 'preferred-ft-seed-1', 'best-of-n-4'.
    """
    beta: float | int | None
    method: str = DEFAULT_METHOD
    seed: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"arm method {self.method!r}: choose one of {', '.join(METHODS)}")
        spec = METHODS[self.method]
        if not spec.has_strength:
            if self.beta is not None:
                raise ValueError(f"arm {self.method}: {spec.label} has no strength (got {self.beta!r})")
        elif self.beta is None:
            raise ValueError(f"arm {self.method}: needs a strength ({spec.symbol})")
        elif spec.integer_strength:
            value = float(self.beta)
            problem = spec.check_strength(value)
            if problem:
                raise ValueError(f"arm {self.method}: {problem}")
            object.__setattr__(self, "beta", int(value))
        else:
            object.__setattr__(self, "beta", float(self.beta))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"arm seed {self.seed!r}: a seed is an integer >= 0")

    @property
    def strength(self) -> float | int | None:
        """The method's strength: TRL's `beta` for trained methods with one, N for Best-of-N, else None."""
        return self.beta

    @property
    def trains(self) -> bool:
        """Whether the dpo stage trains this arm (else the eval stage evaluates it from the SFT model)."""
        return METHODS[self.method].trains

    @property
    def is_default(self) -> bool:
        return self.method == DEFAULT_METHOD and self.seed is None

    @property
    def key(self) -> str:
        """As typed in records and `--task`: '0.05', '1.0' (dpo, run seed); 'ipo:0.5', 'dpo:0.1:seed1',
        'preferred_ft', 'preferred_ft:seed1', 'best_of_n:4'."""
        if self.is_default:
            return repr(self.beta)
        seed = "" if self.seed is None else f":seed{self.seed}"
        return self.method + ("" if self.beta is None else f":{self.beta!r}") + seed

    @property
    def tag(self) -> str:
        """The arm's name in paths, wandb runs, policy ids and metric names: 'beta-0.1', 'ipo-beta-0.5',
        'dpo-beta-0.1-seed-1', 'preferred-ft', 'best-of-n-4-seed-1'."""
        if self.is_default:
            return f"beta-{self.beta!r}"
        spec = METHODS[self.method]
        parts = [spec.tag]
        if self.beta is not None:
            parts += [spec.strength_tag, repr(self.beta)] if spec.strength_tag else [repr(self.beta)]
        if self.seed is not None:
            parts += ["seed", str(self.seed)]
        return "-".join(parts)

    @property
    def dirname(self) -> str:
        return self.tag

    def training_seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed

    @classmethod
    def parse(cls, text: str) -> "Arm":
        """A key, any spelling of its numbers: '1', '1.0', '1e0'; 'ipo:0.5'; 'dpo:0.1:seed1' ('seed01');
        'preferred_ft', 'preferred_ft:seed1' (a method without a strength); 'best_of_n:4'."""
        usage = ("a DPO task is a beta, e.g. --task 0.1, or METHOD:BETA[:seedN], e.g. --task ipo:0.5 or "
                 f"--task dpo:0.1:seed1, or METHOD[:seedN] for a method without a strength, e.g. --task "
                 f"preferred_ft:seed1 (methods: {', '.join(METHODS)})")
        parts = [part.strip() for part in str(text).strip().split(":")]
        if len(parts) > 3 or (len(parts) == 1 and not parts[0]):
            raise ValueError(f"task {text!r}: {usage}")
        first = parts[0].lower()
        method = first if (len(parts) > 1 or first in METHODS) else DEFAULT_METHOD
        if method not in METHODS:
            raise ValueError(f"task {text!r}: unknown method {parts[0]!r}; {usage}")
        has_strength = METHODS[method].has_strength

        def seed_of(part: str) -> int:
            if not part.lower().startswith("seed"):
                raise ValueError
            return int(part[4:])

        try:
            if not has_strength:
                if len(parts) > 2:
                    raise ValueError
                return cls(None, method, seed_of(parts[1]) if len(parts) == 2 else None)
            if len(parts) == 1 and first in METHODS:
                raise ValueError
            beta = float(parts[-1] if len(parts) == 1 else parts[1])
            seed = seed_of(parts[2]) if len(parts) == 3 else None
            return cls(beta, method, seed)
        except ValueError:
            raise ValueError(f"task {text!r}: {usage}") from None


@dataclass(frozen=True)
class FromSft:
    """A task of the eval_sft stage: what is evaluated straight from the SFT model: the SFT model itself
    (the reference row and KL noise floor; key 'sft') or a Best-of-N arm (key 'best_of_n:4')."""
    arm: Arm | None = None  # None: the SFT model itself

    def __post_init__(self):
        if self.arm is not None and self.arm.trains:
            raise ValueError(f"task {self.arm.key!r}: {self.arm.method} is trained; its eval is an eval_arms task")

    @property
    def key(self) -> str:
        return "sft" if self.arm is None else self.arm.key

    @property
    def dirname(self) -> str:
        return "sft" if self.arm is None else self.arm.tag

    @classmethod
    def parse(cls, text: str) -> "FromSft":
        """'sft', or the key of a Best-of-N arm ('best_of_n:4')."""
        if str(text).strip().lower() == "sft":
            return cls(None)
        try:
            return cls(Arm.parse(text))
        except ValueError as error:
            raise ValueError(f"task {text!r}: an eval_sft task is 'sft' or a Best-of-N arm such as "
                             f"'best_of_n:4' ({error})") from None


Task = Union[Shard, Arm, FromSft, None]


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
    # An array stage whose task i waits only for task i of this upstream array stage (SLURM's aftercorr),
    # when both arrays list the same tasks in the same order; else it waits for all of them (afterok).
    corresponds_to: str | None = None

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
    """Every arm of the sweep (what eval evaluates): methods x strengths x seeds, in config order (seeds
    innermost); a method without a strength has one arm per seed."""
    seeds = cfg.sweep.seeds or [None]
    return [Arm(strength, method, seed) for method in cfg.sweep.methods
            for strength in cfg.sweep.strengths_of(method, cfg.dpo.betas) for seed in seeds]


def trained_arms(cfg: PipelineConfig) -> list[Arm]:
    """The dpo stage's array tasks: the arms of methods that train (not Best-of-N), in sweep order."""
    return [arm for arm in sweep_arms(cfg) if arm.trains]


def from_sft_tasks(cfg: PipelineConfig) -> list[FromSft]:
    """The eval_sft stage's array tasks: the SFT model itself, then each Best-of-N arm."""
    return [FromSft(None)] + [FromSft(arm) for arm in sweep_arms(cfg) if not arm.trains]


STAGES: list[Stage] = [
    Stage("sft", (), "pipeline.stages.sft:run", "sft", "sft", multi_process=True),
    Stage("pairs", ("sft",), "pipeline.stages.pairs:run_shard", "pairs", "pairs",
          tasks=lambda cfg: [Shard(i) for i in range(cfg.pairs.num_shards)], task_type=Shard,
          done_check=_pairs_shard_done, writes_progress=False, scale_hint="raise pairs.num_shards to use more GPUs"),
    Stage("pairs_merge", ("pairs",), "pipeline.stages.pairs:merge", "pairs", "pairs", writes_progress=False,
          needs_gpu=False),
    Stage("dpo", ("pairs_merge",), "pipeline.stages.dpo:run", "dpo", "dpo", tasks=trained_arms, task_type=Arm,
          multi_process=True),
    # eval: every policy evaluated by its own array task, then one small job assembles the frontier
    Stage("eval_sft", ("sft",), "pipeline.stages.eval:run_from_sft", "eval", "eval/tasks", tasks=from_sft_tasks,
          task_type=FromSft, scale_hint="each eval_sft task runs one process"),
    Stage("eval_arms", ("dpo",), "pipeline.stages.eval:run_arm", "eval", "eval/tasks", tasks=trained_arms,
          task_type=Arm, corresponds_to="dpo", scale_hint="each eval_arms task runs one process"),
    Stage("eval", ("eval_sft", "eval_arms"), "pipeline.stages.eval:run", "eval", "eval", writes_progress=False,
          needs_gpu=False),
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
