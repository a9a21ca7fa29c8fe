"""Shared fixtures. Tests run single-threaded per process: CI has 2 cores and runs jobs beside them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def launch(*args: str, check: bool = True, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` the way a user does; returns the finished process."""
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole tiny pipeline, run once locally (submitit LocalExecutor jobs) and shared by tests."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local",
           "--set", "num_threads=1")
    return run_dir


@pytest.fixture(scope="session")
def slurm_cluster():
    """The project's real single-node SLURM cluster (started by slurm/cluster/start.sh when needed)."""
    import shutil

    def controller_up() -> bool:
        if not shutil.which("scontrol"):
            return False
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        return ping.returncode == 0 and "UP" in ping.stdout

    if not controller_up():
        if os.geteuid() != 0:
            pytest.skip("no SLURM controller and not root: start one with `sudo bash slurm/cluster/start.sh`")
        proc = subprocess.run(["bash", str(REPO / "slurm" / "cluster" / "start.sh")], capture_output=True, text=True)
        if proc.returncode != 0 or not controller_up():
            raise RuntimeError(f"slurm/cluster/start.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return True
