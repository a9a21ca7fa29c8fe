"""GPU selection works whether a task sees all of its node's GPUs or only its own."""
import pytest

from pipeline.runtime.distributed import cuda_device_index


@pytest.mark.parametrize("local_rank, visible, expected", [
    (0, 4, 0), (3, 4, 3),   # no binding: every task sees the node's 4 GPUs, picks its LOCAL_RANK
    (0, 1, 0), (3, 1, 0),   # ConstrainDevices / --gpu-bind=single:1: each task sees only its own GPU
    (1, 2, 1),              # 2 tasks on a node of 2 GPUs
])
def test_each_rank_gets_a_gpu_it_can_see(local_rank, visible, expected):
    assert cuda_device_index(local_rank, visible) == expected


def test_more_tasks_than_visible_gpus_is_refused():
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but this task sees only 2 GPUs"):
        cuda_device_index(3, 2)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        cuda_device_index(0, 0)


def test_resolve_device_follows_the_rule(monkeypatch):
    """With fake device counts: rank 3 of a node whose task sees only its own GPU uses cuda:0."""
    import torch

    from pipeline.config import PipelineConfig
    from pipeline.models.policy import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(PipelineConfig(device="cuda")) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device(PipelineConfig(device="cuda")) == torch.device("cuda", 3)


# ------------------------------------------------------------------ CPUs
from slurm.environment import cpu_share  # noqa: E402


@pytest.mark.parametrize("cpus_per_task, bound, expected", [
    ("8", set(range(64)), 8),    # no binding (task/none): the task sees the node; its share is --cpus-per-task
    ("8", {4, 5, 6, 7}, 4),      # bound to fewer CPUs than asked (srun without --cpus-per-task): what it has
    ("2", {0, 1}, 2),            # bound to exactly its share
    (None, {0, 1, 2}, 3),        # no --cpus-per-task in the environment: the CPUs it is bound to
])
def test_a_task_uses_the_cpus_it_is_bound_to_capped_by_its_share(cpus_per_task, bound, expected):
    env = {} if cpus_per_task is None else {"SLURM_CPUS_PER_TASK": cpus_per_task}
    assert cpu_share(env, bound) == expected


def test_a_job_sets_torch_threads_to_its_share_not_the_login_shells(monkeypatch, tmp_path):
    """sbatch exports the submitting shell's OMP_NUM_THREADS; inside a job the task's share wins."""
    import os

    from jobs import stages

    monkeypatch.setenv("OMP_NUM_THREADS", "32")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    seen = {}
    monkeypatch.setattr(stages, "run_stage", lambda *a: seen.setdefault("threads", os.environ["OMP_NUM_THREADS"]))
    stages.StageJob(tmp_path, "sft")()
    assert seen == {"threads": "1"}
