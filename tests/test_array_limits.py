"""Scheduler limits without a cluster: arrays split to MaxArraySize, their dependencies rewired, the
limit read from `scontrol show config`, and a refusal that names a QOS/association limit explained.
(On the real cluster: tests/test_slurm_limits.py.)"""
import re
import subprocess

import pytest

from jobs import arrays, records
from jobs.config import resolve_config
from jobs.launcher import plan_slurm, render_plan
from pipeline.rundir.layout import RunLayout
from slurm import queue, submit

SIX = "dpo.betas=[0.05,0.1,0.2,0.5,1.0,2.0]"
KEYS = ["0.05", "0.1", "0.2", "0.5", "1.0", "2.0"]


def summary(planned):
    return [(p.stage.name, p.chunk, [records.task_key(t) or None for t in p.tasks], p.depends_on, p.corresponding)
            for p in planned]


@pytest.fixture
def six_arms(tmp_path):
    return resolve_config("tiny", None, [SIX]), RunLayout(tmp_path / "run")


def test_a_sweep_over_max_array_size_becomes_several_arrays_chunk_by_chunk(six_arms):
    cfg, layout = six_arms
    planned, _ = plan_slurm(cfg, layout)
    split = arrays.split(planned, 4)
    assert summary(split) == [
        ("sft", 0, [None], [], []), ("pairs", 0, ["0", "1"], ["<sft>"], []),
        ("pairs_merge", 0, [None], ["<pairs>"], []),
        ("dpo", 0, KEYS[:4], ["<pairs_merge>"], []), ("dpo", 1, KEYS[4:], ["<pairs_merge>"], []),
        ("eval_sft", 0, ["sft"], ["<sft>"], []),
        # eval_arms' chunk k waits task by task for dpo's chunk k alone
        ("eval_arms", 0, KEYS[:4], [], ["<dpo.0>"]), ("eval_arms", 1, KEYS[4:], [], ["<dpo.1>"]),
        ("eval", 0, [None], ["<eval_sft>", "<eval_arms>"], [])]
    # afterok on a split stage waits for every one of its arrays; <stage.k> names one
    submitted = {"sft": ["1"], "dpo": ["7", "8"], "eval_arms": ["10", "11"], "eval_sft": ["9"]}
    assert arrays.resolve(["<eval_sft>", "<eval_arms>"], submitted) == ["9", "10", "11"]
    assert arrays.resolve(["<dpo.1>", "42"], submitted) == ["8", "42"]


def test_a_one_task_chunk_is_a_plain_job_after_its_upstream_chunk(tmp_path):
    cfg = resolve_config("tiny", None, ["dpo.betas=[0.05,0.1,0.2,0.5,1.0]"])
    split = arrays.split(plan_slurm(cfg, RunLayout(tmp_path / "run"))[0], 4)
    arms = [s for s in summary(split) if s[0] == "eval_arms"]
    assert arms == [("eval_arms", 0, KEYS[:4], [], ["<dpo.0>"]), ("eval_arms", 1, ["1.0"], ["<dpo.1>"], [])]


def test_arrays_that_fit_are_planned_exactly_as_before(six_arms):
    cfg, layout = six_arms
    planned, _ = plan_slurm(cfg, layout)
    for limit in (None, 6, 1001):
        assert arrays.split(planned, limit) == planned
    # MaxArraySize=0 disables arrays: every task is its own job, each eval_arms task after its dpo job
    split = arrays.split(planned, 0)
    dpo = [p for p in split if p.stage.name == "dpo"]
    assert [len(p.tasks) for p in dpo] == [1] * 6
    assert [p.depends_on for p in split if p.stage.name == "eval_arms"] == [[f"<dpo.{k}>"] for k in range(6)]


def test_eval_arms_not_lined_up_with_a_split_dpo_waits_for_all_of_it(six_arms):
    cfg, layout = six_arms
    planned, _ = plan_slurm(cfg, layout)
    arms = next(p for p in planned if p.stage.name == "eval_arms")
    arms.tasks = arms.tasks[1:]  # as if the first arm's eval were done: the chunks no longer line up
    split = arrays.split(planned, 4)
    assert [(p.chunk, p.depends_on, p.corresponding) for p in split if p.stage.name == "eval_arms"] == [
        (0, ["<dpo>"], []), (1, ["<dpo>"], [])]
    # a relaunch's real upstream id (an older, larger array) is waited for as a whole
    arms.corresponding = ["12"]
    assert [p.depends_on for p in arrays.split(planned, 4) if p.stage.name == "eval_arms"] == [["12"], ["12"]]


def test_the_dry_run_renders_each_array_with_its_own_dependency(six_arms):
    cfg, layout = six_arms
    script = render_plan(cfg, layout, arrays.split(plan_slurm(cfg, layout)[0], 4))
    assert script.count("# ---- stage dpo tasks") == 2 and "#SBATCH --array=0-3" in script
    assert "#SBATCH --array=0-1" in script  # pairs, dpo's and eval_arms' second chunks
    deps = [d.strip("'") for d in re.findall(r"^#SBATCH --dependency=(.*)$", script, re.M)]
    assert deps == ["afterok:<sft>", "afterok:<pairs>", "afterok:<pairs_merge>", "afterok:<pairs_merge>",
                    "afterok:<sft>", "aftercorr:<dpo.0>", "aftercorr:<dpo.1>", "afterok:<eval_sft>:<eval_arms>"]


@pytest.mark.parametrize("out, expected", [
    ("AccountingStorageType   = accounting_storage/none\nMaxArraySize            = 4\nMaxJobCount = 10000\n", 4),
    ("MaxArraySize            = 0\n", 0), ("MaxJobCount = 10000\n", None)])
def test_max_array_size_is_read_from_scontrol(out, expected):
    calls = []

    def runner(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, out, "")
    assert queue.max_array_size(runner) == expected
    assert calls == [["scontrol", "show", "config"]]


def test_max_array_size_is_none_when_scontrol_does_not_answer():
    def missing(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_ctl_conf error: Unable to contact slurm controller")
    assert queue.max_array_size(missing) is None and queue.max_array_size(failing) is None


@pytest.mark.parametrize("stderr, limit", [
    ("sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: Job violates "
     "accounting/QOS policy (job submit limit, user's size and/or time limits)", "QOSMaxSubmitJobPerUserLimit"),
    ("sbatch: error: AssocMaxSubmitJobLimit\nsbatch: error: Batch job submission failed: Job violates "
     "accounting/QOS policy (job submit limit, user's size and/or time limits)", "AssocMaxSubmitJobLimit"),
    ("sbatch: error: AssocGrpCPURunMinutesLimit", "AssocGrpCPURunMinutesLimit")])
def test_a_refusal_names_the_limit_slurm_reported(stderr, limit):
    advice = submit.refusal_advice(" ".join(stderr.split()), "slurm.dpo")
    assert f"SLURM reported the limit {limit}: " in advice
    assert "partition" not in advice and "slurm.dpo.qos" in advice
    if "Submit" in limit:
        assert "each array task counts" in advice


def test_other_refusals_keep_their_advice():
    assert submit.refusal_advice("sbatch: error: Batch job submission failed: Invalid partition name specified",
                                 "slurm.eval") == "Fix slurm.eval (partition, account, qos, ...) and run again"
    advice = submit.refusal_advice("sbatch: error: Batch job submission failed: Invalid job array specification",
                                   "slurm.dpo")
    assert "MaxArraySize" in advice and "partition" not in advice
