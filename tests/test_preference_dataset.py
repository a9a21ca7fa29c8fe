"""pairs.source=dataset: preference pairs read from a dataset instead of sampled (issue 18, items 1 and 3).

Config and conversion are unit tests; bad inputs are refused by `launch.py run` before any job, leaving
no run directory; two slow tests run the tiny model end to end on a local JSONL file with other column
names (SFT on its chosen responses; and with sft.enabled=false, DPO from the base model)."""
import csv
import json
import os
import random
import re

import pytest

from conftest import launch
from jobs.config import resolve_config
from pipeline.data import preferences
from pipeline.registry import STAGE_BY_NAME, get_stage

COLUMNS = ("--set", "pairs.columns.prompt=question", "--set", "pairs.columns.chosen=response_j",
           "--set", "pairs.columns.rejected=response_k")
GOOD = ["was wonderful and moving", "is great fun", "felt warm and beautiful", "was a delight", "is brilliant"]
BAD = ["was awful and boring", "is a terrible mess", "felt dull and sad", "was a waste", "is painfully bad"]


def write_prefs(path, n=60, bad_rows=True):
    """n usable question/response_j/response_k rows, plus one empty, one identical and one overlong row."""
    rng = random.Random(0)
    rows = [{"question": f"Question {i}: what did you think of the film?",
             "response_j": f" I think it {rng.choice(GOOD)}.", "response_k": f" I think it {rng.choice(BAD)}."}
            for i in range(n)]
    if bad_rows:
        rows += [{"question": "Empty?", "response_j": "", "response_k": " bad."},
                 {"question": "Same?", "response_j": " same.", "response_k": " same."},
                 {"question": "Long?", "response_j": " good" * 200, "response_k": " bad."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset_sets(path, *extra):
    sets = ["pairs.source=dataset", f"pairs.dataset={path}", "pairs.columns.prompt=question",
            "pairs.columns.chosen=response_j", "pairs.columns.rejected=response_k", "eval.num_prompts=13", *extra]
    return resolve_config("tiny", sets=sets)


def test_columns_are_a_mapping_settable_role_by_role(tmp_path):
    cfg = dataset_sets(write_prefs(tmp_path / "p.jsonl"))
    assert cfg.pairs.columns == {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    assert preferences.column_names(resolve_config("tiny", sets=["pairs.columns.chosen=a"])) == \
        {"prompt": "prompt", "chosen": "a", "rejected": "rejected"}
    with pytest.raises(ValueError, match=r"pairs.columns.answer: is not a role; map prompt, chosen, rejected"):
        resolve_config("tiny", sets=["pairs.columns.answer=x"])
    with pytest.raises(ValueError, match="pairs.dataset: pairs.source=dataset needs a preference dataset"):
        resolve_config("tiny", sets=["pairs.source=dataset"])
    with pytest.raises(ValueError, match="pairs.source: 'file' is not one of sampled, dataset"):
        resolve_config("tiny", sets=["pairs.source=file"])
    with pytest.raises(ValueError, match=r"pairs.dataset: \./nope.jsonl does not exist"):
        resolve_config("tiny", sets=["pairs.source=dataset", "pairs.dataset=./nope.jsonl"])


def test_the_registry_says_what_a_dataset_run_runs(tmp_path):
    sampled = resolve_config("tiny")
    dataset = dataset_sets(write_prefs(tmp_path / "p.jsonl"), "sft.enabled=false")
    pairs, merge, sft = get_stage("pairs"), get_stage("pairs_merge"), get_stage("sft")
    assert [t.key for t in pairs.task_list(sampled)] == ["0", "1"]  # tiny: pairs.num_shards=2
    assert [t.key for t in pairs.task_list(dataset)] == ["0"]
    assert pairs.function_name(sampled) == "pipeline.stages.pairs:run_shard"
    assert pairs.function_name(dataset) == "pipeline.stages.pairs_dataset:convert"
    assert merge.function_name(dataset) == "pipeline.stages.pairs_dataset:merge"
    assert (sft.function_name(sampled), sft.function_name(dataset)) == ("pipeline.stages.sft:run",
                                                                         "pipeline.stages.sft:use_base")
    for stage in STAGE_BY_NAME.values():  # every function named exists
        for cfg in (sampled, dataset):
            module, function = stage.function_name(cfg).split(":")
            assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_implicit_prompts_are_cut_off_and_bad_rows_counted(tmp_path):
    from datasets import Dataset

    cfg = resolve_config("tiny", sets=["pairs.source=dataset", f"pairs.dataset={tmp_path}"])
    rows = Dataset.from_list([
        {"chosen": "Q: how was it? A: great", "rejected": "Q: how was it? A: bad"},
        {"chosen": "same", "rejected": "same"},
        {"chosen": "", "rejected": "x"},
        {"chosen": "Tell me. Yes", "rejected": "Tell me. No"}])
    out = preferences.convert(cfg, rows)
    assert out.implicit_prompt and out.total == 4
    assert out.rows == [{"prompt": "Q: how was it? A:", "chosen": " great", "rejected": " bad"},
                        {"prompt": "Tell me.", "chosen": " Yes", "rejected": " No"}]
    assert out.dropped == {"empty": 1, "identical": 1, "too_long": 0}


def test_named_splits_give_the_eval_prompts(tmp_path):
    data = tmp_path / "prefs"
    data.mkdir()
    write_prefs(data / "train.jsonl", n=30)
    (data / "test.jsonl").write_text("".join(
        json.dumps({"question": f"Held {i}?", "response_j": " good.", "response_k": " bad."}) + "\n"
        for i in range(12)))
    cfg = dataset_sets(data, "eval.prompt_split=test")
    counts = preferences.check_before_submit(cfg)
    # every usable training row is trained on: the eval prompts come from the test split
    assert counts == {"rows": 33, "usable": 31, "held_out_prompts": 10, "empty": 1, "identical": 1, "too_long": 0,
                      "conversational": False}
    train, eval_rows = preferences.load(cfg)
    held = preferences.held_out_prompts(cfg, train, eval_rows)
    assert all(p.startswith("Held ") for p in held) and len(set(held)) == 10
    assert held == preferences.held_out_prompts(cfg, *preferences.load(cfg))  # deterministic by seed
    single = dataset_sets(write_prefs(tmp_path / "one.jsonl", n=30))
    train, _ = preferences.load(single)
    held = preferences.held_out_prompts(single, train, None)
    assert len(held) == 10 and set(held) <= {r["prompt"] for r in train.rows}
    assert not set(held) & {r["prompt"] for r in preferences.training_rows(train, held)}  # disjoint
    assert preferences.check_before_submit(single)["usable"] == 31 - 10


@pytest.mark.parametrize("sets, message", [
    (("--set", "pairs.columns.prompt=question"),
     r"pairs.columns: pairs.dataset=.*lacks chosen \(column 'chosen'\), rejected \(column 'rejected'\); its columns: "
     r"question, response_j, response_k\. Map them"),
    (("--set", "pairs.columns.prompt=q", "--set", "pairs.columns.chosen=response_j",
      "--set", "pairs.columns.rejected=response_k"), r"lacks prompt \(column 'q'\); its columns: question"),
    (COLUMNS + ("--set", "pairs.train_split=train_prefs"),
     r"pairs.train_split: pairs.dataset=.* has no split 'train_prefs'; its splits: train$"),
    (COLUMNS + ("--set", "eval.prompt_split=test"), r"eval.prompt_split: pairs.dataset=.* has no split 'test'"),
    (("--set", "pairs.columns.prompt=question", "--set", "pairs.columns.chosen=response_j",
      "--set", "pairs.columns.rejected=response_j"),
     r"pairs.dataset: .* split 'train' has no usable rows: 63 read, dropped 1 empty and 62 with identical"),
])
def test_bad_datasets_are_refused_before_any_job(tmp_path, sets, message):
    data = write_prefs(tmp_path / "prefs.jsonl")
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
                  "pairs.source=dataset", "--set", f"pairs.dataset={data}", *sets, check=False, timeout=300)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr
    assert not run_dir.exists()


def frontier(run_dir):
    with open(run_dir / "eval" / "frontier.csv") as handle:
        return list(csv.DictReader(handle))


CHEAP = ("--set", "dpo.betas=[0.1]", "--set", "eval.num_prompts=13", "--set", "eval.samples_per_prompt=2",
         "--set", "sft.epochs=1", "--set", "num_threads=1")


@pytest.mark.slow
def test_a_local_jsonl_file_with_other_columns_runs_end_to_end(tmp_path):
    data = write_prefs(tmp_path / "prefs.jsonl")
    run_dir = tmp_path / "run"
    launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
           "pairs.source=dataset", "--set", f"pairs.dataset={data}", *COLUMNS, *CHEAP)
    done = json.loads((run_dir / "pairs" / "DONE.json").read_text())
    assert {k: done["metrics"][k] for k in ("rows", "pairs", "held_out_rows", "dropped_empty", "dropped_identical",
                                            "dropped_too_long")} == \
        {"rows": 63, "pairs": 50, "held_out_rows": 10, "dropped_empty": 1, "dropped_identical": 1,
         "dropped_too_long": 1}
    pairs = [json.loads(line) for line in (run_dir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    eval_prompts = [json.loads(line)["prompt"] for line in (run_dir / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(pairs) == 50 and set(pairs[0]) >= {"prompt", "chosen", "rejected"}
    assert len(eval_prompts) == 13 and not set(eval_prompts) & {p["prompt"] for p in pairs}
    sft = json.loads((run_dir / "sft" / "DONE.json").read_text())
    assert sft["inputs"]["dataset"] == str(data) and sft["inputs"]["train_examples"] == 50 + 1  # + the overlong row
    rows = frontier(run_dir)
    assert [(r["policy"], r["beta"]) for r in rows][0] == ("sft", "") and {r["beta"] for r in rows[1:]} == {"0.1"}
    assert all(int(r["n"]) == 13 * 2 for r in rows)
    status = launch("status", "--run-dir", str(run_dir)).stdout
    assert ("pairs: 50 pairs from 63 rows of " in status and "dropped 1 empty, 1 with identical chosen/rejected, 1 "
            "longer than dpo.max_length=64 tokens; 10 rows held out" in status)


@pytest.mark.slow
def test_without_sft_dpo_starts_from_the_base_model(tmp_path):
    data = write_prefs(tmp_path / "prefs.jsonl")
    run_dir = tmp_path / "run"
    launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
           "pairs.source=dataset", "--set", f"pairs.dataset={data}", "--set", "sft.enabled=false", *COLUMNS, *CHEAP)
    sft_model = run_dir / "sft" / "final"
    assert sft_model.is_symlink() and sft_model.resolve() == (run_dir / "data" / "base_model").resolve()
    assert not (run_dir / "sft" / "checkpoints").exists()
    assert json.loads((run_dir / "sft" / "DONE.json").read_text())["metrics"]["trained"] is False
    dpo = json.loads((run_dir / "dpo" / "beta-0.1" / "DONE.json").read_text())
    assert os.path.realpath(dpo["inputs"]["sft_model"]) == str((run_dir / "data" / "base_model").resolve())
    rows = frontier(run_dir)
    assert rows[0]["policy"] == "sft" and abs(float(rows[0]["kl"])) < 1e-3  # the base model is the reference
    assert any(float(r["kl"]) > 0.01 for r in rows[1:])
