"""Thin wrappers over submitit: the rest of the project never touches submitit internals.

- `make_executor` gives a configured `submitit.SlurmExecutor` (or `LocalExecutor`) for one stage.
- `render_sbatch` gives the exact sbatch script that executor would submit (for `--dry-run` and
  the golden test), built by submitit's own `_make_sbatch_string`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import submitit
from submitit.core.utils import JobPaths
from submitit.slurm import slurm as _submitit_slurm

from slurm.container import ContainerConfig, job_command
from slurm.resources import SlurmResources, check_safe_text

EXECUTOR_KINDS = ("local", "slurm")
_JOB_ID_RE = r"\d+(_\d+)?"
_PLACEHOLDER_RE = r"<[A-Za-z0-9_.\-]+>"


def sbatch_available() -> bool:
    """True when `sbatch` is on the PATH (i.e. this looks like a SLURM login/compute node)."""
    return shutil.which("sbatch") is not None


def job_log_paths(folder: str | Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) log files of a submitit job: `job_id` as recorded ("123", "123_4" for an
    array task, or a local job's id); `task` is the SLURM task rank (0 = the main process)."""
    if not isinstance(job_id, str) or not re.fullmatch(_JOB_ID_RE, job_id):
        raise ValueError(f"job_id: {job_id!r} is not a job id such as '123' or '123_4'")
    paths = JobPaths(folder, job_id=job_id, task_id=task)
    return paths.stdout, paths.stderr


def _folder(folder: str | Path) -> Path:
    """The folder as submitit stores it (absolute, `~` expanded); control characters refused."""
    path = Path(folder).expanduser().absolute()
    if any(ord(c) < 32 or ord(c) == 127 for c in str(path)):
        raise ValueError(f"folder: {str(path)!r} contains a control character (e.g. a newline), which would "
                         "break the sbatch script; choose another directory name")
    return path


def _resources(resources: SlurmResources | None) -> SlurmResources:
    if resources is None:
        return SlurmResources()
    if not isinstance(resources, SlurmResources):
        raise ValueError(f"resources: expected a slurm.resources.SlurmResources or None, got "
                         f"{type(resources).__name__}")
    return resources


def _checked_ids(ids: Iterable[str], what: str, allow_placeholders: bool, whole_jobs: bool = False) -> list[str]:
    if isinstance(ids, str):
        raise ValueError(f"{what}: expected a list of job ids, got the string {ids!r}; write [{ids!r}]")
    deps = [str(d) if isinstance(d, int) and not isinstance(d, bool) else d for d in ids]
    for i, dep in enumerate(deps):
        ok = isinstance(dep, str) and (re.fullmatch(_JOB_ID_RE, dep)
                                       or (allow_placeholders and re.fullmatch(_PLACEHOLDER_RE, dep)))
        if ok and whole_jobs and "_" in dep:
            raise ValueError(f"{what}[{i}]: {dep!r} is one task; aftercorr names a whole job array, e.g. "
                             f"{dep.split('_')[0]!r}")
        if not ok:
            extra = " or a '<stage>' placeholder" if allow_placeholders else ""
            raise ValueError(f"{what}[{i}]: {dep!r} is not a SLURM job id such as '123' or '123_4'{extra}")
    return deps


def dependency_string(dependencies: Iterable[str], allow_placeholders: bool = False,
                      corresponding: Iterable[str] = ()) -> str | None:
    """`["101", "102_3"]` -> `"afterok:101:102_3"`; None when there are none.

    `corresponding`: job arrays whose task i this array's task i waits for (and nothing else of
    them), `aftercorr:ID`; with both kinds, `"afterok:101,aftercorr:103"` (all must hold).
    With `allow_placeholders` (dry runs), `<stage>` stands for a job id not known yet.
    """
    deps = _checked_ids(dependencies, "dependencies", allow_placeholders)
    corr = _checked_ids(corresponding, "corresponding", allow_placeholders, whole_jobs=True)
    parts = (["afterok:" + ":".join(deps)] if deps else []) + (["aftercorr:" + ":".join(corr)] if corr else [])
    return ",".join(parts) or None


