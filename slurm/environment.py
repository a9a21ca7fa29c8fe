"""What a running job knows about itself from SLURM's environment, and requeueing itself."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class JobContext:
    job_id: str | None          # "123", or "123_4" for array task 4: the id `scontrol requeue` takes
    restart_count: int          # SLURM_RESTART_COUNT: 0 on the first run, +1 per requeue
    global_rank: int
    local_rank: int
    world_size: int

    @property
    def in_slurm(self) -> bool:
        return self.job_id is not None


def current_job(environ: dict | None = None) -> JobContext:
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return JobContext(job_id=job_id, restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
                      global_rank=int(env.get("SLURM_PROCID") or 0), local_rank=int(env.get("SLURM_LOCALID") or 0),
                      world_size=int(env.get("SLURM_NTASKS") or 1))


def requeue(job_id: str, runner=subprocess.run) -> None:
    """Put a running job back in the queue under the same id (it restarts from its checkpoint)."""
    proc = runner(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {proc.stderr.strip() or proc.stdout.strip()} "
                           "(the cluster needs JobRequeue=1 or the job --requeue)")


def export_torch_distributed(environ: dict | None = None) -> bool:
    """With several tasks, export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (the allocation's first
    node) and MASTER_PORT (derived from the job id) for torch.distributed; returns whether it did.

    Each task keeps every GPU of its node visible and picks its own from LOCAL_RANK.
    """
    env = os.environ if environ is None else environ
    if int(env.get("SLURM_NTASKS") or 1) <= 1:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True
