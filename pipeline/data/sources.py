"""Where a run's data comes from, checked before any job is submitted: the local file formats the
loaders read, whether a local dataset path names something that exists, and (at prefetch) whether
its files open as their format with the text column and at least one review.

Shared by the loaders (pipeline.data.reviews) and prefetch (pipeline.data.hub), so neither imports the other.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import DataConfig

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def validate_dataset_source(cfg: DataConfig) -> None:
    """Fail before any job is submitted if a local dataset path is missing."""
    looks_local = cfg.dataset.startswith(("/", "./", "../", "~")) or Path(cfg.dataset).suffix in LOCAL_FORMATS
    if cfg.dataset != "tiny" and looks_local and not Path(cfg.dataset).expanduser().exists():
        raise ValueError(f"data.dataset: {cfg.dataset} does not exist; give an existing .parquet/.jsonl/.csv "
                         "file or directory, a hub id such as stanfordnlp/imdb, or 'tiny'")


def local_files(path: Path, split: str) -> list[Path]:
    """The files of a local dataset that hold `split`: a single file or a flat directory has one split;
    in a directory, files named after splits (train.jsonl, test-00000.parquet) are used as such."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS)
    if not files:
        raise ValueError(f"data.dataset: {path} holds no .parquet/.jsonl/.csv files")
    if files[0].suffix not in LOCAL_FORMATS:
        raise ValueError(f"data.dataset: {path.suffix!r} is not one of {', '.join(LOCAL_FORMATS)}")
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
        files = local_files(path, split)
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
