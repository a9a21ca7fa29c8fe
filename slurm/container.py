"""Running a job's Python inside a container image: pyxis/enroot or Apptainer/Singularity.

`ContainerConfig` is the `slurm.container` section (one for the whole run). `job_command` turns it
into submitit's own knobs: the `python` prefix of the command line, `setup` lines of the sbatch
script and extra `srun_args`. runtime "none" changes nothing: the script stays byte-identical.

Pure standard library, like slurm.resources.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import InitVar, dataclass, field
from typing import Iterable

from slurm.resources import _check_text, _help, check_flags

RUNTIMES = ("none", "pyxis", "apptainer")
# Set in the job script at run time: Apptainer where installed, else its older name Singularity.
RUNTIME_VAR = "SLURM_DPO_APPTAINER"
_FIND_APPTAINER = (f"{RUNTIME_VAR}=$(command -v apptainer || command -v singularity) || "
                   "{ echo 'slurm.container.runtime=apptainer: neither apptainer nor singularity is on the PATH "
                   "of the compute node' >&2; exit 1; }")
_PATH_RE = r"/[A-Za-z0-9_.+@=/\-]*"
_PATH_CHARS = "letters, digits, '_', '.', '+', '@', '=', '/', '-'"
_IMAGE_RE = r"[A-Za-z0-9_.:/@#+=\-]+"
_PYTHON_RE = r"[A-Za-z0-9_.+/\-]+"
_RESERVED_FLAGS = {"nv": "gpus_per_node (GPU flags follow it)", "bind": "slurm.container.mounts",
                   "pwd": "nothing: the repository is the working directory"}


@dataclass(frozen=True, kw_only=True)
class ContainerConfig:
    """The container every SLURM job of the run executes in (the local executor never uses one)."""
    runtime: str = field(default="none", metadata=_help(
        f"Container runtime: {', '.join(RUNTIMES)}. pyxis adds --container-image/-mounts/-workdir to srun; "
        "apptainer runs the job's Python as `apptainer exec` (or `singularity`, whichever the node has)."))
    image: str | None = field(default=None, metadata=_help(
        "Image: for pyxis an enroot URI or .sqsh file (e.g. nvcr.io#nvidia/pytorch:24.05-py3), for apptainer "
        "a .sif file or docker:// URI. Required unless runtime is none."))
    mounts: list[str] = field(default_factory=list, metadata=_help(
        "Extra bind mounts, absolute 'HOST' or 'HOST:CONTAINER' paths; the run directory, the repository and "
        "the HF cache are bound automatically."))
    python: str = field(default="python3", metadata=_help(
        "Python interpreter inside the image (name on the image's PATH or absolute path); it needs this "
        "project's requirements installed."))
    extra_args: list[str] = field(default_factory=list, metadata=_help(
        "Extra runtime flags: for pyxis srun flags (e.g. ['--container-remap-root']), for apptainer flags of "
        "`apptainer exec` (e.g. ['--cleanenv'])."))
    _where: InitVar[str] = "slurm.container"

    def __post_init__(self, _where: str) -> None:
        w = _where or "slurm.container"
        if self.runtime not in RUNTIMES:
            raise ValueError(f"{w}.runtime: {self.runtime!r} is not a container runtime; valid: {', '.join(RUNTIMES)}")
        if self.image is not None:
            if not isinstance(self.image, str):
                raise ValueError(f"{w}.image: expected a string, got {type(self.image).__name__} {self.image!r}")
            _check_image(self.image, f"{w}.image")
        elif self.runtime != "none":
            raise ValueError(f"{w}.image: runtime {self.runtime!r} needs an image; set {w}.image, e.g. "
                             "nvcr.io#nvidia/pytorch:24.05-py3 (pyxis) or /shared/images/dpo.sif (apptainer)")
        if not isinstance(self.mounts, (list, tuple)):
            raise ValueError(f"{w}.mounts: expected a list of absolute paths, got {self.mounts!r}")
        for i, mount in enumerate(self.mounts):
            if not isinstance(mount, str):
                raise ValueError(f"{w}.mounts[{i}]: expected a string path, got {type(mount).__name__} {mount!r}")
            for part in mount.split(":", 1):
                _check_text(part, f"{w}.mounts[{i}]", _PATH_RE, f"absolute paths ('HOST' or 'HOST:CONTAINER') of "
                            f"{_PATH_CHARS}", "'/scratch' or '/data/ds:/datasets'")
        object.__setattr__(self, "mounts", list(self.mounts))
        if not isinstance(self.python, str):
            raise ValueError(f"{w}.python: expected a string, got {type(self.python).__name__} {self.python!r}")
        _check_text(self.python, f"{w}.python", _PYTHON_RE, "a command name or absolute path", "'python3'")
        reserved = _RESERVED_FLAGS if self.runtime == "apptainer" else {}
        object.__setattr__(self, "extra_args", check_flags(self.extra_args, f"{w}.extra_args", reserved))


def _check_image(image: str, where: str) -> None:
    # '#' separates an enroot registry from the image: allowed here, and the value is always shell-quoted
    bad = next((c for c in image if ord(c) < 33 or ord(c) == 127 or c in "'\"\\`$;"), None)
    if bad is not None or not re.fullmatch(_IMAGE_RE, image):
        raise ValueError(f"{where}: {image!r} has characters refused in an image reference; use only letters, "
                         "digits and '_', '.', ':', '/', '@', '#', '+', '=', '-', e.g. "
                         "'nvcr.io#nvidia/pytorch:24.05-py3' or '/shared/images/dpo.sif'")


def job_command(container: ContainerConfig | None, gpus_per_node: int, binds: Iterable[str], workdir: str,
                ) -> dict:
    """submitit parameters that run the job in `container`: {"python", "setup", "srun_args"}, or {} for none.

    `binds`: host paths bound at the same path inside (the run directory, the repository, the HF
    cache); `workdir`: the directory the job's Python starts in (the repository, so it is importable).
    """
    if container is None or container.runtime == "none":
        return {}
    unique = list(dict.fromkeys(str(b).rstrip("/") or "/" for b in binds))
    auto = [p for p in unique if not any(p.startswith(q.rstrip("/") + "/") for q in unique if q != p)]  # nested: once
    for path in [*auto, workdir]:
        _check_text(str(path), "container bind", _PATH_RE, f"absolute paths of {_PATH_CHARS}", "'/shared/runs/x'")
    mounts = [*auto, *container.mounts]
    inner = shlex.quote(container.python)
    if container.runtime == "pyxis":
        pairs = [m if ":" in m else f"{m}:{m}" for m in mounts]
        # submitit shell-quotes each srun argument itself
        return {"python": inner, "setup": [],
                "srun_args": [f"--container-image={container.image}",
                              f"--container-mounts={','.join(pairs)}", f"--container-workdir={workdir}",
                              *container.extra_args]}
    gpu = ["--nv"] if gpus_per_node > 0 else []
    words = [f'"${RUNTIME_VAR}"', "exec", *gpu, "--bind", ",".join(mounts), "--pwd", workdir,
             *container.extra_args, shlex.quote(container.image), inner]
    return {"python": " ".join(words), "setup": [_FIND_APPTAINER], "srun_args": []}