# Limits sbatch names when it refuses a job (Slurm's job_state_reason names), in words.
_LIMIT_RE = re.compile(r"\b((?:QOS|Assoc)(?:Grp|Max)\w*Limit)\b")
_LIMIT_MEANINGS = {
    "QOSMaxSubmitJobPerUserLimit": "the QOS's MaxSubmitJobsPerUser, how many jobs one user may have queued or "
                                   "running at once (each array task counts)",
    "QOSMaxSubmitJobPerAccountLimit": "the QOS's MaxSubmitJobsPerAccount (each array task counts)",
    "QOSGrpSubmitJobsLimit": "the QOS's GrpSubmitJobs, jobs queued or running under the QOS (each array task counts)",
    "AssocMaxSubmitJobLimit": "your association's MaxSubmitJobs, how many jobs you may have queued or running at "
                              "once (each array task counts)",
    "AssocGrpSubmitJobsLimit": "the association's GrpSubmitJobs (each array task counts)",
}


def refusal_limit(message: str) -> tuple[str, str] | None:
    """(limit name, what it means) when sbatch's refusal names a QOS or association limit; else None."""
    m = _LIMIT_RE.search(message)
    if not m:
        return None
    name = m.group(1)
    kind = "QOS" if name.startswith("QOS") else "association"
    return name, _LIMIT_MEANINGS.get(name, f"a limit of the {kind} the job runs under (`sacctmgr show {'qos' if kind == 'QOS' else 'assoc'}`)")


def refusal_advice(reason: str, section: str) -> str:
    """What to do about sbatch's refusal `reason` of a job sized by config `section`: a site limit SLURM named
    is no wrong resource value."""
    limit = refusal_limit(reason)
    if limit is not None:
        return (f"SLURM reported the limit {limit[0]}: {limit[1]}. Wait until fewer of your jobs are queued, run "
                f"fewer tasks (arms, seeds, shards), or use a QOS/account with a larger limit ({section}.qos, "
                f"{section}.account), then run again")
    if "invalid job array specification" in reason.lower():
        return ("The array is larger than the controller allows (MaxArraySize in `scontrol show config`; the "
                "launcher splits arrays to it when scontrol answers): check that `scontrol show config` works "
                "here, then run again")
    return f"Fix {section} (partition, account, qos, ...) and run again"


def _slurm_params(resources: SlurmResources, job_name: str, dependency: str | None) -> dict[str, Any]:
    params = resources.to_submitit_params(job_name)
    if dependency:
        params["additional_parameters"] = {**params.get("additional_parameters", {}), "dependency": dependency}
    return params


def _in_container(params: dict[str, Any], resources: SlurmResources, container: ContainerConfig | None,
                  binds: Iterable[str], workdir: str | Path | None) -> str | None:
    """Add the container's setup lines and srun flags to `params`; returns its python prefix (None: no container)."""
    if container is not None and not isinstance(container, ContainerConfig):
        raise ValueError(f"container: expected a slurm.container.ContainerConfig or None, got "
                         f"{type(container).__name__}")
    wrap = job_command(container, resources.gpus_per_node, binds, str(workdir or Path.cwd()))
    if not wrap:
        return None
    if wrap["setup"]:
        params["setup"] = wrap["setup"]
    params["srun_args"] = [*params.get("srun_args", []), *wrap["srun_args"]]
    return wrap["python"]


def count_gpus() -> int:
    """NVIDIA GPUs on this machine, without importing torch (the driver's /proc entries, else nvidia-smi)."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return len(list(proc.iterdir()))
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if listed.returncode == 0:
            return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
    return 0


def local_gpu_params() -> dict:
    """LocalExecutor parameters that give a local job the GPUs the launching shell sees.

    submitit sets CUDA_VISIBLE_DEVICES in a local job to its first `gpus_per_node` devices, ""
    by default: every local stage would silently run on the CPU of a GPU workstation.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        devices = list(range(count_gpus()))
    else:
        items = [item.strip() for item in visible.split(",") if item.strip()]
        if not all(item.isdigit() for item in items):
            raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: the local executor passes GPUs on by index; "
                             "set it to indices (e.g. 0,1) or unset it")
        devices = [int(item) for item in items]
    return {"gpus_per_node": len(devices), "visible_gpus": devices}


