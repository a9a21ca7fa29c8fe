"""slurm.container and slurm.<stage>.srun_args: validation, one golden sbatch script per runtime, and a
real stage run on the cluster through the apptainer path with a stand-in `apptainer` on the PATH
(neither pyxis/enroot nor Apptainer can be installed on the project's machines)."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from submitit.slurm import slurm as submitit_slurm

from conftest import REPO, launch
from slurm import submit
from slurm.container import ContainerConfig
from slurm.resources import SlurmResources
from test_slurm_resources import GOLDEN, GOLDEN_FOLDER, GOLDEN_RESOURCES, UPDATE_GOLDEN_ENV

BINDS = ["/shared/runs/dpo", "/shared/repo", "/shared/hf/hub"]
GOLDEN_CONTAINERS = {
    "pyxis": dict(runtime="pyxis", image="nvcr.io#nvidia/pytorch:24.05-py3", mounts=["/scratch", "/data/ds:/datasets"],
                  extra_args=["--container-remap-root"]),
    "apptainer": dict(runtime="apptainer", image="/shared/images/dpo.sif", mounts=["/scratch"],
                      extra_args=["--cleanenv"]),
}


def render(container: ContainerConfig | None, **resources) -> str:
    return submit.render_sbatch(SlurmResources(**{**GOLDEN_RESOURCES, **resources}), GOLDEN_FOLDER, "dpo",
                                array_size=3, dependencies=["101"], python="python", container=container,
                                binds=BINDS, workdir="/shared/repo")


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("fields, message", [
    ({"runtime": "docker"}, r"^slurm\.container\.runtime: 'docker' is not a container runtime; valid: none, pyxis, "
                            r"apptainer$"),
    ({"runtime": "pyxis"}, r"^slurm\.container\.image: runtime 'pyxis' needs an image; set slurm\.container\.image"),
    ({"runtime": "apptainer"}, r"^slurm\.container\.image: runtime 'apptainer' needs an image"),
    ({"image": "x.sif", "mounts": ["data"]}, r"^slurm\.container\.mounts\[0\]: 'data' has characters.*absolute paths"),
    ({"image": "x.sif", "mounts": ["/a:rel"]}, r"^slurm\.container\.mounts\[0\]: 'rel' has characters"),
    ({"image": "x.sif", "mounts": ["/a;rm"]}, r"^slurm\.container\.mounts\[0\]: '/a;rm' contains ';'"),
    ({"image": "x.sif", "mounts": "/a"}, r"^slurm\.container\.mounts: expected a list"),
    ({"image": "x $(id).sif"}, r"^slurm\.container\.image: 'x \$\(id\)\.sif' has characters refused"),
    ({"image": "x.sif", "python": "python3; id"}, r"^slurm\.container\.python: 'python3; id' contains ';'"),
    ({"runtime": "apptainer", "image": "x.sif", "extra_args": ["--nv"]},
     r"^slurm\.container\.extra_args\[0\]: --nv is set already; use gpus_per_node"),
    ({"image": "x.sif", "extra_args": ["-x"]}, r"^slurm\.container\.extra_args\[0\]: '-x' has characters"),
])
def test_container_fields_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        ContainerConfig(**fields)


@pytest.mark.parametrize("args, message", [
    (["--mpi=pmix", "--x`id`"], r"^slurm\.dpo\.srun_args\[1\]: '--x`id`' contains a backtick"),
    (["--a=$(id)"], r"^slurm\.dpo\.srun_args\[0\]: '--a=\$\(id\)' contains '\$\('"),
    (["--a\n#SBATCH"], r"^slurm\.dpo\.srun_args\[0\]: .* contains a newline"),
    (["--cpus-per-task=4"], r"^slurm\.dpo\.srun_args\[0\]: --cpus-per-task is set already; use cpus_per_task"),
    (["--container-image=x"], r"^slurm\.dpo\.srun_args\[0\]: --container-image is set already; use slurm\.container"),
    ("--mpi=pmix", r"^slurm\.dpo\.srun_args: expected a list"),
])
def test_srun_args_are_validated(args, message):
    with pytest.raises(ValueError, match=message):
        SlurmResources(srun_args=args, _where="slurm.dpo")


def test_config_layers_reach_the_container_section():
    from jobs.config import resolve_config
    cfg = resolve_config("tiny", sets=["slurm.container.runtime=pyxis", "slurm.container.image=img:1",
                                       "slurm.dpo.srun_args=[--mpi=pmix]"])
    assert (cfg.slurm.container.runtime, cfg.slurm.container.image, cfg.slurm.container.python) == \
        ("pyxis", "img:1", "python3")
    assert cfg.slurm.dpo.srun_args == ["--mpi=pmix"] and cfg.slurm.sft.srun_args == []
    with pytest.raises(ValueError, match=r"^slurm\.container\.image: runtime 'pyxis' needs an image"):
        resolve_config("tiny", sets=["slurm.container.runtime=pyxis"])


# ------------------------------------------------------------------ rendered scripts
def test_runtime_none_renders_the_unchanged_golden_script(monkeypatch):
    monkeypatch.setattr(submitit_slurm.SlurmJobEnvironment, "USR_SIG", "USR2")
    assert render(ContainerConfig()) == render(None) == GOLDEN.read_text()


@pytest.mark.parametrize("runtime", sorted(GOLDEN_CONTAINERS))
def test_render_sbatch_matches_golden_per_runtime(monkeypatch, runtime):
    monkeypatch.setattr(submitit_slurm.SlurmJobEnvironment, "USR_SIG", "USR2")
    golden = GOLDEN.with_name(f"sbatch_dpo_array_{runtime}.sh")
    text = render(ContainerConfig(**GOLDEN_CONTAINERS[runtime]), srun_args=["--mpi=pmix"])
    if os.environ.get(UPDATE_GOLDEN_ENV) == "1":
        golden.write_text(text)
    assert golden.is_file() and text == golden.read_text(), f"{golden} differs (or is missing):\n{text}"


def test_pyxis_flags_are_on_the_srun_line():
    srun = render(ContainerConfig(**GOLDEN_CONTAINERS["pyxis"]), srun_args=["--mpi=pmix"]).splitlines()[-1]
    assert srun.startswith("srun ") and srun.endswith(" python3 -u -m submitit.core._submit " + GOLDEN_FOLDER)
    words = srun.split()
    assert "'--container-image=nvcr.io#nvidia/pytorch:24.05-py3'" in words  # '#' quoted: no shell comment
    assert ("--container-mounts=/shared/runs/dpo:/shared/runs/dpo,/shared/repo:/shared/repo,"
            "/shared/hf/hub:/shared/hf/hub,/scratch:/scratch,/data/ds:/datasets") in words
    assert "--container-workdir=/shared/repo" in words and "--container-remap-root" in words
    assert "--mpi=pmix" in words and "--cpus-per-task=8" in words
    assert "# setup" not in render(ContainerConfig(**GOLDEN_CONTAINERS["pyxis"]))


def test_apptainer_runtime_is_found_at_run_time_and_gpu_flags_follow_gpus():
    gpu = render(ContainerConfig(**GOLDEN_CONTAINERS["apptainer"]))
    assert "command -v apptainer || command -v singularity" in gpu  # decided in the job, not at submit time
    assert ('"$SLURM_DPO_APPTAINER" exec --nv --bind /shared/runs/dpo,/shared/repo,/shared/hf/hub,/scratch '
            "--pwd /shared/repo --cleanenv /shared/images/dpo.sif python3 -u -m submitit.core._submit") in gpu
    cpu = render(ContainerConfig(**GOLDEN_CONTAINERS["apptainer"]), gpus_per_node=0)
    assert "--nv" not in cpu and '"$SLURM_DPO_APPTAINER" exec --bind ' in cpu
    # a bind inside another one (the HF cache in the run directory) is not bound twice
    nested = submit.render_sbatch(None, "/r/jobs/sft", "sft", container=ContainerConfig(image="/i.sif",
                                  runtime="apptainer"), binds=["/r", "/repo", "/r/cache/huggingface"], workdir="/repo")
    assert "--bind /r,/repo --pwd /repo" in nested


# ------------------------------------------------------------------ the real cluster, stand-in runtime
STANDIN = """#!/bin/bash
# stand-in for apptainer: record argv, then run what follows the image like `apptainer exec` would
printf '%s\\0' "$@" > "{log}.$SLURM_PROCID"
[ "$1" = exec ] || {{ echo "stand-in apptainer: only 'exec' is supported" >&2; exit 2; }}
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --pwd) cd "$2" || exit 3; shift 2 ;;
    --bind) shift 2 ;;
    --*) shift ;;
    *) shift; break ;;   # the image
  esac
