"""GPU selection works whether a task sees all of its node's GPUs or only its own."""
import pytest

from pipeline.distributed import cuda_device_index


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
    from pipeline.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(PipelineConfig(device="cuda")) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device(PipelineConfig(device="cuda")) == torch.device("cuda", 3)
