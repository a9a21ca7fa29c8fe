"""The stage registry: one declaration per stage, one canonical key per task, and the import rules."""
import ast
import json
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch
from jobs import records
from jobs.config import SlurmConfig, resolve_config, save_config
from pipeline.rundir.layout import RunLayout
from pipeline.registry import STAGE_BY_NAME, STAGES, Arm, FromSft, Shard, get_stage, stages_until
from slurm import submit


# ------------------------------------------------------------------ the table itself
def test_every_stage_is_declared_consistently():
    sections = {f.name for f in dataclasses.fields(SlurmConfig)}
    seen = set()
    for stage in STAGES:
        assert stage.resources in sections, f"{stage.name}: slurm.{stage.resources} is not declared in SlurmConfig"
        assert set(stage.after) <= seen, f"{stage.name} waits for a stage declared after it"
        assert stage.is_array == (stage.task_type is not None), stage.name
        module, function = stage.run.split(":")
        assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file(), stage.run
        seen.add(stage.name)
    assert [s.name for s in stages_until("pairs_merge")] == ["sft", "pairs", "pairs_merge"]
    with pytest.raises(ValueError, match="unknown stage 'nope'; stages: sft, pairs, pairs_merge, dpo, eval_sft, eval_arms, eval$"):
        get_stage("nope")


def test_tasks_of_the_tiny_preset():
    cfg = resolve_config("tiny")
    assert STAGE_BY_NAME["pairs"].task_list(cfg) == [Shard(0), Shard(1)]
    assert [a.key for a in STAGE_BY_NAME["dpo"].task_list(cfg)] == ["0.05", "0.1", "1.0"]
    assert STAGE_BY_NAME["eval"].task_list(cfg) == [None]
    # eval scales out: the SFT row (and Best-of-N arms) after sft, one task per trained arm after its dpo task
    assert [t.key for t in STAGE_BY_NAME["eval_sft"].task_list(cfg)] == ["sft"]
    assert STAGE_BY_NAME["eval_arms"].task_list(cfg) == STAGE_BY_NAME["dpo"].task_list(cfg)
    assert STAGE_BY_NAME["eval_arms"].corresponds_to == "dpo" and not STAGE_BY_NAME["eval"].needs_gpu
    methods = resolve_config("tiny-methods")
    assert [t.key for t in STAGE_BY_NAME["eval_sft"].task_list(methods)] == [
        "sft", "best_of_n:2:seed0", "best_of_n:2:seed1", "best_of_n:4:seed0", "best_of_n:4:seed1",
        "best_of_n:8:seed0", "best_of_n:8:seed1"]
    assert len(STAGE_BY_NAME["eval_arms"].task_list(methods)) == 18


def test_eval_sft_tasks_parse_and_refuse_trained_arms():
    stage = get_stage("eval_sft")
    assert stage.parse_task("sft") == FromSft() and stage.parse_task(" SFT ").dirname == "sft"
    task = stage.parse_task("best_of_n:4")
    assert task == FromSft(Arm(4, "best_of_n")) and task.key == "best_of_n:4" and task.dirname == "best-of-n-4"
    with pytest.raises(ValueError, match="dpo is trained; its eval is an eval_arms task"):
        stage.parse_task("0.1")
    with pytest.raises(ValueError, match="an eval_sft task is 'sft' or a Best-of-N arm"):
        stage.parse_task("nope:x")


def test_eval_assembly_names_the_missing_results(tmp_path):
    from pipeline.rundir.layout import atomic_write_json
    from pipeline.stages import eval as eval_stage

    cfg = resolve_config("tiny")
    layout = RunLayout(tmp_path)
    for arm in STAGE_BY_NAME["dpo"].task_list(cfg):
        atomic_write_json(layout.done_path("dpo", arm), {"metrics": {"global_step": 75}})
    atomic_write_json(layout.eval_result("sft"), {"policy": "sft"})
    with pytest.raises(RuntimeError, match=r"no result for 3 polic\(ies\) \(dpo-beta-0.05-step75, "
                                           r"dpo-beta-0.1-step75, dpo-beta-1.0-step75\).*launch.py resume"):
        eval_stage.run(cfg, layout)
    assert not layout.is_done("eval") and not layout.frontier_csv.exists()


def test_task_directories_and_done_checks(tmp_path):
    layout = RunLayout(tmp_path)
    dpo, pairs, merge = STAGE_BY_NAME["dpo"], STAGE_BY_NAME["pairs"], STAGE_BY_NAME["pairs_merge"]
    assert dpo.path(layout, Arm(0.1)) == layout.root / "dpo" / "beta-0.1"
    assert merge.path(layout) == pairs.path(layout, Shard(1)) == layout.root / "pairs"
    assert not pairs.is_done(layout, Shard(1))
    layout.pairs_shard(1).parent.mkdir(parents=True)
    layout.pairs_shard(1).write_text("{}\n")
    assert pairs.is_done(layout, Shard(1)) and not pairs.is_done(layout, Shard(0)) and not merge.is_done(layout)
    layout.done_path("pairs").write_text("{}")
    assert pairs.is_done(layout, Shard(0)) and merge.is_done(layout)


