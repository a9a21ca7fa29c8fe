"""Several processes per stage: DeepSpeed ZeRO config generation, and real 2-process CPU runs (gloo)."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clone_before_dpo, max_weight_difference, wait_for_step
from jobs.config import resolve_config
from pipeline.runtime.distributed import deepspeed_config

# ------------------------------------------------------------------ config generation and validation


@pytest.mark.parametrize("world_size, micro, accum", [(1, 8, 1), (2, 8, 1), (8, 4, 2), (16, 1, 8)])
def test_deepspeed_batch_sizes_agree_with_the_world_size(world_size, micro, accum):
    ds = deepspeed_config(2, "none", micro, accum, world_size, bf16=True, fp16=False)
    assert ds["train_batch_size"] == micro * accum * world_size
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": True}
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_zero3_with_offload_gathers_weights_for_saving():
    ds = deepspeed_config(3, "optimizer+params", 2, 1, 4, bf16=False, fp16=False)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("sets, message", [
    (["distributed.zero_stage=1"], "distributed.zero_stage: 1 is not one of 0, 2, 3"),
    (["distributed.offload=params"], "distributed.offload: 'params' is not one of"),
    (["distributed.zero_stage=0", "distributed.offload=optimizer"], "distributed.offload: CPU offload needs distributed.zero_stage=2 or 3"),
    (["distributed.zero_stage=2", "distributed.offload=optimizer+params"],
     "distributed.offload: parameter offload needs distributed.zero_stage=3"),
    (["slurm.pairs.gpus_per_node=2"], "slurm.pairs: one node and at most one GPU per job"),
    (["slurm.eval.nodes=2"], "slurm.eval: one node and at most one GPU per job"),
])
def test_bad_distributed_settings_are_refused(sets, message):
    with pytest.raises(ValueError) as info:
        resolve_config("gpt2-large", sets=sets)
    assert str(info.value).startswith(message), str(info.value)


def test_gpt2_large_defaults_to_zero2():
    assert resolve_config("gpt2-large").distributed.zero_stage == 2


# ------------------------------------------------------------------ real 2-process runs on the CPU
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(run_dir: Path, stage: str, task: str, world_size: int = 2) -> list[subprocess.Popen]:
    """The job callable once per rank, with the environment jobs/ exports from SLURM."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from jobs.stages import StageJob; "
            "StageJob(sys.argv[2], sys.argv[3], sys.argv[4], time_limit_s=600, signal_lead_s=60)()")
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(REPO), str(run_dir), stage, task], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> None:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def kill_ranks_after(run_dir: Path, step: int) -> None:
    """Two ranks of DPO beta=0.1, SIGKILLed (no warning, no save) once `step` is reached."""
    procs = start_ranks(run_dir, "dpo", "0.1")
    wait_for_step(run_dir / "dpo" / "beta-0.1" / "progress.json", step, procs[0], timeout=600)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()


@pytest.fixture(scope="module")
def zero2_reference(tiny_run, tmp_path_factory):
    run_dir = clone_before_dpo(tiny_run, tmp_path_factory.mktemp("z2") / "run", distributed={"zero_stage": 2})
    finish(start_ranks(run_dir, "dpo", "0.1"))
    return run_dir


@pytest.mark.slow
def test_zero2_two_processes_train_and_record_the_deepspeed_config(zero2_reference):
    stage_dir = zero2_reference / "dpo" / "beta-0.1"
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    ds = json.loads((stage_dir / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 2 * ds["train_micro_batch_size_per_gpu"]
    pairs = manifest["inputs"]["num_pairs"]
    assert manifest["metrics"]["global_step"] == math.ceil(math.ceil(pairs / 2) / 16)  # ranks split, then batch
    newest = max((stage_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shards = sorted(p.name for p in newest.glob("global_step*/*optim_states*"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # one per rank


@pytest.mark.slow
def test_zero2_killed_ranks_resume_exactly(tiny_run, zero2_reference, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", distributed={"zero_stage": 2})
    stage_dir = run_dir / "dpo" / "beta-0.1"
    kill_ranks_after(run_dir, 27)
    finish(start_ranks(run_dir, "dpo", "0.1"))
    (restart,) = json.loads((stage_dir / "DONE.json").read_text())["restarts"]
    assert restart["resumed_from_step"] == 25 and restart["cause"] == "killed"
    assert max_weight_difference(stage_dir / "final", zero2_reference / "dpo" / "beta-0.1" / "final") <= 1e-6


@pytest.mark.slow
def test_zero3_killed_ranks_resume_and_match_zero2(tiny_run, zero2_reference, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", distributed={"zero_stage": 3})
    stage_dir = run_dir / "dpo" / "beta-0.1"
    kill_ranks_after(run_dir, 27)
    finish(start_ranks(run_dir, "dpo", "0.1"))
    assert json.loads((stage_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    (restart,) = json.loads((stage_dir / "DONE.json").read_text())["restarts"]
    assert restart["resumed_from_step"] == 25
    # same data and optimiser, different reduction order: equal up to float32 rounding drift
    assert max_weight_difference(stage_dir / "final", zero2_reference / "dpo" / "beta-0.1" / "final") < 1e-3


@pytest.mark.slow
def test_zero2_resumes_on_a_different_process_count_via_a_universal_checkpoint(tiny_run, zero2_reference, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", distributed={"zero_stage": 2})
    stage_dir = run_dir / "dpo" / "beta-0.1"
    kill_ranks_after(run_dir, 27)
    finish(start_ranks(run_dir, "dpo", "0.1", world_size=1))  # resubmitted with half the GPUs
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    (restart,) = manifest["restarts"]
    assert restart["resumed_from_step"] == 25 and restart["world_size"] == 1 and restart["universal_checkpoint"]
    assert (stage_dir / "checkpoints" / "checkpoint-25" / "latest_universal").read_text() == "global_step25_universal"
    # the step continues (not restarted): 25 steps of 2x16 pairs, then the rest of the epoch at 16 per step
    pairs = manifest["inputs"]["num_pairs"]
    assert manifest["metrics"]["global_step"] == math.ceil(pairs / 16)
    trainer_state = json.loads((stage_dir / "checkpoints" / f"checkpoint-{manifest['metrics']['global_step']}"
                                / "trainer_state.json").read_text())
    logged = [e["step"] for e in trainer_state["log_history"] if "loss" in e]
    assert logged[0] == 1 and min(s for s in logged if s > 25) <= 30  # logs continue after step 25
    assert manifest["metrics"]["rewards/accuracies"] > 0.5
