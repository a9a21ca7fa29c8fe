"""Big sweeps stay readable: `run --dry-run` and `status` give a stage of many tasks one line, with the arms
as method x strengths x seeds and the count per state, and expand it on request (`status --all`, `--task`)."""
import json

from conftest import launch
from jobs.config import resolve_config, save_config
from jobs.summary import describe_tasks, job_ids_line, select_rows, summarise_rows
from pipeline.registry import Arm, Shard
from pipeline.rundir.layout import RunLayout

SEEDS = "sweep.seeds=[" + ",".join(map(str, range(20))) + "]"
BETAS = "dpo.betas=[0.01,0.02,0.05,0.1,0.2,0.3,0.5,0.7,1.0,2.0]"
BIG = ["--set", SEEDS, "--set", BETAS, "--set", "sweep.methods=[dpo,ipo,hinge]"]  # 600 arms
SMALL = ["--set", "sweep.seeds=[0,1,2]", "--set", "dpo.betas=[0.1,1.0]", "--set", "sweep.methods=[dpo,ipo]"]  # 12


def test_describe_lists_few_tasks_and_summarises_many():
    assert describe_tasks([Arm(0.05), Arm(0.1), Arm(1.0)]) == "0.05, 0.1, 1.0"  # as before for small sweeps
    arms = [Arm(b, m, s) for m in ("dpo", "ipo") for b in (0.1, 0.5, 1.0, 2.0) for s in range(5)]
    arms += [Arm(0.5, "hinge", s) for s in (0, 1)]
    assert describe_tasks(arms) == ("42 arms: {dpo, ipo} x 4 strengths (0.1 .. 2.0) x 5 seeds (0 .. 4); "
                                    "hinge x 1 strength (0.5) x 2 seeds (0, 1)")
    ragged = [Arm(0.1, "ipo", 0), Arm(0.2, "ipo", 1)] + [Arm(b) for b in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]
    assert describe_tasks(ragged) == "9 arms: ipo (2 arms); dpo x 7 strengths (0.1 .. 0.7)"
    assert describe_tasks([Shard(i) for i in range(64)]) == "64 tasks: 0, 1, 2 .. 63"


def _dry_run(tmp_path, name, sets):
    proc = launch("run", "--preset", "tiny", "--run-dir", str(tmp_path / name), "--executor", "slurm", "--dry-run",
                  *sets, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / name).exists()
    return proc.stdout.splitlines()


def test_a_600_arm_dry_run_prints_a_few_lines_per_stage(tmp_path):
    big, small = _dry_run(tmp_path, "big", BIG), _dry_run(tmp_path, "small", SMALL)
    headers = [line for line in big if line.startswith("# ---- stage ")]
    assert [h.split()[3] for h in headers] == ["sft", "pairs", "pairs_merge", "dpo", "eval_sft", "eval_arms", "eval"]
    dpo = next(h for h in headers if h.split()[3] == "dpo")
    assert dpo == "# ---- stage dpo tasks 600 arms: {dpo, ipo, hinge} x 10 strengths (0.01 .. 2.0) x 20 seeds (0 .. 19)"
    assert "#SBATCH --array=0-599%16" in big
    # 600 arms print exactly as many lines as 12, none longer: the scripts do not grow with the sweep
    assert len(big) == len(small) and len(big) / len(headers) < 25
    assert max(map(len, big)) <= max(map(len, small)) and max(map(len, headers)) < 120


def test_status_summarises_a_big_sweep_and_expands_on_request(tmp_path):
    cfg = resolve_config("tiny", sets=[SEEDS, BETAS, "sweep.methods=[dpo,ipo,hinge]"])
    save_config(cfg, RunLayout(tmp_path))
    proc = launch("status", "--run-dir", str(tmp_path))
    lines = proc.stdout.splitlines()
    assert len(lines) <= 12, proc.stdout  # the path, the header, one row per stage, the note
    dpo = next(line for line in lines if line.startswith("dpo "))
    assert "600 arms: {dpo, ipo, hinge} x 10 strengths (0.01 .. 2.0) x 20 seeds (0 .. 19)" in dpo
    assert "NOT_SUBMITTED 600" in dpo
    assert "1200 task rows summarised; `status --all` lists them" in lines[-1]

    every = launch("status", "--run-dir", str(tmp_path), "--all").stdout.splitlines()
    assert len([line for line in every if line.startswith("dpo ")]) == 600
    some = launch("status", "--run-dir", str(tmp_path), "--task", "ipo:*:seed3").stdout.splitlines()
    keys = [f"ipo:{b}:seed3" for b in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0)]
    assert sorted((line.split()[0], line.split()[1]) for line in some[2:] if not line.startswith("cost ")) == sorted(
        (stage, key) for stage in ("dpo", "eval_arms") for key in keys)  # one row each, in both stages
    rows = json.loads(launch("status", "--run-dir", str(tmp_path), "--json", "--task", "dpo").stdout)
    assert len(rows) == 600 and {r["stage"] for r in rows} == {"dpo"}
    bad = launch("status", "--run-dir", str(tmp_path), "--task", "nosuch:*", check=False)
    assert bad.returncode == 2 and "--task 'nosuch:*' matches no task of the run; its tasks are" in bad.stderr


def test_summarised_rows_count_states_and_sum_steps():
    rows = [{"stage": "dpo", "task": Arm(0.1, "dpo", s).key, "job_id": f"7_{s}", "state": state, "done": False,
             "step": step, "total_steps": 10, "restarts": s % 2, "resumed_from": [], "lost_steps": 1, "warnings": []}
            for s, (state, step) in enumerate([("RUNNING", 3)] * 4 + [("PENDING", None)] * 5 + [("FAILED", 2)])]
    (row,) = summarise_rows(rows)
    assert row["state"] == "PENDING 5, RUNNING 4, FAILED 1" and row["job_id"] == "7"
    assert (row["step"], row["total_steps"], row["restarts"], row["lost_steps"]) == (14, 100, 5, 10)
    assert row["task"] == "10 arms: dpo x 1 strength (0.1) x 10 seeds (0 .. 9)" and row["summarised"] == 10
    assert [r["task"] for r in select_rows(rows, "*:seed[13]")] == ["dpo:0.1:seed1", "dpo:0.1:seed3"]
    assert len(select_rows(rows, "dpo:0.1:*")) == 10


def test_cancel_names_few_ids_and_the_arrays_of_many():
    assert job_ids_line(["19", "20_0", "20_1"]) == "19 20_0 20_1"
    assert job_ids_line(["19", "20_0", "20_1"] + [f"22_{i}" for i in range(600)]) == "jobs and arrays 19 20 22"
