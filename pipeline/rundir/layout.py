"""The run directory's named disk layout and its atomic file helpers.

Stages hand off only through these paths. A stage (or shard, or checkpoint) is done when its
`DONE.json` exists; every writer writes to a temporary sibling and renames, so a reader never sees
half a file and a killed job never leaves something that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

DONE = "DONE.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write via a temp file + rename; `durable` also fsyncs (skip it for frequent progress files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", durable=durable)


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place (the old one, if any, is removed first)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata
    versions = {}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "submitit",
                 "deepspeed", "wandb", "vaderSentiment"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass(frozen=True)
class RunLayout:
    """Every path a stage reads or writes, relative to one run directory."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    # run level
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def hub_revisions(self) -> Path:
        """The commit sha of every hub model/dataset the run uses (written by `launch.py prefetch`/`run`)."""
        return self.root / "hub_revisions.json"

    @property
    def jobs(self) -> Path:
        """Scheduler state: submitit folders, job-id records, logs."""
        return self.root / "jobs"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's kernel cache, shared by every stage, array task and requeue of the run
        (the default, /tmp on the node, is lost when a requeued job lands on another node)."""
        return self.root / "cache" / "torch_compile"

    # data shared by the stages
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base_model(self) -> Path:
        """Starting weights + tokenizer for SFT (tiny: built from config; real: the hub model id is used)."""
        return self.data / "base_model"

    @property
    def pair_prompts(self) -> Path:
        return self.data / "pair_prompts.jsonl"

    @property
    def eval_prompts(self) -> Path:
        return self.data / "eval_prompts.jsonl"

    @property
    def eval_pairs(self) -> Path:
        """pairs.source=dataset: the held-out pairs of the eval prompts (preference accuracy)."""
        return self.data / "eval_pairs.jsonl"

    # stages
    def stage_dir(self, directory: str, task=None) -> Path:
        """`RUN/<directory>`, or the task's own subdirectory when it has one (a DPO arm: `dpo/beta-0.1`).

        Which directory each stage uses is declared in `pipeline.registry`.
        """
        sub = getattr(task, "dirname", None)
        return self.root / directory / sub if sub else self.root / directory

    def done_path(self, directory: str, task=None) -> Path:
        return self.stage_dir(directory, task) / DONE

    def is_done(self, directory: str, task=None) -> bool:
        return self.done_path(directory, task).is_file()

    def progress_path(self, directory: str, task=None) -> Path:
        return self.stage_dir(directory, task) / "progress.json"

    def metrics_log(self, directory: str, task=None) -> Path:
        """The trainer's logged metrics, one JSON line per log record (see `pipeline.rundir.metrics_log`)."""
        return self.stage_dir(directory, task) / "metrics.jsonl"

    def checkpoints_dir(self, directory: str, task=None) -> Path:
        return self.stage_dir(directory, task) / "checkpoints"

    def final_model(self, directory: str, task=None) -> Path:
        return self.stage_dir(directory, task) / "final"

    @property
    def sft_model(self) -> Path:
        return self.final_model("sft")

    def pairs_shard(self, shard: int) -> Path:
        return self.stage_dir("pairs") / "shards" / f"shard-{shard:05d}.jsonl"

    @property
    def pairs_file(self) -> Path:
        return self.stage_dir("pairs") / "pairs.jsonl"

    @property
    def generations_file(self) -> Path:
        return self.stage_dir("pairs") / "generations.jsonl"

    def eval_result(self, policy_id: str) -> Path:
        return self.stage_dir("eval") / "policies" / f"{policy_id}.json"

    @property
    def frontier_csv(self) -> Path:
        return self.stage_dir("eval") / "frontier.csv"

    @property
    def frontier_seeds_csv(self) -> Path:
        """Means over seeds per (method, strength, step), when the sweep has several seeds."""
        return self.stage_dir("eval") / "frontier_seeds.csv"

    @property
    def frontier_png(self) -> Path:
        return self.stage_dir("eval") / "frontier.png"

    @property
    def report(self) -> Path:
        return self.stage_dir("eval") / "report.md"


# The environment a stage ran in, as far as it decides what the stage could read and use.
RECORDED_ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                        "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "WORLD_SIZE")


def write_manifest(path: Path, *, config: dict, inputs: dict, metrics: dict, started: float,
                   extra: dict | None = None) -> dict:
    """Write the completion marker of a stage/shard last, atomically."""
    manifest = {
        "config": config,
        "inputs": inputs,
        "metrics": metrics,
        "versions": package_versions(),
        "git_sha": git_sha(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_time_s": round(time.time() - started, 2),
        "host": os.uname().nodename,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "environment": {name: os.environ[name] for name in RECORDED_ENVIRONMENT if name in os.environ},
        **(extra or {}),
    }
    atomic_write_json(path, manifest)
    return manifest
