"""Relaunch planning (no cluster needed): what is skipped, kept, resubmitted and rewired."""
import pytest

from jobs import records
from jobs.config import resolve_config, save_config
from jobs.launcher import plan_slurm
from pipeline.layout import RunLayout, atomic_write_json
from pipeline.registry import Arm
from slurm.queue import JobRecord


@pytest.fixture
def run(tmp_path):
    cfg = resolve_config("tiny")
    layout = RunLayout(tmp_path)
    save_config(cfg, layout)
    atomic_write_json(layout.done_path("sft"), {})
    for stage, job, tasks in (("pairs", "10", {"0": "10_0", "1": "10_1"}), ("pairs_merge", "11", {"": "11"}),
                              ("dpo", "12", {"0.05": "12_0", "0.1": "12_1", "1.0": "12_2"}), ("eval", "13", {"": "13"})):
        records.append(layout, records.Submission(stage, job, tasks, "slurm", str(tmp_path / "jobs" / stage)))
    return cfg, layout


def states(**by_id):
    return {job_id.replace("x", "_"): JobRecord(job_id.replace("x", "_"), state, None, None, None, None, None)
            for job_id, state in by_id.items()}


def summary(planned):
    return [(p.stage.name, [records.task_key(t) or None for t in p.tasks], p.depends_on) for p in planned]


def test_a_healthy_queue_is_left_alone(run):
    cfg, layout = run
    planned, stale = plan_slurm(cfg, layout, states(**{"10x0": "RUNNING", "10x1": "PENDING", "11": "PENDING",
                                                         "12x0": "PENDING", "12x1": "PENDING", "12x2": "PENDING",
                                                         "13": "PENDING"}))
    assert planned == [] and stale == []


def test_a_failed_shard_is_resubmitted_and_everything_behind_it_rewired(run):
    cfg, layout = run
    layout.pairs_shard(1).parent.mkdir(parents=True)
    layout.pairs_shard(1).write_text("{}\n")  # shard 1 finished
    planned, stale = plan_slurm(cfg, layout, states(**{"10x0": "FAILED", "10x1": "COMPLETED", "11": "PENDING",
                                                         "12x0": "PENDING", "12x1": "PENDING", "12x2": "PENDING",
                                                         "13": "PENDING"}))
    assert summary(planned) == [("pairs", ["0"], []), ("pairs_merge", [None], ["<pairs>"]),
                                ("dpo", ["0.05", "0.1", "1.0"], ["<pairs_merge>"]), ("eval", [None], ["<dpo>"])]
    assert stale == ["11", "12_0", "12_1", "12_2", "13"]


def test_one_failed_beta_is_resubmitted_alone_and_eval_waits_for_it(run):
    cfg, layout = run
    atomic_write_json(layout.done_path("pairs"), {})
    for beta in (0.05, 1.0):
        atomic_write_json(layout.done_path("dpo", Arm(beta)), {})
    planned, stale = plan_slurm(cfg, layout, states(**{"12x0": "COMPLETED", "12x1": "TIMEOUT", "12x2": "COMPLETED",
                                                         "13": "PENDING"}))
    assert summary(planned) == [("dpo", ["0.1"], []), ("eval", [None], ["<dpo>"])]
    assert stale == ["13"]


def test_a_running_upstream_keeps_its_id_as_the_dependency(run):
    cfg, layout = run
    planned, stale = plan_slurm(cfg, layout, states(**{"10x0": "RUNNING", "10x1": "RUNNING", "11": "CANCELLED",
                                                         "12x0": "CANCELLED", "12x1": "CANCELLED", "12x2": "CANCELLED",
                                                         "13": "CANCELLED"}))
    assert summary(planned) == [("pairs_merge", [None], ["10_0", "10_1"]),
                                ("dpo", ["0.05", "0.1", "1.0"], ["<pairs_merge>"]), ("eval", [None], ["<dpo>"])]
    assert stale == []
