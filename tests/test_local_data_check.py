"""A local dataset (data.dataset = a .parquet/.jsonl/.csv file or a directory of them) is opened and checked
before anything runs or is submitted, as hub datasets are at prefetch: a file that does not read as its
format, lacks the text column, or holds no review is refused with the field and the fix, leaving no run
directory (and, on SLURM, no job)."""
import pyarrow as pa
import pyarrow.parquet
import pytest

from conftest import launch
from test_slurm_pipeline import queued_jobs_named, unique_name


def bad_files(root):
    (root / "nocol.jsonl").write_text('{"review": "a great film"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "header_only.csv").write_text("text,label\n")
    (root / "blank_texts.jsonl").write_text('{"text": "  "}\n{"text": null}\n')
    (root / "garbage.jsonl").write_text("this is not json\n")
    (root / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "numbers.jsonl").write_text('{"text": 5}\n')
    (root / "notes.txt").write_text("a great film\n")
    splits = root / "splits"
    splits.mkdir()
    (splits / "train.jsonl").write_text('{"text": "a great film"}\n')
    pyarrow.parquet.write_table(pa.table({"text": pa.array([], pa.string())}), splits / "test.parquet")
    return root


CASES = [
    ("nocol.jsonl", "data.text_field: column 'text' not in {d}/nocol.jsonl (columns: review); set data.text_field"),
    ("empty.jsonl", "data.dataset: {d}/empty.jsonl hold(s) no review in column 'text' for split 'train'"),
    ("header_only.csv", "data.dataset: {d}/header_only.csv hold(s) no review in column 'text'"),
    ("blank_texts.jsonl", "data.dataset: {d}/blank_texts.jsonl hold(s) no review in column 'text' for split "
                          "'train'; give a dataset with at least one row"),
    ("garbage.jsonl", "data.dataset: {d}/garbage.jsonl does not read as json (JSON parse error"),
    ("broken.parquet", "data.dataset: {d}/broken.parquet does not read as parquet ("),
    ("numbers.jsonl", "data.text_field: column 'text' of {d}/numbers.jsonl holds int64, not text"),
    ("notes.txt", "data.dataset: '.txt' is not one of .parquet, .jsonl, .json, .csv"),
    ("splits", "data.dataset: {d}/splits/test.parquet hold(s) no review in column 'text' for split 'test'"),
]


@pytest.mark.parametrize("name, expected", CASES)
def test_bad_local_dataset_is_refused_before_anything_runs(tmp_path, name, expected):
    data = bad_files(tmp_path)
    run_dir = tmp_path / "run"
    for command in (["run", "--executor", "local"], ["prefetch"]) if name == "nocol.jsonl" else (["run"],):
        proc = launch(*command, "--preset", "tiny", "--run-dir", str(run_dir),
                      "--set", f"data.dataset={data / name}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"error: {expected.format(d=data)}" in proc.stderr, proc.stderr
        assert not run_dir.exists()


def test_good_local_datasets_pass_the_check(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data.sources import check_local_dataset

    (tmp_path / "ok.jsonl").write_text('{"text": "a great film"}\n{"text": "dull"}\n')
    (tmp_path / "ok.json").write_text('[{"text": "a great film"}]')
    (tmp_path / "ok.csv").write_text('text,label\n"a great, long film",1\n')
    pyarrow.parquet.write_table(pa.table({"review": ["fine"], "label": [1]}), tmp_path / "ok.parquet")
    for name in ("ok.jsonl", "ok.json", "ok.csv"):
        check_local_dataset(DataConfig(dataset=str(tmp_path / name)))
    check_local_dataset(DataConfig(dataset=str(tmp_path / "ok.parquet"), text_field="review"))
    with pytest.raises(ValueError, match=r"column 'text' not in .*ok.parquet \(columns: review, label\)"):
        check_local_dataset(DataConfig(dataset=str(tmp_path / "ok.parquet")))


@pytest.mark.slurm
def test_bad_local_dataset_submits_no_slurm_job(slurm_cluster, tmp_path):
    data = bad_files(tmp_path)
    name = unique_name("bad")
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm", "--set", f"name={name}",
                  "--set", f"data.dataset={data / 'nocol.jsonl'}", check=False, timeout=300)
    assert proc.returncode == 2 and "data.text_field: column 'text' not in" in proc.stderr, proc.stderr
    assert "submitted job" not in proc.stdout and not queued_jobs_named(name)
    assert not run_dir.exists()