def make_executor(kind: str, folder: str | Path, resources: SlurmResources | None, job_name: str,
                  dependencies: Iterable[str] = (), comment: str | None = None, corresponding: Iterable[str] = (),
                  container: ContainerConfig | None = None, binds: Iterable[str] = (),
                  workdir: str | Path | None = None) -> submitit.SlurmExecutor | submitit.LocalExecutor:
    """A submitit executor for one stage, writing its scripts, pickles and logs into `folder`.

    kind="slurm": a `SlurmExecutor` with every parameter from `resources` (None = defaults), the
    job waiting for `dependencies` (`--dependency=afterok:ID:ID`; array parents wait for every
    task) and, task by task, for the arrays in `corresponding` (`aftercorr:ID`), and up to
    `resources.max_requeues` requeues after time-outs of checkpointable jobs.
    With a `container` (kind="slurm" only), the job's Python runs in it, `binds` (host paths) bound
    at the same paths and `workdir` (default: the current directory) its working directory.
    kind="local": a `LocalExecutor` with only the time limit (no dependencies allowed, no container).
    `executor.submit(fn)` gives a single job; several submits inside `with executor.batch():`
    give one job array (a batch of exactly one is submitted as a plain job, as submitit does).
    """
    if kind not in EXECUTOR_KINDS:
        raise ValueError(f"kind: {kind!r} is not an executor kind; valid kinds: {', '.join(EXECUTOR_KINDS)}")
    resources = _resources(resources)
    path = _folder(folder)
    params = _slurm_params(resources, job_name, None)  # validates job_name for both kinds
    if kind == "local":
        deps = list(dependencies) + list(corresponding)
        if deps:
            raise ValueError(f"dependencies: the local executor cannot wait on SLURM jobs, got {deps!r}; run "
                             "stages one after another and pass no dependencies")
        executor = submitit.LocalExecutor(folder=path, max_num_timeout=resources.max_requeues)
        executor.update_parameters(timeout_min=resources.time_minutes, **local_gpu_params())
        return executor
    params = _slurm_params(resources, job_name, dependency_string(dependencies, corresponding=corresponding))
    if comment is not None:  # finds the job in the queue if its submission was never recorded
        check_safe_text(comment, "comment", "comment")
        params["comment"] = comment
    python = _in_container(params, resources, container, binds, workdir)
    try:
        executor = submitit.SlurmExecutor(folder=path, max_num_timeout=resources.max_requeues, python=python)
    except RuntimeError as exc:  # submitit refuses when `srun` is not on the PATH
        raise RuntimeError(f"kind='slurm' needs the SLURM client commands (srun, sbatch) on the PATH ({exc}); "
                           "run on a cluster login node, or use kind='local'") from None
    executor.update_parameters(**params)
    return executor


def render_sbatch(resources: SlurmResources | None, folder: str | Path, job_name: str,
                  array_size: int | None = None, dependencies: Iterable[str] = (), *,
                  python: str | None = None, corresponding: Iterable[str] = (),
                  container: ContainerConfig | None = None, binds: Iterable[str] = (),
                  workdir: str | Path | None = None) -> str:
    """The sbatch script `make_executor("slurm", folder, resources, job_name, dependencies)` submits.

    `array_size` > 1 renders a job array (`--array=0-N-1%P`, logs named `%A_%a`); None or 1 a
    single job, exactly as submitit decides. Dependencies may contain `<stage>` placeholders for
    jobs not submitted yet (dry runs). `python` is the interpreter in the command line; None =
    this interpreter (`sys.executable`, what submitit uses); pass e.g. "python" for stable output.
    `container`, `binds`, `workdir`: as for `make_executor` (the container's python replaces `python`).
    """
    resources = _resources(resources)
    path = _folder(folder)
    if array_size is not None and (isinstance(array_size, bool) or not isinstance(array_size, int)
                                   or array_size < 1):
        raise ValueError(f"array_size: expected None or an integer >= 1, got {array_size!r}")
    params = _slurm_params(resources, job_name,
                           dependency_string(dependencies, allow_placeholders=True, corresponding=corresponding))
    inner = _in_container(params, resources, container, binds, workdir)
    interpreter = inner if inner is not None else shlex.quote(sys.executable) if python is None else python
    # Same command string as submitit.SlurmExecutor._submitit_command_str.
    command = " ".join([interpreter, "-u -m submitit.core._submit", shlex.quote(str(path))])
    map_count = array_size if array_size is not None and array_size > 1 else None
    return _submitit_slurm._make_sbatch_string(command=command, folder=path, map_count=map_count, **params)