@pytest.mark.parametrize("spelling", ["1", "1.0", "1e0", " 1.00 ", "10e-1"])
def test_any_spelling_of_a_beta_names_the_same_arm(spelling):
    arm = get_stage("dpo").parse_task(spelling)
    assert arm == Arm(1.0) and arm.key == "1.0" and arm.tag == "beta-1.0"


def test_bad_tasks_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="a DPO task is a beta, e.g. --task 0.1"):
        get_stage("dpo").parse_task("large")
    with pytest.raises(ValueError, match="a shard is a number"):
        get_stage("pairs").parse_task("first")
    with pytest.raises(ValueError, match="runs as one job"):
        get_stage("eval").parse_task("3")
    with pytest.raises(ValueError, match="is an array: name a task with --task"):
        get_stage("dpo").parse_task(None)


@pytest.fixture
def run_with_dpo_logs(tmp_path):
    layout = RunLayout(tmp_path / "run")
    save_config(resolve_config("tiny"), layout)
    folder = layout.jobs / "dpo"
    records.append(layout, records.Submission("dpo", "12", {"0.05": "12_0", "0.1": "12_1", "1.0": "12_2"}, "slurm",
                                              str(folder)))
    for job_id in ("12_0", "12_1", "12_2"):
        out, _ = submit.job_log_paths(folder, job_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"log of job {job_id}\n")
    return layout


@pytest.mark.parametrize("spelling", ["1", "1.0", "1e0"])
def test_logs_finds_the_beta_one_job_by_any_spelling(run_with_dpo_logs, spelling):
    proc = launch("logs", "dpo", "--task", spelling, "--run-dir", str(run_with_dpo_logs.root))
    assert "log of job 12_2" in proc.stdout and "12_0" not in proc.stdout


def test_logs_for_an_unrecorded_task_lists_the_recorded_ones(run_with_dpo_logs):
    proc = launch("logs", "dpo", "--task", "2", "--run-dir", str(run_with_dpo_logs.root), check=False)
    assert proc.returncode == 2
    assert "no job recorded for dpo[2.0]; recorded: dpo[0.05], dpo[0.1], dpo[1.0]" in proc.stderr


# ------------------------------------------------------------------ architecture rules
def test_pipeline_imports_no_scheduler_code():
    """Statically (imports inside functions count too) and at run time."""
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in {"slurm", "jobs", "submitit"}]
    assert offenders == []
    code = ("import importlib, pkgutil, sys, pipeline\n"
            "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'): importlib.import_module(m.name)\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {'slurm', 'jobs', 'submitit'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"pipeline/ pulled in: {out.stdout.strip()}"


def test_no_per_stage_branches_outside_the_registry_and_the_stage_modules():
    """No comparison against a stage's name (`stage == "pairs"`, `in ("sft", ...)`) in the glue."""
    names = set(STAGE_BY_NAME)
    files = [REPO / "launch.py", *sorted((REPO / "jobs").glob("*.py")),
             *[p for p in sorted((REPO / "pipeline").glob("*.py")) if p.name != "registry.py"]]
    branches = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for operand in [node.left, *node.comparators]:
                constants = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                hits = [c.value for c in constants if isinstance(c, ast.Constant) and c.value in names]
                branches += [f"{path.relative_to(REPO)}:{node.lineno}: {hit!r}" for hit in hits]
    assert branches == []


# ------------------------------------------------------------------ status: save-time budget
def test_status_warns_when_a_stop_save_used_more_than_half_of_the_warning_time(tmp_path):
    from pipeline.rundir.layout import atomic_write_json

    layout = RunLayout(tmp_path / "run")
    save_config(resolve_config("tiny"), layout)  # tiny: signal_lead_s=30
    dpo = STAGE_BY_NAME["dpo"]
    atomic_write_json(dpo.progress_path(layout, Arm(0.1)), {"step": 40, "total_steps": 75, "restarts": [],
                                                            "stop_save_s": 16.4, "last_save_s": 16.4})
    atomic_write_json(dpo.progress_path(layout, Arm(1.0)), {"step": 40, "total_steps": 75, "restarts": [],
                                                            "stop_save_s": 14.0})
    proc = launch("status", "--run-dir", str(layout.root))
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: dpo[0.1]: the checkpoint saved at its last stop took 16 s, more than half of "
                        "slurm.dpo.signal_lead_s=30; raise signal_lead_s so the next stop-save finishes before the "
                        "time limit"]
    rows = {(r["stage"], r["task"]): r for r in json.loads(launch("status", "--run-dir", str(layout.root),
                                                                  "--json").stdout)}
    assert rows[("dpo", "0.1")]["stop_save_s"] == 16.4 and rows[("dpo", "1.0")]["warnings"] == []
