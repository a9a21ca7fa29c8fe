"""Shared fixtures. Tests run single-threaded per process: CI has 2 cores and runs jobs beside them."""
import contextlib
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.configlib import deep_merge  # noqa: E402


def launch(*args: str, check: bool = True, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` the way a user does; returns the finished process."""
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# Tests that use the SLURM cluster, or ask its controller in passing, run in one pytest-xdist worker, one after
# another (pyproject: -n 2): some restart the cluster with other settings, and the time-limit tests want its
# nodes. The other worker takes every other test, one at a time. The controller decides from node ids alone,
# so the rule is by module: test_slurm_* and these, which ask the live controller (scontrol, sinfo, sbatch):
SCHEDULER_MODULES = {"test_array_limits", "test_cost", "test_device_binding", "test_hub_pipeline",
                     "test_local_data_check", "test_login_node", "test_presets_zephyr", "test_summary"}


def uses_the_scheduler(module: str) -> bool:
    return module.startswith("test_slurm_") or module in SCHEDULER_MODULES


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown when it is not loaded (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SlurmTestsInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
            return "slurm" if uses_the_scheduler(module) else nodeid

    return SlurmTestsInOneWorker(config, log)


def pytest_collection_modifyitems(config, items):
    """A SLURM test outside those modules would run beside the others: refuse it, naming the fix."""
    strays = [item.nodeid for item in items if (item.get_closest_marker("slurm") or "slurm_cluster" in item.fixturenames)
              and not uses_the_scheduler(item.path.stem)]
    if strays:
        raise pytest.UsageError(f"SLURM tests outside the scheduler's modules: {strays}; move them into a "
                                "tests/test_slurm_*.py module or add theirs to conftest.SCHEDULER_MODULES")


def shared_tmp_root(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this session sees (the workers' basetemp's parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole tiny pipeline, run once locally (submitit LocalExecutor jobs) and shared by tests; built by
    whichever worker needs it first (the other waits on the lock, then its relaunch skips every done stage)."""
    from filelock import FileLock

    root = shared_tmp_root(tmp_path_factory)
    run_dir = root / "tiny" / "run"
    with FileLock(str(root / "tiny.lock")):
        run_dir.parent.mkdir(exist_ok=True)
        launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local",
               "--set", "num_threads=1")
    return run_dir


@pytest.fixture(scope="session")
def slurm_cluster():
    """The project's real SLURM cluster, three nodes on this host (started by slurm/cluster/start.sh when needed)."""
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
    build_deepspeed_cpu_ops()
    return True


def build_deepspeed_cpu_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory collective (a JIT C++ extension, ~1 min) before any job
    needs it: built inside a job, SLURM's USR2 time-limit warning, sent to every process of the
    step, kills the compiler and the rank fails. Seconds when already built."""
    proc = subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
                           "ShareMemCommBuilder().load()"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's CPU shm op failed:\n{proc.stderr[-3000:]}")


def clone_before_dpo(tiny_run: Path, dst: Path, stages=("data", "sft", "pairs"), **config_changes) -> Path:
    """A run directory holding the finished stages of `tiny_run` (its config, with changes)."""
    dst.mkdir()
    for name in stages:
        shutil.copytree(tiny_run / name, dst / name)
    config = deep_merge(yaml.safe_load((tiny_run / "config.yaml").read_text()), config_changes)
    (dst / "config.yaml").write_text(yaml.safe_dump(config))
    return dst


def start_stage_job(run_dir: Path, stage: str, task: str | None) -> subprocess.Popen:
    """One stage task as a plain subprocess running the job callable (no scheduler)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from jobs.stages import StageJob; "
            "StageJob(sys.argv[2], sys.argv[3], sys.argv[4] or None, time_limit_s=120, signal_lead_s=60)()")
    return subprocess.Popen([sys.executable, "-c", code, str(REPO), str(run_dir), stage, task or ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(progress: Path, step: int, proc: subprocess.Popen | None, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            current = json.loads(progress.read_text()).get("step", 0)
        except (FileNotFoundError, json.JSONDecodeError):
            current = 0
        if current >= step:
            return current
        assert proc is None or proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved models' parameters (loaded as models, so tied
    weights compare equal however each was saved: ZeRO-3 saves the tied LM head only once)."""
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _state_is(pid: int, state: str) -> bool | None:
    """Whether process `pid` is in `state` (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == state
    except FileNotFoundError:
        return None


def warned_or_released(pid: int) -> bool:
    """Whether SLURM's time-limit warning reached process `pid`: SIGUSR2 pending on it (sent with kill(),
    so in the shared pending set), or the process running again or gone (slurmstepd follows a signal to
    a stopped step with SIGCONT)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    pending = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(pending & (1 << (signal.SIGUSR2 - 1))) or not _state_is(pid, "T")


def outlast_the_limit(run_dir: Path, stage: str, started, ranks: int = 1, timeout: float = 300) -> None:
    """Make a SLURM job's work outlast its time limit, whatever the machine's speed: once `started` holds (a
    glob under the run directory, e.g. the stage's first saved batch or checkpoint, or a callable), hold the
    job's `ranks` Python processes (SIGSTOP) until SLURM's time-limit warning (USR2) reaches them, then let
    them go on: they stop at the next step or batch boundary, save and requeue the job. To the job this is
    work that took longer than its limit (the tiny stages are fast enough to finish before the warning,
    sent 30-60 s after the start with a 2-minute limit and a 60 s lead)."""
    ready = started if callable(started) else (lambda: bool(list(run_dir.glob(started))))
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"{stage}: {started} not reached after {timeout} s"
        time.sleep(0.2)
    while True:
        matches = subprocess.run(["pgrep", "-f", f"submitit.core._submit {run_dir}/jobs/{stage}( |$)"],
                                 capture_output=True, text=True).stdout.split()
        pids = [int(pid) for pid in matches if _comm(pid).startswith("python")]  # not srun
        if len(pids) == ranks:
            break
        assert time.time() < deadline and len(pids) < ranks, f"{stage}: expected {ranks} job process(es), found {pids}"
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        while _state_is(pid, "T") is False:  # SIGSTOP takes effect asynchronously
            time.sleep(0.05)
    deadline = time.time() + 150  # the warning comes at the latest at limit - lead = 60 s after the start
    try:
        while not all(warned_or_released(pid) for pid in pids):
            assert time.time() < deadline, f"{stage}: SLURM's USR2 never arrived"
            time.sleep(0.2)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except FileNotFoundError:
        return ""


CLUSTER_SETTINGS = ("SLURM_DPO_TASK_PLUGIN", "SLURM_DPO_ACCOUNTING", "SLURM_DPO_MAX_ARRAY_SIZE")


def restart_cluster(settings: dict[str, str], timeout: float = 300) -> str:
    """Restart the test cluster's daemons (slurm/cluster/start.sh, state kept) with `settings` (SLURM_DPO_*
    variables; {} = the default cluster) once no job is left; returns `scontrol show config`."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "jobs still queued; cannot restart the cluster"
        time.sleep(2)
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_SETTINGS}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "cluster" / "start.sh")], env={**env, **settings},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"start.sh with {settings} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def cluster_with(settings: dict[str, str]):
    """The test cluster restarted with `settings` for the duration, then (also on failure) the default one."""
    try:
        yield restart_cluster(settings)
    finally:
        subprocess.run(["scancel", "-u", "root"], capture_output=True)
        restart_cluster({})
