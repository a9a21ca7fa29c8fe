"""A hub preference dataset (pairs.dataset = a hub id): prefetched and pinned at launch like every hub
reference, checked from the snapshot before any job (splits named by the dataset card, UltraFeedback's
train_prefs / test_prefs), then read offline from the snapshot inside jobs. Against the fixture hub."""
import json

import pytest

from hub_fixture import hub_repos, hub_server  # noqa: F401 - fixtures
from hub_fixture_data import split_card
from jobs import launcher
from jobs.config import resolve_config
from pipeline.data import hub, preferences
from pipeline.rundir.layout import RunLayout
from test_hub import clean_env, forbid_all_network, no_outside_network  # noqa: F401 - fixtures

PREFS_ID = "someone/prefs-tiny-test"
CARD = split_card("preference pairs (tiny test copy)")


def build_prefs_repo(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    for split, n in (("train_prefs", 40), ("test_prefs", 12)):
        rows = {"prompt": [f"{split} question {i}?" for i in range(n)],
                "chosen": [" a good answer." for _ in range(n)], "rejected": [" a bad answer." for _ in range(n)]}
        pq.write_table(pa.table(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(CARD)
    return root


def config(cache, *sets):
    return resolve_config("tiny", sets=["pairs.source=dataset", f"pairs.dataset={PREFS_ID}", f"hub.cache_dir={cache}",
                                        "pairs.train_split=train_prefs", "eval.num_prompts=13", *sets])


def test_a_hub_preference_dataset_is_prefetched_pinned_and_read_offline(tmp_path, clean_env, hub_server,
                                                                       monkeypatch):
    sha = hub_server.publish("dataset", PREFS_ID, build_prefs_repo(tmp_path / "repo"))
    cfg = config(tmp_path / "cache", "eval.prompt_split=test_prefs")
    assert hub.references(cfg)[-1] == hub.HubReference("pairs.dataset", PREFS_ID, "dataset")
    layout = RunLayout(tmp_path / "run")
    logged = []
    fetched = launcher.prefetch(cfg, layout, log=logged.append)
    recorded = json.loads(layout.hub_revisions.read_text())
    assert recorded["pairs.dataset"]["revision"] == sha and fetched["pairs.dataset"]["revision"] == sha
    assert any("40 usable pairs of 40 rows, 10 prompts held out" in line for line in logged), logged

    # a job: offline, the snapshot found through the recorded revision; no network at all
    for name, value in hub.offline_environment(cfg, layout.root).items():
        monkeypatch.setenv(name, value)
    forbid_all_network(monkeypatch)
    train, eval_rows = preferences.load(cfg)
    assert len(train.rows) == 40 and len(eval_rows.rows) == 12
    held = preferences.held_out_prompts(cfg, train, eval_rows)
    assert len(held) == 10 and all(p.startswith("test_prefs question") for p in held)


def test_a_missing_hub_split_names_the_splits_of_the_card(tmp_path, clean_env, hub_server):
    hub_server.publish("dataset", PREFS_ID, build_prefs_repo(tmp_path / "repo"))
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(ValueError, match=r"pairs.train_split: pairs.dataset=someone/prefs-tiny-test has no split "
                                         r"'train'; its splits: train_prefs, test_prefs"):
        launcher.prefetch(config(tmp_path / "cache", "pairs.train_split=train"), layout, log=lambda _: None)
    assert not layout.root.exists()  # the run directory prefetch made is gone again
