"""The whole pipeline by hub ids, as a cluster user runs it: prefetch with the hub up, then every
stage with the hub down, locally and on the project's SLURM cluster.

The fixture hub on 127.0.0.1 (tests/hub_fixture.py) serves a tiny GPT-2, a POSITIVE/NEGATIVE
sentiment classifier and an IMDb-shaped parquet dataset under hub ids; none of the tiny shortcuts
(generated corpus, model built from a config, VADER) is used.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import launch
from hub_fixture import hub_repos, hub_server  # noqa: F401 - fixtures
from hub_fixture_data import CLASSIFIER_ID, DATASET_ID, MODEL_ID
from test_slurm_pipeline import (ACTIVE, BROKEN, cancel_and_drain, failure_logs, queued_jobs_named, status_rows,
                                 unique_name)

pytestmark = pytest.mark.slow
STAGE_DIRS = ["sft", "pairs", "dpo/beta-0.1", "eval"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def hub_env(hub_server, monkeypatch):
    """The fixture hub up, and no hub settings of the calling shell."""
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "SLURM_DPO_HUB_REVISIONS", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return hub_server


def hub_run_config(path: Path, name: str) -> Path:
    """A small run over hub ids only: tiny preset sizes, real loaders."""
    config = {
        "name": name,
        "model": {"name": MODEL_ID, "dtype": "float32"},
        "data": {"dataset": DATASET_ID},
        "reward": {"kind": "classifier", "model": CLASSIFIER_ID, "max_length": 64, "batch_size": 64},
        "sft": {"epochs": 1.0, "max_length": 64},
        "pairs": {"num_prompts": 40, "num_shards": 2, "max_new_tokens": 24},
        "dpo": {"betas": [0.1], "max_length": 64, "save_steps": 5},
        "eval": {"num_prompts": 12, "samples_per_prompt": 2, "max_new_tokens": 24},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def check_hub_run(run_dir: Path, server) -> None:
    """Revisions recorded, every stage ran offline, the frontier scored by the classifier."""
    revisions = json.loads((run_dir / "hub_revisions.json").read_text())
    assert {field: (e["repo_id"], e["revision"]) for field, e in revisions.items()} == {
        "model.name": (MODEL_ID, server.sha("model", MODEL_ID)),
        "data.dataset": (DATASET_ID, server.sha("dataset", DATASET_ID)),
        "reward.model": (CLASSIFIER_ID, server.sha("model", CLASSIFIER_ID))}
    for stage in STAGE_DIRS:
        manifest = json.loads((run_dir / stage / "DONE.json").read_text())
        assert {k: manifest["environment"].get(k) for k in OFFLINE} == OFFLINE, stage
        assert manifest["environment"]["HF_HUB_CACHE"] == str(run_dir / "cache" / "huggingface")
    rows = (run_dir / "eval" / "frontier.csv").read_text().splitlines()
    assert rows[0] == "policy,beta,step,reward,kl,n,reward_stderr,kl_stderr,method,strength,seed,kl_analytic"
    assert len(rows) == 1 + 1 + 3  # SFT + steps 5, 10, 15
    # the rewards are the classifier's: score the eval examples again with the prefetched classifier
    from pipeline.config import RewardConfig
    from pipeline.models.reward import make_reward

    snapshot = run_dir / "cache" / "huggingface" / f"models--{CLASSIFIER_ID.replace('/', '--')}" / "snapshots" / \
        revisions["reward.model"]["revision"]
    classifier = make_reward(RewardConfig(kind="classifier", model=str(snapshot), max_length=64))
    examples = json.loads((run_dir / "eval" / "policies" / "sft.json").read_text())["examples"]
    assert examples
    rescored = classifier([e["prompt"] + e["completion"] for e in examples])
    assert max(abs(a - e["reward"]) for a, e in zip(rescored, examples)) < 1e-4
    sft = json.loads((run_dir / "sft" / "DONE.json").read_text())
    assert sft["inputs"]["dataset"] == DATASET_ID and sft["inputs"]["train_examples"] == 240


def test_pipeline_by_hub_ids_runs_offline_after_prefetch_locally(hub_env, tmp_path):
    server = hub_env
    config = hub_run_config(tmp_path / "hub.yaml", "hubloc")
    run_dir = tmp_path / "run"
    out = launch("prefetch", "--preset", "tiny", "--config", str(config), "--run-dir", str(run_dir)).stdout
    assert "prefetched 3 hub reference(s)" in out
    server.stop()
    launch("run", "--preset", "tiny", "--config", str(config), "--run-dir", str(run_dir), "--executor", "local",
           timeout=1500)
    check_hub_run(run_dir, server)


@pytest.mark.slurm
def test_pipeline_by_hub_ids_runs_offline_after_prefetch_on_slurm(hub_env, slurm_cluster, tmp_path):
    server = hub_env
    name = unique_name("hub")
    config = hub_run_config(tmp_path / "hub.yaml", name)
    run_dir = tmp_path / "run"
    launch("prefetch", "--preset", "tiny", "--config", str(config), "--run-dir", str(run_dir))
    server.stop()
    try:
        launch("run", "--preset", "tiny", "--config", str(config), "--run-dir", str(run_dir), "--executor", "slurm",
               timeout=300)
        deadline = time.time() + 1500
        while True:
            rows = status_rows(run_dir)
            broken = [r for r in rows if r["state"] in BROKEN]
            assert not broken, f"{broken}\n{failure_logs(run_dir, rows)}"
            if all(r["done"] and r["state"] not in ACTIVE for r in rows):
                break
            assert time.time() < deadline, f"not finished: {[(r['stage'], r['task'], r['state']) for r in rows]}"
            time.sleep(3)
        check_hub_run(run_dir, server)
        manifest = json.loads((run_dir / "sft" / "DONE.json").read_text())
        assert manifest["slurm_job_id"]  # it ran as a SLURM job
    finally:
        cancel_and_drain(run_dir, name)


@pytest.mark.slurm
def test_run_refuses_before_submitting_when_the_hub_is_unreachable(hub_env, slurm_cluster, tmp_path):
    hub_env.stop()  # nothing prefetched and no hub
    name = unique_name("hubdown")
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--config", str(hub_run_config(tmp_path / "hub.yaml", name)),
                  "--run-dir", str(run_dir), "--executor", "slurm", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "hub prefetch failed" in proc.stderr and "model.name" in proc.stderr
    assert "could not be reached" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
    assert queued_jobs_named(name) == {}
