"""pairs.source=dataset on the project's real SLURM cluster: a local JSONL file with other column names,
the tiny model, one DPO arm; the pairs array is one task; a bad column mapping submits nothing."""
from __future__ import annotations

import json
import time

import pytest

from conftest import launch
from test_preference_dataset import CHEAP, COLUMNS, frontier, write_prefs
from test_slurm_pipeline import (BROKEN, PIPELINE_TIMEOUT_S, POLL_S, cancel_and_drain, failure_logs, queued_jobs_named,
                                 status_rows, submissions, unique_name)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_dataset_pairs_run_on_slurm(slurm_cluster, tmp_path):
    data = write_prefs(tmp_path / "prefs.jsonl")
    run_dir, name = tmp_path / "run", unique_name("tpd")
    base = ("run", "--preset", "tiny", "--executor", "slurm", "--set", f"name={name}", "--set", "pairs.source=dataset",
            "--set", f"pairs.dataset={data}")
    refused = launch(*base, "--run-dir", str(tmp_path / "bad"), "--set", "pairs.columns.prompt=question",
                     check=False, timeout=180)
    assert refused.returncode != 0 and "lacks chosen (column 'chosen')" in refused.stderr
    assert not (tmp_path / "bad").exists() and not queued_jobs_named(name)
    try:
        launch(*base, "--run-dir", str(run_dir), *COLUMNS, *CHEAP, timeout=180)
        deadline = time.time() + PIPELINE_TIMEOUT_S
        while True:
            rows = status_rows(run_dir)
            if any(r["state"] in BROKEN for r in rows):
                pytest.fail(f"a job failed: {rows}\n{failure_logs(run_dir, rows)}")
            if (run_dir / "eval" / "frontier.csv").is_file() and all(r["done"] for r in rows):
                break
            assert time.time() < deadline, f"not finished in {PIPELINE_TIMEOUT_S}s: {rows}"
            time.sleep(POLL_S)
    finally:
        cancel_and_drain(run_dir, name)
    pairs = [s for s in submissions(run_dir) if s["stage"] == "pairs"]
    assert len(pairs) == 1 and list(pairs[0]["tasks"]) == ["0"]  # one converting task, no sampling shards
    metrics = json.loads((run_dir / "pairs" / "DONE.json").read_text())["metrics"]
    assert (metrics["pairs"], metrics["dropped_empty"], metrics["dropped_identical"], metrics["dropped_too_long"]) == \
        (50, 1, 1, 1)
    assert [r["policy"] for r in frontier(run_dir)][0] == "sft" and len(frontier(run_dir)) >= 2
    assert [r["summary"] for r in rows if r["stage"] == "pairs_merge"][0].startswith("pairs: 50 pairs from 63 rows")
