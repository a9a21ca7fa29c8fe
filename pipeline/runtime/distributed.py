"""Multi-process training: process-group set-up from the standard torch environment variables, and
the DeepSpeed ZeRO config.

The scheduler side (`jobs/`, from SLURM) exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT before a stage starts; here they are only read. With WORLD_SIZE unset or 1 everything
is a no-op, so the same stage code runs single-process, under DDP, or under ZeRO-2/3.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.rundir.layout import atomic_write_json


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    return World(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                 size=int(os.environ.get("WORLD_SIZE", 1)))


def cuda_device_index(local_rank: int, visible_gpus: int) -> int:
    """Which visible GPU a rank uses, whether its task sees every GPU of the node or only its own.

    Sites differ: without binding each task sees all of the node's GPUs and picks LOCAL_RANK; with
    `ConstrainDevices=yes` or `--gpu-bind=single:1` a task sees exactly one, its own, as device 0.
    """
    if visible_gpus < 1:
        raise RuntimeError("this process sees no GPU (CUDA_VISIBLE_DEVICES / the site's device binding); ask for "
                           "GPUs with slurm.<stage>.gpus_per_node or use --set device=cpu")
    if visible_gpus == 1:
        return 0
    if local_rank < visible_gpus:
        return local_rank
    raise RuntimeError(f"LOCAL_RANK={local_rank} but this task sees only {visible_gpus} GPUs: the job has more tasks "
                       "per node than GPUs; keep one task per GPU (slurm.<stage>.gpus_per_node)")


def init(device_type: str, deepspeed: bool = False) -> World:
    """Create the process group (gloo on CPU, nccl on GPUs) before any Trainer exists.

    Initialising accelerate's PartialState first matters on CPU: left to itself it comes up
    without a backend and every rank believes it is rank 0. Under ZeRO the state must be made
    for DeepSpeed (accelerate reads that from the environment), also for a single process,
    which then needs the rendezvous variables too (DeepSpeed otherwise tries MPI discovery).
    """
    if deepspeed and "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    current = world()
    if current.distributed or deepspeed:
        from accelerate import PartialState

        if deepspeed:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if device_type == "cuda":
            import torch

            torch.cuda.set_device(cuda_device_index(current.local_rank, torch.cuda.device_count()))
        PartialState(backend="nccl" if device_type == "cuda" else "gloo")
    return current


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def deepspeed_config(zero_stage: int, offload: str, micro_batch: int, grad_accum: int, world_size: int,
                     bf16: bool, fp16: bool, grad_clip: float = 1.0) -> dict:
    """A DeepSpeed config whose batch sizes agree with the world size (DeepSpeed refuses others).

    `offload`: none | optimizer | optimizer+params (params only with ZeRO-3).
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"distributed.zero_stage={zero_stage}: a DeepSpeed config exists for 2 or 3 only")
    zero: dict = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e7}
    if zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": 5e7,
                     "stage3_param_persistence_threshold": 1e5})
    if offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(path: Path, config: dict) -> str:
    """Written into the stage directory (rank 0) so the run records exactly what DeepSpeed got."""
    if world().is_main:
        atomic_write_json(path, config)
    barrier()
    return str(path)
