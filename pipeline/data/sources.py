"""Where a run's data comes from, checked before any job is submitted: the local file formats the
loaders read, and whether a local dataset path names something that exists.

Shared by the loaders (pipeline.data.reviews) and prefetch (pipeline.data.hub), so neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def validate_dataset_source(cfg: DataConfig) -> None:
    """Fail before any job is submitted if a local dataset path is missing."""
    looks_local = cfg.dataset.startswith(("/", "./", "../", "~")) or Path(cfg.dataset).suffix in LOCAL_FORMATS
    if cfg.dataset != "tiny" and looks_local and not Path(cfg.dataset).expanduser().exists():
        raise ValueError(f"data.dataset: {cfg.dataset} does not exist; give an existing .parquet/.jsonl/.csv "
                         "file or directory, a hub id such as stanfordnlp/imdb, or 'tiny'")
