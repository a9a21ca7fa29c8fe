"""Pairs shards and eval honour a stop request: they save what they sampled (per batch) and a rerun
continues where they stopped, drawing exactly the tokens an uninterrupted run draws."""
import json
import signal
import time
from pathlib import Path

import pytest

from conftest import clone_before_dpo, start_stage_job
from pipeline.runtime import interrupt


def wait_for_files(pattern_dir: Path, pattern: str, proc, timeout: float = 300) -> list[Path]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(pattern_dir.glob(pattern)) if pattern_dir.is_dir() else []
        if found:
            return found
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} in {pattern_dir} after {timeout} s")


@pytest.mark.slow
def test_sampling_stopped_after_each_batch_resumes_to_the_same_tokens(tiny_run, tmp_path):
    from pipeline.models.policy import load_model, load_tokenizer
    from pipeline.evaluation.sampling import sample_completions, sample_resumable

    model_dir = tiny_run / "sft" / "final"
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, __import__("torch").device("cpu"), __import__("torch").float32)
    prompts = ["I love", "The film", "Worth the", "its a", "This movie", "A story"]
    kwargs = dict(num_samples=4, max_new_tokens=12, batch_size=10, seed=3)  # 24 samples: batches of 10, 10, 4
    expected = sample_completions(model, tokenizer, prompts, **kwargs)
    partial = tmp_path / "partial"
    for saved in (1, 2):  # a stop during each of the first two batches
        interrupt.clear()
        interrupt.request_stop(interrupt.TIMEOUT)
        with pytest.raises(interrupt.StageInterrupted):
            sample_resumable(model, tokenizer, prompts, partial, "test", **kwargs)
        assert len(list(partial.glob("batch-*.jsonl"))) == saved
    interrupt.clear()
    resumed = sample_resumable(model, tokenizer, prompts, partial, "test", **kwargs)
    assert [[(s.completion, s.completion_ids) for s in group] for group in resumed] == \
        [[(s.completion, s.completion_ids) for s in group] for group in expected]


@pytest.mark.slow
def test_a_pairs_shard_stopped_mid_shard_resumes_to_the_same_file(tiny_run, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", stages=("data", "sft"))
    shard = run_dir / "pairs" / "shards" / "shard-00000.jsonl"
    partial = shard.with_suffix(".partial")
    proc = start_stage_job(run_dir, "pairs", "0")
    wait_for_files(partial, "batch-*.jsonl", proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped on request (timeout)" in out
    saved = sorted(p.name for p in partial.glob("batch-*.jsonl"))
    assert not shard.exists() and 1 <= len(saved) < 4  # 100 prompts x 4 in batches of 100

    proc = start_stage_job(run_dir, "pairs", "0")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert shard.read_bytes() == (tiny_run / "pairs" / "shards" / "shard-00000.jsonl").read_bytes()
    assert not partial.exists()


@pytest.mark.slow
def test_eval_stopped_midway_resumes_to_the_same_frontier(tiny_run, tmp_path):
    # one beta: its 3 checkpoints are one eval_arms task of 3 policies; then the SFT row and the assembly
    # (the rows compare with the tiny run's)
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", stages=("data", "sft", "pairs", "dpo"),
                               dpo={"betas": [0.1]})
    policies = run_dir / "eval" / "policies"
    task_dir = run_dir / "eval" / "tasks" / "beta-0.1"
    proc = start_stage_job(run_dir, "eval_arms", "0.1")
    wait_for_files(policies, "*.json", proc, timeout=600)  # at least one checkpoint evaluated
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped on request (timeout)" in out, out
    stopped = json.loads((task_dir / "progress.json").read_text())
    assert (stopped["status"], stopped["stop_reason"]) == ("interrupted", "timeout")
    evaluated = len(list(policies.glob("*.json")))
    assert 1 <= evaluated < 3 and not (task_dir / "DONE.json").exists()

    for stage, task in (("eval_arms", "0.1"), ("eval_sft", "sft"), ("eval", None)):
        proc = start_stage_job(run_dir, stage, task)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out
    expected = [row for row in (tiny_run / "eval" / "frontier.csv").read_text().splitlines()
                if row.split(",")[1] in ("beta", "", "0.1")]
    assert (run_dir / "eval" / "frontier.csv").read_text().splitlines() == expected and len(expected) == 5
    (restart,) = json.loads((task_dir / "progress.json").read_text())["restarts"]
    assert (restart["cause"], restart["resumed_from_step"]) == ("timeout", evaluated)
    assert not list(policies.glob("*.partial"))
