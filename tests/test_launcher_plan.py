"""Relaunch planning (no cluster needed): what is skipped, kept, resubmitted and rewired.

The fixture's run has one record per stage: pairs 10 (2 shards), pairs_merge 11, dpo 12 (3 betas),
eval_sft 14 (the SFT row: one task, a plain job), eval_arms 15 (3 betas), eval 16.
"""
import pytest

from jobs import records
from jobs.config import resolve_config, save_config
from jobs.launcher import plan_slurm
from pipeline.rundir.layout import RunLayout, atomic_write_json
from pipeline.registry import Arm, FromSft, get_stage
from slurm.queue import JobRecord


@pytest.fixture
def run(tmp_path):
    cfg = resolve_config("tiny")
    layout = RunLayout(tmp_path)
    save_config(cfg, layout)
    atomic_write_json(layout.done_path("sft"), {})
    for stage, job, tasks in (("pairs", "10", {"0": "10_0", "1": "10_1"}), ("pairs_merge", "11", {"": "11"}),
                              ("dpo", "12", {"0.05": "12_0", "0.1": "12_1", "1.0": "12_2"}),
                              ("eval_sft", "14", {"sft": "14"}),
                              ("eval_arms", "15", {"0.05": "15_0", "0.1": "15_1", "1.0": "15_2"}), ("eval", "16", {"": "16"})):
        records.append(layout, records.Submission(stage, job, tasks, "slurm", str(tmp_path / "jobs" / stage)))
    return cfg, layout


def states(**by_id):
    return {job_id.replace("x", "_"): JobRecord(job_id.replace("x", "_"), state, None, None, None, None, None)
            for job_id, state in by_id.items()}


def summary(planned):
    """(stage, tasks, afterok dependencies[, aftercorr arrays when there are any]) per planned job."""
    return [(p.stage.name, [records.task_key(t) or None for t in p.tasks], p.depends_on)
            + ((p.corresponding,) if p.corresponding else ()) for p in planned]


ALL_PENDING = {"12x0": "PENDING", "12x1": "PENDING", "12x2": "PENDING", "14": "PENDING",
               "15x0": "PENDING", "15x1": "PENDING", "15x2": "PENDING", "16": "PENDING"}
ALL_CANCELLED = {job: "CANCELLED" for job in ("11", "12x0", "12x1", "12x2", "14", "15x0", "15x1", "15x2", "16")}


def test_a_healthy_queue_is_left_alone(run):
    cfg, layout = run
    planned, stale = plan_slurm(cfg, layout, states(**{"10x0": "RUNNING", "10x1": "PENDING", "11": "PENDING",
                                                         **ALL_PENDING}))
    assert planned == [] and stale == []


def test_a_failed_shard_is_resubmitted_and_everything_behind_it_rewired(run):
    cfg, layout = run
    layout.pairs_shard(1).parent.mkdir(parents=True)
    layout.pairs_shard(1).write_text("{}\n")  # shard 1 finished
    planned, stale = plan_slurm(cfg, layout, states(**{"10x0": "FAILED", "10x1": "COMPLETED", "11": "PENDING",
                                                         **ALL_PENDING}))
    # the SFT row's eval (after sft, which is done) keeps its job; eval_arms waits task by task for the new dpo
    assert summary(planned) == [("pairs", ["0"], []), ("pairs_merge", [None], ["<pairs>"]),
                                ("dpo", ["0.05", "0.1", "1.0"], ["<pairs_merge>"]),
                                ("eval_arms", ["0.05", "0.1", "1.0"], [], ["<dpo>"]), ("eval", [None], ["14", "<eval_arms>"])]
    assert stale == ["11", "12_0", "12_1", "12_2", "15_0", "15_1", "15_2", "16"]


def test_one_failed_beta_is_resubmitted_alone_and_eval_waits_for_it(run):
    cfg, layout = run
    atomic_write_json(layout.done_path("pairs"), {})
    atomic_write_json(get_stage("eval_sft").done_path(layout, FromSft()), {})
    for beta in (0.05, 1.0):
        atomic_write_json(layout.done_path("dpo", Arm(beta)), {})
    planned, stale = plan_slurm(cfg, layout, states(**{**ALL_PENDING, "12x0": "COMPLETED", "12x1": "TIMEOUT",
                                                         "12x2": "COMPLETED", "14": "COMPLETED"}))
    # the arrays no longer line up (dpo: one task; eval_arms: three), so eval_arms waits for all of it
    assert summary(planned) == [("dpo", ["0.1"], []), ("eval_arms", ["0.05", "0.1", "1.0"], ["<dpo>"]),
                                ("eval", [None], ["<eval_arms>"])]
    assert stale == ["15_0", "15_1", "15_2", "16"]


def test_a_running_upstream_keeps_its_id_as_the_dependency(run):
    cfg, layout = run
    planned, stale = plan_slurm(cfg, layout, states(**{"10x0": "RUNNING", "10x1": "RUNNING", **ALL_CANCELLED}))
    assert summary(planned) == [("pairs_merge", [None], ["10_0", "10_1"]),
                                ("dpo", ["0.05", "0.1", "1.0"], ["<pairs_merge>"]), ("eval_sft", ["sft"], []),
                                ("eval_arms", ["0.05", "0.1", "1.0"], [], ["<dpo>"]),
                                ("eval", [None], ["<eval_sft>", "<eval_arms>"])]
    assert stale == []


def test_eval_arms_waits_task_by_task_for_a_dpo_array_still_running(run):
    cfg, layout = run
    atomic_write_json(layout.done_path("pairs"), {})
    atomic_write_json(get_stage("eval_sft").done_path(layout, FromSft()), {})
    atomic_write_json(layout.done_path("dpo", Arm(0.05)), {})  # 12_0 finished: eval_arms' task 0 can start at once
    planned, stale = plan_slurm(cfg, layout, states(**{**ALL_CANCELLED, "12x0": "COMPLETED", "12x1": "RUNNING",
                                                         "12x2": "PENDING"}))
    assert summary(planned) == [("eval_arms", ["0.05", "0.1", "1.0"], [], ["12"]),
                                ("eval", [None], ["<eval_arms>"])]
    # an arm whose eval is done leaves a gap: task i no longer lines up with dpo task i, so afterok on all
    atomic_write_json(get_stage("eval_arms").done_path(layout, Arm(0.05)), {})
    planned, _ = plan_slurm(cfg, layout, states(**{**ALL_CANCELLED, "12x0": "COMPLETED", "12x1": "RUNNING",
                                                    "12x2": "PENDING"}))
    assert summary(planned)[0] == ("eval_arms", ["0.1", "1.0"], ["12_1", "12_2"])