done
exec "$@"
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_sft_completes_on_the_cluster_through_the_apptainer_path(slurm_cluster, tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(STANDIN.format(log=log))
    (bin_dir / "apptainer").chmod(0o755 | stat.S_IXUSR)
    run_dir, hf_cache = tmp_path / "run", tmp_path / "hf"
    launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "sft",
           "--set", "name=container-test", "--set", "sft.epochs=0.25", "--set", "slurm.sft.time=10",
           "--set", "slurm.container.runtime=apptainer", "--set", "slurm.container.image=/images/dpo.sif",
           "--set", f"slurm.container.python={sys.executable}", "--set", f"hub.cache_dir={hf_cache}",
           "--set", "slurm.sft.srun_args=[--kill-on-bad-exit=1]",
           env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=300)
    from test_slurm_requeue import submitted_job, wait_for_file
    job_id = submitted_job(run_dir, "sft")
    wait_for_file(run_dir / "sft" / "DONE.json", 600, job_id, run_dir)
    assert json.loads((run_dir / "sft" / "DONE.json").read_text())["metrics"]["global_step"] > 0
    argv = (tmp_path / "argv.0").read_bytes().decode().split("\0")[:-1]
    assert argv[0] == "exec" and "--nv" not in argv  # a CPU job: no GPU flags
    binds = argv[argv.index("--bind") + 1].split(",")
    assert sorted(binds) == sorted([str(run_dir.resolve()), str(REPO), str(hf_cache)]), binds
    assert argv[argv.index("--pwd") + 1] == str(REPO)
    image = argv.index("/images/dpo.sif")
    assert argv[image + 1:] == [sys.executable, "-u", "-m", "submitit.core._submit", str(run_dir / "jobs" / "sft")]
    script = Path(run_dir / "jobs" / "sft").glob("*submission.sh")
    assert any("--kill-on-bad-exit=1" in p.read_text() for p in script)
