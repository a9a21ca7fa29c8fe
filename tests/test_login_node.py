"""A login node never trains by accident: GPU configs are refused where they would run on a CPU.

This machine has no GPU, and the tests hide `sbatch` by giving `launch.py` a PATH without it (the
state of a login node where the SLURM module is not loaded).
"""
import shutil
import sys

import pytest

from conftest import launch
from slurm import submit

pytestmark = pytest.mark.skipif(submit.count_gpus() > 0, reason="these refusals are about machines without a GPU")


@pytest.fixture
def path_without_sbatch(tmp_path) -> dict:
    """A PATH with python and git only: no SLURM commands (they sit in /usr/bin on the test machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "python3"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "python").symlink_to(sys.executable)
    assert shutil.which("sbatch", path=str(bin_dir)) is None
    return {"PATH": str(bin_dir)}


def test_auto_without_sbatch_refuses_a_gpu_config(tmp_path, path_without_sbatch):
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "gpt2-large", "--run-dir", str(run_dir), check=False, env=path_without_sbatch)
    assert proc.returncode == 2, proc.stderr
    assert "--executor auto found no `sbatch` on the PATH" in proc.stderr
    assert "slurm.dpo, slurm.eval, slurm.pairs, slurm.sft ask for GPUs" in proc.stderr
    assert "Load it (e.g. `module load slurm`)" in proc.stderr and "--executor local" in proc.stderr
    assert not run_dir.exists()


def test_auto_without_sbatch_runs_a_cpu_config_here(tmp_path, path_without_sbatch):
    proc = launch("run", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--dry-run", env=path_without_sbatch)
    assert proc.returncode == 0 and "# ---- stage sft" in proc.stdout


def test_local_without_a_gpu_refuses_a_gpu_preset_unless_device_cpu(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "gpt2-large", "--run-dir", str(run_dir), "--executor", "local", check=False)
    assert proc.returncode == 2
    assert "--executor local: this machine has no GPU and the config needs one (device=auto" in proc.stderr
    assert "--set device=cpu" in proc.stderr and not run_dir.exists()
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set", "device=cuda",
                  "--dry-run", check=False)
    assert proc.returncode == 2 and "(device=cuda)" in proc.stderr
    # on purpose: device=cpu passes the check (a dry run, so nothing is downloaded or trained)
    proc = launch("run", "--preset", "gpt2-large", "--run-dir", str(run_dir), "--executor", "local",
                  "--set", "device=cpu", "--dry-run")
    assert "# ---- stage sft" in proc.stdout and not run_dir.exists()
