"""CPU binding on a cluster that binds tasks to CPUs (TaskPlugin=task/affinity, as most sites run).

Each rank of a stage job must see the CPUs its job asked for (`--cpus-per-task`; Slurm 22.05-23.02's
srun does not inherit it from the batch script, so the generated srun line passes it) and run that
many torch threads, whatever OMP_NUM_THREADS the submitting shell had. The test cluster is
restarted with task/affinity for this module (its nodes then advertise the host's real CPUs, the
ids binding needs) and restored afterwards.
"""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import REPO, clone_before_dpo, launch
from test_slurm_requeue import sacct_history, submitted_job, wait_for_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

START = REPO / "slurm" / "cluster" / "start.sh"
PROCESS_LINE = re.compile(r"process: rank (\d+) of (\d+) on \S+: (\d+) CPU\(s\) (\S+), torch threads (\d+)")


def restart_cluster(task_plugin: str) -> None:
    """Restart the test cluster's daemons with `task_plugin` (state kept) once no job is left."""
    deadline = time.time() + 300
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "jobs still queued; cannot restart the cluster"
        time.sleep(2)
    subprocess.run(["bash", str(START)], env={**os.environ, "SLURM_DPO_TASK_PLUGIN": task_plugin},
                   capture_output=True, text=True, timeout=300, check=True)
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^TaskPlugin\s*=\s*{task_plugin}\s*$", config, re.M), config


@pytest.fixture(scope="module")
def affinity_cluster(slurm_cluster):
    restart_cluster("task/affinity")
    try:
        yield os.cpu_count()
    finally:
        subprocess.run(["scancel", "-u", "root"], capture_output=True)
        restart_cluster("task/none")


def process_lines(run_dir, job_id: str) -> list[tuple[int, int, int, str, int]]:
    """(rank, world, CPU count, CPU list, torch threads) from each task's log, by rank."""
    found = []
    for log in sorted((run_dir / "jobs" / "sft").glob(f"{job_id}_*_log.out")):
        found += [(int(r), int(w), int(n), cpus, int(t)) for r, w, n, cpus, t in PROCESS_LINE.findall(log.read_text())]
    return sorted(found)


def test_each_rank_gets_its_cpus_and_as_many_torch_threads(tiny_run, tmp_path, affinity_cluster):
    host_cpus = affinity_cluster
    assert host_cpus >= 2, "needs a host with at least 2 CPUs"
    # two SFT jobs at once, one node each: 2 ranks x 1 CPU (several tasks on a node), 1 rank x 2 CPUs;
    # the pytest process exports OMP_NUM_THREADS=1 (conftest), which sbatch passes to the jobs
    shapes = {"two_ranks": {"gpus_per_node": 2, "cpus_per_task": 1},
              "two_cpus": {"gpus_per_node": 1, "cpus_per_task": 2}}
    runs = {}
    for name, shape in shapes.items():
        run_dir = clone_before_dpo(tiny_run, tmp_path / name, stages=("data",), num_threads=None,
                                   sft={"epochs": 0.25}, distributed={"zero_stage": 0},
                                   slurm={"sft": {"time": "10", **shape}})
        launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "sft")
        runs[name] = (run_dir, submitted_job(run_dir, "sft"))
    for run_dir, job_id in runs.values():
        wait_for_file(run_dir / "sft" / "DONE.json", 600, job_id, run_dir)

    run_dir, job_id = runs["two_ranks"]
    (rank0, rank1) = process_lines(run_dir, job_id)
    assert [rank0[:3], rank1[:3]] == [(0, 2, 1), (1, 2, 1)]  # each rank bound to one CPU ...
    assert rank0[3] != rank1[3]                              # ... a different one
    assert rank0[4] == rank1[4] == 1                         # and one torch thread each
    assert json.loads((run_dir / "sft" / "DONE.json").read_text())["metrics"]["global_step"] > 0

    run_dir, job_id = runs["two_cpus"]
    ((rank, world, count, cpus, threads),) = process_lines(run_dir, job_id)
    assert (rank, world, count, threads) == (0, 1, 2, 2), (cpus, threads)  # both CPUs, two threads (not the shell's 1)
    for _, job_id in runs.values():  # DONE.json is written just before the job ends
        deadline = time.time() + 60
        while (states := [state for _, state in sacct_history(job_id)]) in (["RUNNING"], ["COMPLETING"]):
            assert time.time() < deadline, states
            time.sleep(1)
        assert states == ["COMPLETED"], states
