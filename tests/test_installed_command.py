"""`pip install -e .` gives the `slurm-dpo` command: the same CLI as `python launch.py`, run from anywhere."""
import json
import subprocess
import sys
import sysconfig
from importlib.metadata import version

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def slurm_dpo(tmp_path_factory):
    """A throwaway virtualenv that sees this venv's packages and gets the project installed as .ci/setup does
    (`pip install -e .`, without re-downloading the dependencies); returns the path of its `slurm-dpo`."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (venv.joinpath(site) / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-build-isolation", "-e", str(REPO)], check=True, capture_output=True)
    return venv / "bin" / "slurm-dpo"


def test_version_comes_from_the_package_metadata(slurm_dpo, tmp_path):
    proc = subprocess.run([str(slurm_dpo), "--version"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == f"slurm-dpo {version('slurm-dpo')}"


def test_installed_command_runs_the_tiny_sft_from_another_directory(slurm_dpo, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--preset", "tiny", "--executor", "local", "--run-dir", str(run_dir),
              "--set", "data.max_train_examples=64"]
    dry = subprocess.run([str(slurm_dpo), "run", *common, "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "sft" in dry.stdout and not run_dir.exists()  # a dry run writes nothing
    proc = subprocess.run([str(slurm_dpo), "run", *common, "--until", "sft"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    done = json.loads((run_dir / "sft" / "DONE.json").read_text())
    assert done["config"]["data"]["max_train_examples"] == 64
    assert not (run_dir / "dpo").exists()  # --until sft stopped there
    bad = subprocess.run([str(slurm_dpo), "run", "--preset", "tiny", "--run-dir", str(tmp_path / "bad"),
                          "--set", "dpo.betas=[-1]"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "dpo.betas[0]" in bad.stderr and not (tmp_path / "bad").exists()
