"""The job callable that runs one stage (or array task) of a run under a scheduler.

The stages themselves are declared in `pipeline.registry`. Every job only needs the run directory:
it reads `RUN/config.yaml` and the upstream files.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pipeline.registry import Task, get_stage, task_key
from pipeline.rundir import attempts
from pipeline.rundir.layout import RunLayout
from pipeline.runtime import interrupt
from slurm import environment, submit


def run_stage(run_dir: str | Path, stage: str, task: Task = None):
    """Run one stage (or one array task) of the run in `run_dir`; idempotent."""
    from jobs.config import load_run_config

    from pipeline.data import hub

    cfg = load_run_config(run_dir)
    layout = RunLayout(run_dir)
    # jobs never download: hub models and data were prefetched on the login node (`launch.py run`)
    os.environ.update(hub.offline_environment(cfg, layout.root))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(layout.compile_cache))
    return get_stage(stage).execute(cfg, layout, task)


# How a collective fails when a peer process is gone (gloo on CPUs, NCCL on GPUs, the TCP store).
_PEER_LOST_TYPES = {"DistBackendError", "DistNetworkError", "DistStoreError"}
_PEER_LOST_TEXT = ("connection reset by peer", "connection closed by peer", "broken pipe", "econnreset",
                   "nccl communicator was aborted")


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a collective that failed because another rank is gone."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in _PEER_LOST_TYPES or any(t in str(error).lower() for t in _PEER_LOST_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class StageJob:
    """The callable submitit pickles for each job / array task.

    It replaces submitit's signal handling (which checkpoints from rank 0 only, inside the handler)
    with the cooperative one: USR2 (SLURM's early warning, `--signal=USR2@lead`) and SIGTERM (a
    requeue, preemption or cancel) only set a flag; the stage saves at its next step boundary on
    every rank and raises StageInterrupted; then rank 0 requeues the job (same job id) when the
    stop was a time-out or an early preemption warning. SIGTERM needs no requeue from us: SLURM
    already requeues (or cancels) the job.
    """

    def __init__(self, run_dir: str | Path, stage: str, task: Task | str = None, *, time_limit_s: int | None = None,
                 signal_lead_s: int = 0, max_requeues: int = 3):
        self.run_dir = str(Path(run_dir).resolve())
        self.stage = stage
        self.task = get_stage(stage).parse_task(task) if isinstance(task, str) or task is None else task
        self.time_limit_s = time_limit_s
        self.signal_lead_s = signal_lead_s
        self.max_requeues = max_requeues
        self._started = time.time()

    def _on_usr2(self, signum, frame):
        # SLURM may send the warning up to a minute early; well before that it is a preemption notice
        elapsed = time.time() - self._started
        near_limit = self.time_limit_s is None or elapsed >= self.time_limit_s - self.signal_lead_s - 120
        interrupt.request_stop(interrupt.TIMEOUT if near_limit else interrupt.PREEMPTED)

    def _on_term(self, signum, frame):
        interrupt.request_stop(interrupt.TERMINATED)

    def __call__(self):
        self._started = time.time()
        if environment.current_job().in_slurm:
            # torch would otherwise start a thread per core of the node, not per CPU of this task; an
            # OMP_NUM_THREADS from the login shell (sbatch exports it) is not this task's share either
            os.environ["OMP_NUM_THREADS"] = str(environment.cpu_share())
        environment.export_torch_distributed()
        interrupt.clear()
        signal.signal(signal.SIGUSR2, self._on_usr2)
        signal.signal(signal.SIGTERM, self._on_term)
        record = self._start_cost_record()
        outcome = "failed:error"
        try:
            result = run_stage(self.run_dir, self.stage, self.task)
            outcome = "completed"
            return result
        except interrupt.StageInterrupted as stop:
            job = environment.current_job()
            outcome = f"stopped:{stop.reason}"  # a SIGTERM: SLURM requeues or cancels it; a later attempt tells
            if stop.reason in (interrupt.TIMEOUT, interrupt.PREEMPTED) and job.in_slurm:
                self._check_budget(job, str(stop))
                outcome = f"{attempts.REQUEUED}:{stop.reason}"
                if job.global_rank == 0:
                    print(f"{self!r}: {stop}; requeueing job {job.job_id} "
                          f"(restart {job.restart_count + 1} of at most {self.max_requeues})", flush=True)
                    environment.requeue(job.job_id)
            raise
        except Exception as error:
            job = environment.current_job()
            if job.in_slurm and job.world_size > 1 and lost_a_peer(error):
                # A rank died (its node lost power, it was killed): the job is not wrong, its allocation
                # is. It must not end as an ordinary failure (that cancels everything behind it): it
                # resumes from the last complete checkpoint, with no command from the user.
                self._check_budget(job, f"lost a peer rank: {_first_line(error)}")
                outcome = f"{attempts.REQUEUED}:lost_peer"
                self._recover_from_lost_peer(job, error)
            raise
        finally:
            if record is not None:
                attempts.end_attempt(record, outcome)
            # The stage is over: a time-limit warning that comes now must not kill the process. Python
            # restores SIGUSR2's default action (terminate) while the interpreter shuts down, so a late
            # warning would end a finished job as FAILED (and cancel its afterok dependents).
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def _start_cost_record(self) -> Path | None:
        """Rank 0 records this attempt's allocation and start (pipeline.rundir.attempts: what the run cost)."""
        job = environment.current_job()
        layout = RunLayout(self.run_dir)
        if job.global_rank != 0 or not layout.config.is_file():  # no run (yet): the stage itself says what is wrong
            return None
        if job.in_slurm:
            where = {"job_id": job.job_id, "restart": job.restart_count, "executor": "slurm",
                     **environment.allocation()}
        else:  # a local job uses one GPU when the machine has one and the config does not say cpu
            from jobs.config import load_run_config

            gpus = int(load_run_config(self.run_dir).device != "cpu" and submit.count_gpus() > 0)
            where = {"job_id": os.environ.get("SUBMITIT_LOCAL_JOB_ID", str(os.getpid())), "restart": 0,
                     "executor": "local", "nodes": 1, "gpus": gpus, "cpus": len(os.sched_getaffinity(0))}
        path = attempts.attempts_path(layout, self.stage, task_key(self.task))
        attempts.start_attempt(path, **where)
        return path

    def _recover_from_lost_peer(self, job, error: BaseException) -> None:
        """A dead node is SLURM's to handle: this rank stays alive until the controller marks the node
        DOWN and ends the job NODE_FAIL, which requeues it (same id, --requeue) onto healthy nodes;
        exiting first would end the job FAILED. A peer that died on a healthy node leaves SLURM
        nothing to see: then this rank requeues the job (any rank; the first request wins)."""
        said = f"{self!r}: rank {job.global_rank} lost a peer ({_first_line(error)})"
        grace_s = environment.slurmd_timeout_s() + 30
        failed = environment.wait_for_node_failure(job.nodelist, grace_s) if job.nodelist else []
        if failed:
            print(f"{said}; node(s) {', '.join(failed)} stopped answering: SLURM requeues job {job.job_id} "
                  f"once they are DOWN (restart {job.restart_count + 1} of at most {self.max_requeues})", flush=True)
            deadline = time.monotonic() + 2 * grace_s
            while time.monotonic() < deadline:  # SLURM ends this process; sleeping is all there is to do
                time.sleep(2)
            print(f"{self!r}: SLURM did not end the job within {2 * grace_s} s; requeueing it", flush=True)
        else:
            print(f"{said}; every node answers; requeueing job {job.job_id} "
                  f"(restart {job.restart_count + 1} of at most {self.max_requeues})", flush=True)
        try:
            environment.requeue(job.job_id)
        except RuntimeError as already:  # another rank requeued it first
            print(f"{self!r}: {already}", flush=True)

    def _check_budget(self, job, why: str) -> None:
        if job.restart_count >= self.max_requeues:
            raise RuntimeError(f"{self!r} gave up after {job.restart_count} requeues ({why}); raise the stage's "
                               "slurm time or max_requeues, then `launch.py resume`") from None

    def __repr__(self) -> str:
        return f"StageJob({get_stage(self.stage).label(self.task)} @ {self.run_dir})"
