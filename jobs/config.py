"""The whole experiment's configuration: the pipeline's ML config plus SLURM resources per stage.

Layers, later wins: dataclass defaults -> preset -> `--config FILE.yaml` -> `--set a.b=c`. The
resolved config is stored as `RUN/config.yaml`; every job reads it from there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.presets import preset_layers
from pipeline.config import PipelineConfig, upgrade_stored_config
from pipeline.configlib import deep_merge, doc, from_dict, load_yaml, parse_assignment, to_dict
from pipeline.data.sources import validate_dataset_source
from pipeline.rundir.layout import RunLayout, atomic_write_text
from pipeline.registry import STAGES
from slurm.resources import SlurmResources


@dataclass
class SlurmConfig:
    """SLURM resources per stage: the one place they are declared."""
    sft: SlurmResources = doc("SFT job.", factory=lambda: SlurmResources(time="04:00:00"))
    pairs: SlurmResources = doc("Each pairs shard (array task) and the merge job.", factory=SlurmResources)
    dpo: SlurmResources = doc("Each DPO array task (one sweep arm).", factory=lambda: SlurmResources(time="04:00:00"))
    eval: SlurmResources = doc("Evaluation job.", factory=SlurmResources)


@dataclass
class ExperimentConfig(PipelineConfig):
    slurm: SlurmConfig = doc("SLURM resources per stage.", factory=SlurmConfig)

    def __post_init__(self):
        super().__post_init__()
        # single-process stages (sampling) scale out as array tasks instead
        for stage in STAGES:
            resources = getattr(self.slurm, stage.resources)
            if not stage.multi_process and stage.needs_gpu and (resources.nodes != 1 or resources.gpus_per_node > 1):
                raise ValueError(f"slurm.{stage.resources}: one node and at most one GPU per job (got "
                                 f"nodes={resources.nodes}, gpus_per_node={resources.gpus_per_node}); "
                                 f"{stage.scale_hint}")


def stage_resources(cfg: ExperimentConfig, stage) -> SlurmResources:
    """The resources of one stage's jobs: its section of `cfg.slurm` (no GPU for a stage that needs none)."""
    resources = getattr(cfg.slurm, stage.resources)
    return resources if stage.needs_gpu else dataclasses.replace(resources, nodes=1, gpus_per_node=0)


def resolve_config(preset: str | None, config_file: str | None = None, sets: list[str] = (),
                   base: dict | None = None) -> ExperimentConfig:
    """Build and validate the experiment config; every error names the field and the fix."""
    layers = deep_merge({}, base or {})
    if preset is not None:
        layers = deep_merge(layers, preset_layers(preset))
    if config_file:
        layers = deep_merge(layers, load_yaml(config_file))
    for assignment in sets:
        layers = deep_merge(layers, parse_assignment(assignment))
    cfg = from_dict(ExperimentConfig, layers, where="")
    validate_dataset_source(cfg.data)
    return cfg


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: ExperimentConfig, layout: RunLayout) -> None:
    atomic_write_text(layout.config, config_to_yaml(cfg))


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise FileNotFoundError(f"{layout.config} not found: is {run_dir} a run directory made by `launch.py run`?")
    return from_dict(ExperimentConfig, upgrade_stored_config(yaml.safe_load(layout.config.read_text())), where="")


def config_differences(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Dotted keys whose values differ (for refusing to silently change a run's config)."""
    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict) and value:
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
