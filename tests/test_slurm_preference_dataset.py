"""pairs.source=dataset on the project's real SLURM cluster: the tiny-chat preset (a chat model, a
conversational hub dataset, a one-output reward model from the test hub) with LoRA arms, prefetched with
the hub up and run with it stopped; the pairs array is one task. A bad column mapping submits nothing."""
from __future__ import annotations

import json
import time

import pytest

from conftest import launch
from hub_fixture import hub_repos, hub_server  # noqa: F401 - fixtures
from test_hub import clean_env  # noqa: F401 - fixture
from test_preference_dataset import frontier, write_prefs
from test_slurm_pipeline import (BROKEN, PIPELINE_TIMEOUT_S, POLL_S, cancel_and_drain, failure_logs, queued_jobs_named,
                                 status_rows, submissions, unique_name)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_chat_dataset_runs_on_slurm_with_the_hub_stopped(slurm_cluster, tmp_path, clean_env, hub_server):
    data = write_prefs(tmp_path / "prefs.jsonl")
    run_dir, name = tmp_path / "run", unique_name("tpd")
    refused = launch("run", "--preset", "tiny", "--executor", "slurm", "--set", f"name={name}", "--set",
                     "pairs.source=dataset", "--set", f"pairs.dataset={data}", "--run-dir", str(tmp_path / "bad"),
                     "--set", "pairs.columns.prompt=question", check=False, timeout=180)
    assert refused.returncode != 0 and "lacks chosen (column 'chosen')" in refused.stderr
    assert not (tmp_path / "bad").exists() and not queued_jobs_named(name)
    # LoRA arms here (the local tiny-chat test runs full and LoRA ones): one adapter per arm of the array
    sets = ("--set", f"name={name}", "--set", "eval.samples_per_prompt=2", "--set", "num_threads=1",
            "--set", "dpo.lora.enabled=true")
    launch("prefetch", "--preset", "tiny-chat", "--run-dir", str(run_dir), *sets, timeout=180)
    hub_server.stop()
    try:
        launch("run", "--preset", "tiny-chat", "--executor", "slurm", "--run-dir", str(run_dir), *sets, timeout=180)
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
    assert (metrics["pairs"], metrics["conversational"], metrics["implicit_prompt"]) == (120, True, False)
    assert [r["policy"] for r in frontier(run_dir)] == ["sft", "dpo", "dpo"]
    for beta in ("0.1", "1.0"):
        final = run_dir / "dpo" / f"beta-{beta}" / "final"
        assert (final / "adapter_model.safetensors").is_file() and not list(final.glob("model*.safetensors"))
    summary = [r["summary"] for r in rows if r["stage"] == "pairs_merge"][0]
    assert summary.startswith("pairs: 120 pairs from 120 rows of slurm-dpo/tiny-chat-prefs [train_prefs]")
    sft = json.loads((run_dir / "eval" / "policies" / "sft.json").read_text())
    assert sft["n"] == 16 * 2 and any(not 0.0 <= e["reward"] <= 1.0 for e in sft["examples"])  # reward model logits
