"""Where a run's data comes from, checked before any job is submitted (at prefetch: whether a local
dataset's files open as their format with the text column and at least one review), and how a local
file/directory or a prefetched hub snapshot is opened as one split.

Shared by the loaders (pipeline.data.reviews, pipeline.data.preferences) and prefetch (pipeline.data.hub),
so none of them imports another. Import-light: `datasets` is imported only when something is loaded.
"""
from __future__ import annotations

import json
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


def open_dataset_split(name: str, field: str, split: str, split_fields: str, snapshot: str | None = None):
    """One split of a dataset named by a config field (`field`: pairs.dataset, sft.dataset) as a
    `datasets.Dataset`: a local file/directory, or a hub id read from `snapshot` (at launch) or from the
    job's prefetched snapshot (pipeline.data.hub.resolve); a split it lacks is refused, naming its splits."""
    path = Path(name).expanduser()
    if path.exists():
        return load_local_split(path, split, field, split_fields)
    if snapshot is None:
        from pipeline.data.hub import resolve

        snapshot = resolve(name, "dataset")
    if snapshot == name:  # not in a job and not prefetched: datasets downloads it
        import datasets

        return datasets.load_dataset(name, split=split)
    _check_hub_split(snapshot, split, split_fields, name, field)
    return load_snapshot_split(snapshot, name, split, field, split_fields)


def _check_hub_split(snapshot: str, split: str, split_fields: str, dataset_id: str, field: str) -> None:
    import datasets

    try:
        names = datasets.get_dataset_split_names(snapshot)
    except Exception:  # noqa: BLE001 - the loader then reports its own error
        return
    if split not in names:
        raise ValueError(f"{split_fields}: {field}={dataset_id} has no split {split!r}; its splits: "
                         f"{', '.join(names)}")


def split_files(path: Path, split: str) -> list[Path]:
    """The files of a local review dataset that hold `split`: a single file or a flat directory has one
    split; in a directory, files named after splits (train.jsonl, test-00000.parquet) are used as such."""
    files = local_files(path, "data.dataset")
    named = {p.stem.split("-")[0]: p for p in files}
    return [named[split]] if split in named else files


def _read_column(path: Path, field: str):
    """(the `field` column of one local file as a pyarrow array, or None when the file lacks it; its columns)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    if path.suffix == ".parquet":
        names = pyarrow.parquet.read_schema(path).names
        return (pyarrow.parquet.read_table(path, columns=[field]).column(field) if field in names else None), names
    if path.suffix == ".csv":
        table = pyarrow.csv.read_csv(path)
    else:
        try:
            table = pyarrow.json.read_json(path)  # JSON lines
        except pa.ArrowInvalid:
            if not path.read_text().lstrip().startswith("["):
                raise
            rows = json.loads(path.read_text())  # one JSON array of records
            if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
                raise ValueError("neither JSON lines nor a JSON array of records") from None
            table = pa.Table.from_pylist(rows)
    return (table.column(field) if field in table.column_names else None), table.column_names


def check_local_dataset(cfg: DataConfig) -> None:
    """Open a local dataset's files for the SFT and prompt splits, as the jobs will, and refuse (before
    anything is submitted) a file that does not read as its format, lacks the `data.text_field`
    column (or holds no text in it), or holds no review at all. Hub ids and 'tiny' pass untouched."""
    import pyarrow as pa

    path = Path(cfg.dataset).expanduser()
    if cfg.dataset == "tiny" or not path.exists():
        return
    for split in dict.fromkeys((cfg.train_split, cfg.prompt_split)):
        reviews = 0
        files = split_files(path, split)
        for file in files:
            if file.stat().st_size == 0:
                continue
            try:
                column, names = _read_column(file, cfg.text_field)
            except (pa.ArrowException, ValueError, OSError, UnicodeDecodeError) as exc:
                kind = LOCAL_FORMATS[file.suffix]
                reason = " ".join(str(exc).split())[:200]
                raise ValueError(f"data.dataset: {file} does not read as {kind} ({reason}); give a valid "
                                 f"{file.suffix} file") from None
            if column is None:
                raise ValueError(f"data.text_field: column {cfg.text_field!r} not in {file} (columns: "
                                 f"{', '.join(names) or 'none'}); set data.text_field to the review column")
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                    or pa.types.is_null(column.type)):
                raise ValueError(f"data.text_field: column {cfg.text_field!r} of {file} holds {column.type}, "
                                 "not text; set data.text_field to the review column")
            reviews += sum(1 for text in column.to_pylist() if text and text.strip())
        if reviews == 0:
            raise ValueError(f"data.dataset: {', '.join(map(str, files))} hold(s) no review in column "
                             f"{cfg.text_field!r} for split {split!r}; give a dataset with at least one row")
