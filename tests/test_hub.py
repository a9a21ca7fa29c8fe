"""The real (non-tiny) loading path: prefetch on the login node, then jobs that read the cache offline.

Everything runs against the fixture hub on 127.0.0.1 (tests/hub_fixture.py); any connection to
another address fails the test (`no_outside_network`).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hub_fixture import HubServer, hub_repos, hub_server  # noqa: F401 - fixtures (also importable from conftest)
from hub_fixture_data import CLASSIFIER_ID, DATASET_ID, MODEL_ID, SPLIT_ROWS
from pipeline.data import hub
from pipeline.config import DataConfig, HubConfig, ModelConfig, PipelineConfig, RewardConfig

REPO = Path(__file__).resolve().parents[1]
POSITIVE = "I loved this movie. The acting was wonderful and the story was brilliant."
NEGATIVE = "I hated this film. The plot was awful and boring. A total waste of time."


@pytest.fixture(autouse=True)
def no_outside_network(monkeypatch):
    """Only 127.0.0.1 (the fixture hub) and local sockets may be connected to."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise OSError(f"test tried to reach {address}: only the fixture hub on 127.0.0.1 is allowed")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def forbid_all_network(monkeypatch):
    """From here on no TCP connection at all, not even to 127.0.0.1: what a job may do offline."""
    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"offline code tried to connect to {address}")
        return real_connect(sock, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def clean_env(monkeypatch):
    """No job or user hub settings leak in from the calling shell."""
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", hub.REVISIONS_ENV, "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def hub_config(cache: Path, model=MODEL_ID, dataset=DATASET_ID, reward=CLASSIFIER_ID, kind="classifier"):
    return PipelineConfig(model=ModelConfig(name=model, dtype="float32", n_positions=1024), data=DataConfig(dataset=dataset),
                          reward=RewardConfig(kind=kind, model=reward, max_length=64, batch_size=8),
                          hub=HubConfig(cache_dir=str(cache)), device="cpu")


def enter_job(monkeypatch, cfg, run_root):
    """What a job process sees: the offline environment (HF_* read at call time by pipeline.data.hub)."""
    env = hub.offline_environment(cfg, run_root)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_references_and_cache_dir(tmp_path, clean_env, hub_repos):
    cfg = hub_config(tmp_path / "c")
    assert hub.references(cfg) == [hub.HubReference("model.name", MODEL_ID, "model"),
                                   hub.HubReference("data.dataset", DATASET_ID, "dataset"),
                                   hub.HubReference("reward.model", CLASSIFIER_ID, "model")]
    local = hub_config(tmp_path / "c", model=str(hub_repos.dirs[("model", MODEL_ID)]), kind="vader",
                       dataset=str(hub_repos.dirs[("dataset", DATASET_ID)] / "plain_text"))
    assert hub.references(local) == []
    assert hub.references(hub_config(tmp_path, model="tiny", dataset="tiny", kind="vader")) == []
    with pytest.raises(ValueError, match="model.name: /no/such/model is not an existing directory"):
        hub.references(hub_config(tmp_path, model="/no/such/model"))

    run = tmp_path / "run"
    assert hub.cache_dir(cfg, run) == tmp_path / "c"
    assert hub.cache_dir(hub_config("rel/cache"), run) == (run / "rel" / "cache").resolve()
    no_setting = PipelineConfig()
    assert hub.cache_dir(no_setting, run) == run.resolve() / "cache" / "huggingface"
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir(no_setting, run) == tmp_path / "hf" / "hub"
    env = hub.offline_environment(no_setting, run)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HUB_CACHE"] == str(tmp_path / "hf" / "hub")
    assert env[hub.REVISIONS_ENV] == str(run.resolve() / "hub_revisions.json")


def test_prefetch_then_jobs_load_offline(tmp_path, clean_env, hub_server):
    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = hub_config(cache)
    logged = []
    result = hub.prefetch(cfg, run, hub.revisions_file(run), log=logged.append)

    # (a) one pinned sha per reference, recorded atomically, files in the chosen cache
    recorded = json.loads(hub.revisions_file(run).read_text())
    assert set(recorded) == {"model.name", "data.dataset", "reward.model"}
    for field, repo_type, repo_id in (("model.name", "model", MODEL_ID), ("data.dataset", "dataset", DATASET_ID),
                                      ("reward.model", "model", CLASSIFIER_ID)):
        assert recorded[field]["repo_id"] == repo_id and recorded[field]["repo_type"] == repo_type
        assert recorded[field]["revision"] == hub_server.sha(repo_type, repo_id)
        assert Path(result[field]["path"]).is_relative_to(cache)
    model_files = recorded["model.name"]["files"]
    assert "model.safetensors" in model_files and "tokenizer.json" in model_files and "config.json" in model_files
    assert not any(f.endswith((".bin", ".h5", ".onnx")) or "/" in f for f in model_files)  # safetensors only
    snapshot = Path(result["model.name"]["path"])
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(model_files)
    assert not any(p.endswith("pytorch_model.bin") for _, p in hub_server.requests)
    assert "plain_text/train-00000-of-00001.parquet" in recorded["data.dataset"]["files"]
    assert hub_server.unhandled == []
    assert list(tmp_path.glob("run/.hub_revisions.json.*")) == []  # no temp file left behind

    # (b) the hub goes away; a job with the offline environment still loads everything
    hub_server.stop()
    forbid_all_network(clean_env)
    enter_job(clean_env, cfg, run)
    clean_env.chdir(tmp_path)  # a relative hub id must not be mistaken for a directory
    from pipeline.data.reviews import load_reviews

    train = load_reviews(cfg.data, "train", seed=0)
    test = load_reviews(cfg.data, "test", seed=0)
    assert (len(train), len(test)) == (SPLIT_ROWS["train"], SPLIT_ROWS["test"])
    assert any("<br /><br />" in text for text in train)  # raw IMDb text; clean_review strips it later
    assert Path(os.environ["HF_DATASETS_CACHE"]).is_dir()  # Arrow copies in the run, not the hub cache

    import torch

    from pipeline.models.policy import load_model, load_tokenizer
    from pipeline.models.reward import make_reward

    tokenizer = load_tokenizer(MODEL_ID)
    model = load_model(MODEL_ID, torch.device("cpu"), torch.float32)
    batch = tokenizer(["I love", "its a"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    reward = make_reward(cfg.reward, torch.device("cpu"))
    positive, negative = reward([POSITIVE, NEGATIVE])
    assert 0.0 <= negative < positive <= 1.0


def test_second_prefetch_reuses_recorded_revisions(tmp_path, clean_env, hub_server, hub_repos):
    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = hub_config(cache)
    hub.prefetch(cfg, run, log=lambda _: None)
    first = json.loads(hub.revisions_file(run).read_text())

    # The dataset moves on upstream; the run keeps the revision it started with.
    changed = tmp_path / "imdb-v2"
    changed.mkdir()
    for path in hub_repos.dirs[("dataset", DATASET_ID)].rglob("*"):
        if path.is_file():
            target = changed / path.relative_to(hub_repos.dirs[("dataset", DATASET_ID)])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nUpdated card.\n")
    new_sha = hub_server.publish("dataset", DATASET_ID, changed)
    assert new_sha != first["data.dataset"]["revision"]

    hub_server.clear_log()
    again = hub.prefetch(cfg, run, log=lambda _: None)
    assert json.loads(hub.revisions_file(run).read_text()) == first
    assert hub_server.requests == []  # pinned and cached: no hub call at all
    hub_server.stop()
    assert hub.prefetch(cfg, run, log=lambda _: None) == again  # so a relaunch works without the hub
    hub_server.start()

    # The cache is wiped: the recorded revision is downloaded again, not the new main.
    import shutil

    shutil.rmtree(Path(again["data.dataset"]["path"]).parents[1])
    hub_server.clear_log()
    hub.prefetch(cfg, run, log=lambda _: None)
    assert json.loads(hub.revisions_file(run).read_text()) == first
    assert hub_server.requests and all(new_sha not in path and "/main" not in path for _, path in hub_server.requests)


def test_unknown_repo_gated_repo_and_unreachable_hub_explain_the_fix(tmp_path, clean_env, hub_server):
    run = tmp_path / "run"
    cfg = hub_config(tmp_path / "cache", model="nobody/no-such-model")
    with pytest.raises(ValueError) as caught:
        hub.prefetch(cfg, run, log=lambda _: None)
    message = str(caught.value)
    assert "model.name" in message and "'nobody/no-such-model'" in message and hub_server.endpoint in message
    assert "hf auth login" in message and "--set model.name=" in message
    assert "data.dataset" not in message and "reward.model" not in message  # only the broken reference
    assert not hub.revisions_file(run).exists()  # nothing pinned from a failed prefetch

    hub_server.gate("model", CLASSIFIER_ID)
    with pytest.raises(ValueError, match=r"(?s)reward\.model.*gated.*accept its licence on "
                                         + hub_server.endpoint + "/" + CLASSIFIER_ID):
        hub.prefetch(hub_config(tmp_path / "cache"), run, log=lambda _: None)

    hub_server.stop()
    with pytest.raises(ValueError) as caught:
        hub.prefetch(hub_config(tmp_path / "cache"), run, log=lambda _: None)
    message = str(caught.value)
    assert "model.name" in message and MODEL_ID in message and hub_server.endpoint in message
    assert "could not be reached" in message and "HF_ENDPOINT" in message and "--set model.name=" in message
    assert "data.dataset, reward.model" in message  # named once, not retried against a dead hub


def test_job_without_prefetch_names_the_command(tmp_path, clean_env, hub_server):
    run, cfg = tmp_path / "run", hub_config(tmp_path / "cache")
    enter_job(clean_env, cfg, run)
    with pytest.raises(hub.NotPrefetchedError, match="launch.py prefetch"):
        hub.resolve(MODEL_ID)
    hub.prefetch(cfg, run, log=lambda _: None)
    assert hub.resolve(MODEL_ID) == hub.local_path("model.name", run, cfg)
    assert hub.local_path(hub.HubReference("reward.model", CLASSIFIER_ID, "model"), run) == hub.resolve(CLASSIFIER_ID)
    with pytest.raises(hub.NotPrefetchedError, match="no revision recorded"):
        hub.resolve("someone/else")
    missing_checkpoint = str(run / "sft" / "final")  # a path, not a hub id: left to the loader's own error
    assert hub.resolve(missing_checkpoint) == missing_checkpoint
    (Path(hub.resolve(MODEL_ID)) / "model.safetensors").unlink()  # an interrupted download
    with pytest.raises(hub.NotPrefetchedError, match=r"missing: model\.safetensors.*launch\.py prefetch"):
        hub.resolve(MODEL_ID)


def test_local_sources_need_no_hub(tmp_path, clean_env, hub_repos):
    """Local directories and files: nothing to prefetch, nothing contacted (no hub is running)."""
    dead = HubServer().start()
    dead.stop()
    clean_env.setenv("HF_ENDPOINT", dead.endpoint)
    gpt2 = hub_repos.dirs[("model", MODEL_ID)]
    classifier = hub_repos.dirs[("model", CLASSIFIER_ID)]
    train_file = hub_repos.dirs[("dataset", DATASET_ID)] / "plain_text" / "train-00000-of-00001.parquet"
    run = tmp_path / "run"
    cfg = hub_config(tmp_path / "cache", model=str(gpt2), dataset=str(train_file), reward=str(classifier))
    forbid_all_network(clean_env)
    assert hub.prefetch(cfg, run, log=lambda _: None) == {}
    enter_job(clean_env, cfg, run)

    import torch

    from pipeline.data.reviews import load_reviews
    from pipeline.models.policy import load_model, load_tokenizer
    from pipeline.models.reward import make_reward

    assert len(load_reviews(cfg.data, "train", seed=0)) == SPLIT_ROWS["train"]
    assert load_tokenizer(gpt2).padding_side == "left"
    assert load_model(gpt2, torch.device("cpu"), torch.float32).config.n_layer == 2
    assert 0.0 <= make_reward(cfg.reward, torch.device("cpu"))([POSITIVE])[0] <= 1.0
    assert len(load_reviews(DataConfig(dataset="tiny", tiny_reviews=20), "train", seed=0)) == 20


GUARDED = """
import socket, sys
real = socket.socket.connect
def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
        raise OSError(f"reached for {address}")
    return real(sock, address)
socket.socket.connect = connect
sys.path.insert(0, sys.argv[1])
"""


def test_fixture_hub_serves_huggingface_hub_and_datasets_through_hf_endpoint(tmp_path, hub_server):
    """Outside jobs (no prefetch record) the libraries talk to HF_ENDPOINT themselves."""
    code = GUARDED + f"""
from huggingface_hub import HfApi, HfFileSystem, snapshot_download
from pipeline.config import DataConfig
from pipeline.data.reviews import load_reviews
api = HfApi()
assert api.model_info({MODEL_ID!r}).sha == sys.argv[2]
assert api.dataset_info({DATASET_ID!r}).sha == sys.argv[3]
assert HfFileSystem().ls("datasets/{DATASET_ID}/plain_text", detail=False)
print(len(load_reviews(DataConfig(dataset={DATASET_ID!r}), "test", 0)))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "SLURM_DPO_"))}
    env.update(HF_ENDPOINT=hub_server.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), hub_server.sha("model", MODEL_ID),
                           hub_server.sha("dataset", DATASET_ID)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(SPLIT_ROWS["test"])
    assert hub_server.unhandled == []
