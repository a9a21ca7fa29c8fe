"""The whole tiny pipeline through launch.py (local submitit jobs): outputs, the DPO effect, idempotence."""
import csv
import json

import pytest

from conftest import launch

pytestmark = pytest.mark.slow


def frontier(run_dir):
    with open(run_dir / "eval" / "frontier.csv") as handle:
        return list(csv.DictReader(handle))


def test_run_leaves_the_frontier_plot_and_report(tiny_run):
    for name in ("frontier.csv", "frontier.png", "report.md", "DONE.json"):
        assert (tiny_run / "eval" / name).is_file(), name
    rows = frontier(tiny_run)
    assert list(rows[0]) == ["policy", "beta", "step", "reward", "kl", "n", "reward_stderr", "kl_stderr",
                             "method", "strength", "seed", "kl_analytic"]
    assert {(r["method"], r["strength"] == r["beta"], r["seed"]) for r in rows[1:]} == {("dpo", True, "0")}
    assert all(float(r["reward_stderr"]) >= 0 and float(r["kl_stderr"]) >= 0 for r in rows)
    sft = [r for r in rows if r["policy"] == "sft"]
    # the noise floor, KL(sampler || scorer) of the SFT model: measured, and tiny in float32 (the
    # sampler's KV-cache arithmetic and the scorer's full forward pass agree to ~1e-6 per sequence)
    assert len(sft) == 1 and sft[0]["kl"] != "nan" and abs(float(sft[0]["kl"])) < 1e-3
    dpo_kls = [float(r["kl"]) for r in rows if r["policy"] == "dpo" and int(r["step"]) >= 50]
    assert min(dpo_kls) > 100 * abs(float(sft[0]["kl"]))  # trained policies stand clear of the floor
    dpo_steps = {}
    for r in rows:
        if r["policy"] == "dpo":
            dpo_steps.setdefault(float(r["beta"]), []).append(int(r["step"]))
    assert sorted(dpo_steps) == [0.05, 0.1, 1.0]
    for steps in dpo_steps.values():  # every 25-step checkpoint plus the final model
        assert steps == sorted(steps) and steps[0] == 25 and len(steps) >= 3
    assert (tiny_run / "eval" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tiny_run / "eval" / "report.md").read_text()
    for prompt in ("I love", "Worth the entertainment value of a", "its a"):
        assert f"**Prompt:** “{prompt}”" in report
    assert report.count("### DPO β") == 3
    # training curves from the run directory's own logs, embedded as PNGs next to the report
    for png in ("sft_loss.png", "dpo_curves.png"):
        assert f"]({png})" in report and (tiny_run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in ("beta-0.05", "beta-0.1", "beta-1.0"):
        logged = [json.loads(line) for line in (tiny_run / "dpo" / arm / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in logged if "rewards/margins" in r]
        assert steps == sorted(set(steps)) and steps[-1] >= 70  # one record per step, up to the last


def test_dpo_raises_reward_and_kl_falls_with_beta(tiny_run):
    rows = frontier(tiny_run)
    sft_reward = next(float(r["reward"]) for r in rows if r["policy"] == "sft")
    finals = {}
    for r in rows:
        if r["policy"] == "dpo":
            beta, step = float(r["beta"]), int(r["step"])
            if beta not in finals or step > finals[beta][0]:
                finals[beta] = (step, float(r["reward"]), float(r["kl"]))
    for beta, (_, reward, _) in finals.items():
        assert reward >= sft_reward + 0.15, (beta, reward, sft_reward)
    kls = [finals[b][2] for b in sorted(finals)]
    assert kls[0] > kls[1] > kls[2] > 0, kls


def test_pairs_are_six_per_prompt_and_ordered(tiny_run):
    pairs = [json.loads(line) for line in (tiny_run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    per_prompt = {}
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"]
        per_prompt[p["prompt"]] = per_prompt.get(p["prompt"], 0) + 1
    manifest = json.loads((tiny_run / "pairs" / "DONE.json").read_text())
    assert max(per_prompt.values()) == 6
    assert manifest["metrics"]["pairs"] == len(pairs) == manifest["metrics"]["pairs_possible"] - manifest["metrics"]["pairs_dropped_ties"]
    assert manifest["metrics"]["prompts"] == 200
    eval_prompts = {json.loads(l)["prompt"] for l in (tiny_run / "data" / "eval_prompts.jsonl").read_text().splitlines()}
    assert not eval_prompts & set(per_prompt)  # eval prompts are held out from the pair prompts


def test_manifests_record_what_ran(tiny_run):
    for stage in ("sft", "pairs", "dpo/beta-0.1", "eval"):
        manifest = json.loads((tiny_run / stage / "DONE.json").read_text())
        assert {"config", "inputs", "metrics", "versions", "git_sha", "wall_time_s"} <= set(manifest)
        assert manifest["versions"]["trl"] and manifest["wall_time_s"] > 0
    dpo = json.loads((tiny_run / "dpo" / "beta-0.1" / "DONE.json").read_text())
    assert dpo["beta"] == 0.1 and dpo["metrics"]["rewards/accuracies"] > 0.5 and dpo["lost_steps"] == 0
    progress = json.loads((tiny_run / "dpo" / "beta-0.1" / "progress.json").read_text())
    assert progress["status"] == "done" and "train_loss" in progress["last_metrics"]  # the Trainer's last log
    assert (tiny_run / "config.yaml").is_file()


def test_second_run_does_no_work(tiny_run):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("DONE.json")}
    jobs_before = json.loads((tiny_run / "jobs" / "jobs.json").read_text())
    proc = launch("run", "--preset", "tiny", "--run-dir", str(tiny_run), "--executor", "local", "--set", "num_threads=1")
    assert proc.stdout.count("done, skipped") == 12, proc.stdout  # every task of the registry: sft, 2 shards,
    # the merge, 3 betas, the SFT row's eval, 3 arms' evals, eval
    assert json.loads((tiny_run / "jobs" / "jobs.json").read_text()) == jobs_before
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("DONE.json")} == before


def test_status_reports_every_task_completed(tiny_run):
    rows = json.loads(launch("status", "--run-dir", str(tiny_run), "--json").stdout)
    assert [(r["stage"], r["task"]) for r in rows] == [
        ("sft", None), ("pairs", "0"), ("pairs", "1"), ("pairs_merge", None),
        ("dpo", "0.05"), ("dpo", "0.1"), ("dpo", "1.0"), ("eval_sft", "sft"),
        ("eval_arms", "0.05"), ("eval_arms", "0.1"), ("eval_arms", "1.0"), ("eval", None)]
    assert all(r["state"] == "COMPLETED" and r["restarts"] == 0 for r in rows)
    dpo = next(r for r in rows if r["task"] == "0.1")
    assert dpo["step"] == dpo["total_steps"] == 75
    # what it cost: one attempt per job on CPUs (no GPU here), nothing requeued
    assert all(r["cost"]["attempts"] == 1 and r["cost"]["gpu_hours"] == 0 and r["cost"]["cpu_hours"] > 0
               and r["cost"]["requeued_cpu_hours"] == 0 for r in rows)
    text = launch("status", "--run-dir", str(tiny_run)).stdout
    total = sum(r["cost"]["cpu_hours"] for r in rows)
    assert f"cost total: {total:.4g} CPU-h (requeued 0, 0%); {len(rows)} attempt(s), 0 step(s) lost" in text
    assert "cost dpo: " in text and "cost sft: " in text
    report = (tiny_run / "eval" / "report.md").read_text()
    assert "## Cost" in report and "| dpo | 0.1 | 1 | 0 |" in report and "| **total** |  | 12 | 0 |" in report
