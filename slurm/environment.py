"""What a running job knows about itself from SLURM's environment, and requeueing itself."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class JobContext:
    job_id: str | None          # "123", or "123_4" for array task 4: the id `scontrol requeue` takes
    restart_count: int          # SLURM_RESTART_COUNT: 0 on the first run, +1 per requeue
    global_rank: int
    local_rank: int
    world_size: int
    nodelist: str = ""          # SLURM_JOB_NODELIST, e.g. "gpu[01-02]"

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
                      world_size=int(env.get("SLURM_NTASKS") or 1), nodelist=env.get("SLURM_JOB_NODELIST", ""))


def allocation(environ: dict | None = None) -> dict:
    """What this SLURM job was allocated, for its cost record: nodes, GPUs and CPUs of the whole job.

    GPUs: SLURM_GPUS_ON_NODE (set with --gpus-per-node) x nodes; CPUs: CPUs per task x tasks."""
    env = os.environ if environ is None else environ
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus_on_node = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "0"
    gpus = int(gpus_on_node.split(":")[-1]) if gpus_on_node.split(":")[-1].isdigit() else 0
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or 1) * int(env.get("SLURM_NTASKS") or 1)
    return {"nodes": nodes, "gpus": gpus * nodes, "cpus": cpus}


def requeue(job_id: str, runner=subprocess.run) -> None:
    """Put a running job back in the queue under the same id (it restarts from its checkpoint)."""
    proc = runner(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {proc.stderr.strip() or proc.stdout.strip()} "
                           "(the cluster needs JobRequeue=1 or the job --requeue)")


def slurmd_timeout_s(runner=subprocess.run, default: int = 300) -> int:
    """The cluster's SlurmdTimeout: how long the controller waits before marking a silent node DOWN."""
    try:
        out = runner(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return default
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "SlurmdTimeout":
            digits = value.strip().split()[0] if value.strip() else ""
            return int(digits) if digits.isdigit() else default
    return default


def failed_nodes(nodelist: str, runner=subprocess.run) -> list[str]:
    """Nodes of `nodelist` the controller sees as not responding (`*`), DOWN or failing."""
    try:
        out = runner(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N %T"], capture_output=True, text=True,
                     timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    failed = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and (parts[1].endswith("*") or parts[1].startswith(("down", "fail"))):
            failed.append(parts[0])
    return sorted(set(failed))


def wait_for_node_failure(nodelist: str, within_s: float, runner=subprocess.run, sleep=time.sleep,
                          clock=time.monotonic) -> list[str]:
    """Poll the controller for up to `within_s` seconds; return the job's nodes it sees failing.

    A rank whose peer vanished cannot tell a killed process from a dead node. A dead node is for
    SLURM to handle: it ends the job NODE_FAIL and requeues it (--requeue) once the node is DOWN;
    a `scontrol requeue` before that restarts the job with an allocation whose GPUs (GRES) cannot
    be used by `srun` ("Invalid generic resource specification", Slurm 22.05).
    """
    deadline = clock() + within_s
    while True:
        failed = failed_nodes(nodelist, runner)
        if failed or clock() >= deadline:
            return failed
        sleep(2)


def cpu_share(environ: dict | None = None, bound_cpus: set[int] | None = None) -> int:
    """How many CPUs this task may use: the CPUs it is bound to (`sched_getaffinity`), capped by its
    --cpus-per-task. Where the site binds tasks (task/affinity, cgroups) the binding decides; where
    it does not, a task sees the whole node and --cpus-per-task is its share."""
    env = os.environ if environ is None else environ
    bound = len(os.sched_getaffinity(0) if bound_cpus is None else bound_cpus)
    asked = int(env.get("SLURM_CPUS_PER_TASK") or 0)
    return max(1, min(bound, asked) if asked else bound)


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
