"""Where a run's data comes from, checked before any job is submitted, and how a local file/directory
or a prefetched hub snapshot is opened as one split.

Shared by the loaders (pipeline.data.reviews, pipeline.data.preferences) and prefetch (pipeline.data.hub),
so none of them imports another. Import-light: `datasets` is imported only when something is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import DataConfig

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
FORMATS_TEXT = "/".join(LOCAL_FORMATS)


def looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in LOCAL_FORMATS


def check_local_exists(name: str, field: str, example: str) -> None:
    """A name that looks like a path must exist (else it would be sent to the hub as an id)."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise ValueError(f"{field}: {name} does not exist; give an existing {FORMATS_TEXT} file or directory, "
                         f"or a hub id such as {example}")


def validate_dataset_source(cfg: DataConfig) -> None:
    """Fail before any job is submitted if a local dataset path is missing."""
    if cfg.dataset != "tiny" and looks_local(cfg.dataset) and not Path(cfg.dataset).expanduser().exists():
        raise ValueError(f"data.dataset: {cfg.dataset} does not exist; give an existing .parquet/.jsonl/.csv "
                         "file or directory, a hub id such as stanfordnlp/imdb, or 'tiny'")


def local_files(path: Path, field: str) -> list[Path]:
    """The data files of a local file or directory (a directory: every file of a known format in it)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS)
    if not files:
        raise ValueError(f"{field}: {path} holds no {FORMATS_TEXT} files")
    if LOCAL_FORMATS.get(files[0].suffix) is None:
        raise ValueError(f"{field}: {files[0].suffix!r} is not one of {', '.join(LOCAL_FORMATS)}")
    return files


def local_splits(path: Path, field: str) -> dict[str, list[Path]]:
    """The named splits of a local source: a single file (or a directory holding one) is 'train'; else
    each file is the split its name starts with (train.jsonl, test-00000-of-00001.parquet)."""
    files = local_files(path, field)
    if len(files) == 1:
        return {"train": files}
    splits: dict[str, list[Path]] = {}
    for p in files:
        splits.setdefault(p.stem.split("-")[0], []).append(p)
    return splits


def load_local_files(files: list[Path]):
    """One `datasets.Dataset` of local files of one format."""
    import datasets

    return datasets.load_dataset(LOCAL_FORMATS[files[0].suffix], data_files=[str(p) for p in files], split="train")


def load_local_split(path: Path, split: str, field: str, split_fields: str):
    """One named split of a local source; a split it lacks is refused, naming the splits it has."""
    splits = local_splits(path, field)
    if split not in splits:
        raise ValueError(f"{split_fields}: {field}={path} has no split {split!r}; its splits: "
                         f"{', '.join(sorted(splits))}")
    return load_local_files(splits[split])


def load_snapshot_split(snapshot: str, dataset_id: str, split: str, field: str, split_fields: str):
    """One split of a prefetched hub dataset: the repository's own card decides which files form
    which split (stanfordnlp/imdb: plain_text/{split}-*.parquet), exactly as on the hub."""
    import datasets

    try:
        # HF_DATASETS_CACHE is read at call time: the job sets it (pipeline.data.hub.offline_environment)
        return datasets.load_dataset(snapshot, split=split, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise ValueError(f"{field}: {dataset_id} has no split {split!r} ({error}); set {split_fields} to one "
                         "of its splits") from error
