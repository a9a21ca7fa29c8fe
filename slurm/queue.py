"""What SLURM says about submitted jobs: one `sacct` call for many ids, and `scancel`.

`query_jobs` asks the accounting database (`sacct`), which knows finished jobs too and lists
requeued runs (`-D`). When `sacct` is missing or fails (accounting not configured, slurmdbd
down), it falls back to one `squeue` call, which only knows jobs the controller still holds
(pending, running, and finished ones for `MinJobAge`, 300 s by default) and has no exit code nor
restart count. Ids `sacct` does not know yet (a job submitted a moment ago, before slurmdbd
recorded it) are looked up with one `squeue` call as well. Every command gets its arguments as
a list (no shell); `runner` (default `subprocess.run`) is injectable so tests feed canned output.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable

ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
    # also not finished (squeue/scontrol spellings): the job will still run or is being signalled
    "REQUEUE_FED", "REQUEUE_HOLD", "SIGNALING", "STAGE_OUT", "STOPPED",
})
DONE_OK_STATES = frozenset({"COMPLETED"})
FAILED_STATES = frozenset({
    "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
})

SACCT_FIELDS = ("JobID", "State", "NodeList", "ElapsedRaw", "Start", "End", "ExitCode", "Submit", "AllocTRES")
SQUEUE_FORMAT = "%i|%T|%N|%M|%S|%e"
COMMAND_TIMEOUT_S = 60

_JOB_ID_RE = re.compile(r"\d+(_\d+)?")
_ARRAY_RANGE_RE = re.compile(r"(?P<parent>\d+)_\[(?P<spec>[0-9,\-]+)(%\d+)?\]")
_NO_VALUE = {"", "unknown", "none", "none assigned", "n/a", "(null)", "invalid"}
_BENIGN_SCANCEL = ("already completing or completed", "invalid job id specified")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class Usage:
    """What the accounting database says a job id used over all its runs (the first and every requeue):
    allocated GPUs x elapsed, or CPUs x elapsed for a run without GPUs (as pipeline.rundir.attempts counts).
    `requeued_*` is the part spent in runs that were requeued (every run but the newest)."""
    gpu_s: float = 0.0
    cpu_s: float = 0.0
    requeued_gpu_s: float = 0.0
    requeued_cpu_s: float = 0.0
    runs: int = 0


def _allocated(tres: str) -> tuple[int, int]:
    """(GPUs, CPUs) from sacct's AllocTRES, e.g. 'billing=8,cpu=8,gres/gpu=4,mem=64G,node=1' -> (4, 8)."""
    values = dict(item.partition("=")[::2] for item in tres.split(",") if "=" in item)
    gpus, cpus = values.get("gres/gpu", ""), values.get("cpu", "")
    return int(gpus) if gpus.isdigit() else 0, int(cpus) if cpus.isdigit() else 0


def _usage(runs: list[tuple[int, str, bool]]) -> Usage:
    """The Usage of one id's runs, oldest first, each as (elapsed seconds, AllocTRES, started); a run that never
    started (pending) costs nothing and is not counted."""
    gpu = cpu = requeued_gpu = requeued_cpu = 0.0
    runs = [(elapsed, tres) for elapsed, tres, started in runs if started]
    for index, (elapsed, tres) in enumerate(runs):
        gpus, cpus = _allocated(tres)
        spent_gpu, spent_cpu = (gpus * elapsed, 0.0) if gpus else (0.0, cpus * elapsed)
        gpu, cpu = gpu + spent_gpu, cpu + spent_cpu
        if index < len(runs) - 1:
            requeued_gpu, requeued_cpu = requeued_gpu + spent_gpu, requeued_cpu + spent_cpu
    return Usage(gpu, cpu, requeued_gpu, requeued_cpu, len(runs))


@dataclass
class JobRecord:
    job_id: str              # "123", or "123_2" for an array task
    state: str               # normalised: "CANCELLED by 0" -> "CANCELLED", "RUNNING+" -> "RUNNING"
    node: str | None         # node list ("node[01-02]"), None before the job runs
    elapsed_s: int | None    # wall time used so far / in total
    start: str | None        # ISO time as SLURM prints it, None when not started
    end: str | None          # None while not finished
    exit_code: str | None    # "0:0" (code:signal); None when unknown (e.g. from squeue)
    restarts: int = 0        # earlier runs of the same id (requeues) that sacct -D listed
    usage: Usage | None = field(default=None, compare=False)  # from sacct only (squeue knows no allocations)


def normalise_state(raw: str) -> str:
    """`"CANCELLED by 0"` -> `"CANCELLED"`; `"running+"` -> `"RUNNING"`; empty -> `"UNKNOWN"`."""
    words = raw.strip().split()
    return words[0].rstrip("+").upper() if words else "UNKNOWN"


def _check_ids(job_ids: Iterable[str], what: str) -> list[str]:
    if isinstance(job_ids, str):
        raise ValueError(f"{what}: expected a list of job ids, got the string {job_ids!r}; write [{job_ids!r}]")
    ids = []
    for i, job_id in enumerate(job_ids):
        job_id = str(job_id) if isinstance(job_id, int) and not isinstance(job_id, bool) else job_id
        if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"{what}[{i}]: {job_id!r} is not a SLURM job id such as '123' or '123_4'")
        if job_id not in ids:
            ids.append(job_id)
    return ids


def _value(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() in _NO_VALUE else text


def _expand_job_id(job_id: str) -> list[str]:
    """`123_[0-2,5%4]` -> `123_0 123_1 123_2 123_5`; any other id -> itself."""
    m = _ARRAY_RANGE_RE.fullmatch(job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group("spec").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        out.extend(f"{m.group('parent')}_{i}" for i in range(int(low), int(high or low) + 1))
    return out


def _run(runner: Runner, cmd: list[str]) -> tuple[str | None, str]:
    """(stdout, "") on success, (None, why) when the command is missing, times out or fails."""
    try:
        proc = runner(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        return None, f"`{cmd[0]}` is not on the PATH"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`{cmd[0]}` failed: {exc}"
    if proc.returncode != 0:
        err = " / ".join(ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip())
        return None, f"`{' '.join(cmd)}` exited {proc.returncode}: {err or '(no message)'}"
    return proc.stdout or "", ""


def sacct_command(job_ids: list[str]) -> list[str]:
    # -X: allocations only (no .batch/.extern steps); -D: requeued runs too; -n: no header;
    # -P: '|'-separated, no trailing '|'. With -j and no -S, sacct searches all time.
    return ["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(SACCT_FIELDS)]


def squeue_command(job_ids: list[str]) -> list[str]:
    # -r: one line per array task (pending tasks too); -t all: finished jobs still in memory.
    return ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT]


def parse_sacct(text: str) -> dict[str, JobRecord]:
    """Parse `sacct -X -D -n -P -o JobID,State,NodeList,ElapsedRaw,Start,End,ExitCode,Submit,AllocTRES` output.

    Pending array ranges expand into one record per task; of several records for one id (a
    requeued job), the latest submitted wins, `restarts` counts the others and `usage` adds them all up.
    """
    seen: dict[str, list[tuple[str, int, JobRecord, str]]] = {}
    from_range: set[tuple[str, int]] = set()  # (task id, line) of records expanded from `123_[0-2]`
    for lineno, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        cols = line.split("|")
        if len(cols) != len(SACCT_FIELDS):
            raise RuntimeError(f"unexpected sacct output line (expected {len(SACCT_FIELDS)} '|'-separated fields "
                               f"{','.join(SACCT_FIELDS)}): {line!r}")
        job_id, state, node, elapsed, start, end, exit_code, submit, tres = (c.strip() for c in cols)
        if not job_id or "." in job_id:  # steps never show with -X; be safe anyway
            continue
        task_ids = _expand_job_id(job_id)
        for task_id in task_ids:
            if task_ids != [job_id]:
                from_range.add((task_id, lineno))
            record = JobRecord(job_id=task_id, state=normalise_state(state), node=_value(node),
                               elapsed_s=int(elapsed) if elapsed.isdigit() else None, start=_value(start),
                               end=_value(end), exit_code=_value(exit_code))
            seen.setdefault(task_id, []).append((_value(submit) or "", lineno, record, tres))
    records = {}
    for task_id, runs in seen.items():
        concrete = [run for run in runs if (task_id, run[1]) not in from_range]
        if concrete:  # a task that got its own row is no longer part of a pending range
            runs = concrete
        runs.sort(key=lambda run: (run[0], run[1]))  # ISO times sort as text; then output order
        latest = runs[-1][2]
        latest.restarts = len(runs) - 1
        latest.usage = _usage([(run[2].elapsed_s or 0, run[3], run[2].start is not None) for run in runs])
        records[task_id] = latest
    return records


def _duration_s(text: str) -> int | None:
    """squeue's `[days-][hours:]minutes:seconds` -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_squeue(text: str) -> dict[str, JobRecord]:
    """Parse `squeue -h -r -o '%i|%T|%N|%M|%S|%e'` output (no exit codes, no restart counts)."""
    records = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("|")
        if len(cols) != 6:
            raise RuntimeError(f"unexpected squeue output line (expected 6 '|'-separated fields "
                               f"{SQUEUE_FORMAT}): {line!r}")
        job_id, state, node, elapsed, start, end = (c.strip() for c in cols)
        state = normalise_state(state)
        for task_id in _expand_job_id(job_id):
            records[task_id] = JobRecord(
                job_id=task_id, state=state, node=_value(node), elapsed_s=_duration_s(elapsed),
                start=None if state == "PENDING" else _value(start),          # %S is an estimate while pending
                end=None if state in ACTIVE_STATES else _value(end),           # %e is an estimate while active
                exit_code=None)
    return records


def _covered(job_id: str, records: dict[str, JobRecord]) -> bool:
    return job_id in records or ("_" not in job_id and any(k.startswith(job_id + "_") for k in records))


def _squeue(job_ids: list[str], runner: Runner) -> tuple[dict[str, JobRecord] | None, str]:
    out, why = _run(runner, squeue_command(job_ids))
    if out is None:
        if "invalid job id" in why.lower():  # the controller no longer (or never) knew these ids
            return {}, ""
        return None, why
    return parse_squeue(out), ""


def query_jobs(job_ids: list[str], runner: Runner = subprocess.run) -> dict[str, JobRecord]:
    """State of the given jobs with ONE `sacct` call (plus at most one `squeue` call, see module doc).

    Keys are concrete ids: an array parent `123` yields `123_0`, `123_1`, ... (also for pending
    ranges like `123_[0-2]`); a plain job yields `123`. Ids SLURM does not know are absent
    from the result (extra ids, e.g. sibling tasks of a queried task, may be present).
    Raises ValueError for malformed ids, RuntimeError when neither sacct nor squeue answers.
    """
    ids = _check_ids(job_ids, "job_ids")
    if not ids:
        return {}
    # Parents too: an array cancelled while all its tasks pended keeps only one accounting record
    # (`123_[0-2]`, or a bare `123`), which `sacct -j 123_0` does not return.
    parents = sorted({i.split("_")[0] for i in ids if "_" in i} - set(ids))
    out, sacct_why = _run(runner, sacct_command(ids + parents))
    if out is not None:
        records = parse_sacct(out)
        for job_id in ids:
            parent = job_id.split("_")[0]
            if job_id not in records and "_" in job_id and parent in records:
                records[job_id] = dataclasses.replace(records[parent], job_id=job_id)
        missing = [i for i in ids if not _covered(i, records)]
        if missing:  # best effort: not in the accounting database yet
            extra, _ = _squeue(missing, runner)
            for job_id, record in (extra or {}).items():
                records.setdefault(job_id, record)
        return records
    records, squeue_why = _squeue(ids, runner)
    if records is None:
        raise RuntimeError(f"cannot query SLURM jobs {','.join(ids)}: {sacct_why}; fallback {squeue_why}. "
                           "Run this where the SLURM client commands are installed and configured, with slurmctld "
                           "(and slurmdbd, for sacct) running.")
    return records


def cancel_jobs(job_ids: list[str], runner: Runner = subprocess.run) -> list[str]:
    """Cancel the jobs (array parents cancel every task) with ONE `scancel` call.

    Returns scancel's harmless complaints (jobs already finished or no longer known) so the
    caller may show them; raises RuntimeError when scancel is missing or fails otherwise.
    """
    ids = _check_ids(job_ids, "job_ids")
    if not ids:
        return []
    cmd = ["scancel", *ids]
    try:
        proc = runner(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError("`scancel` is not on the PATH; run this on a cluster login node") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {exc}") from None
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    serious = [ln for ln in lines if not any(b in ln.lower() for b in _BENIGN_SCANCEL)]
    if proc.returncode != 0 and (serious or not lines):
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {' / '.join(serious or lines) or '(no message)'}")
    return [ln for ln in lines if ln not in serious]


def max_array_size(runner: Runner = subprocess.run) -> int | None:
    """The controller's `MaxArraySize` (`scontrol show config`): an array's task indices must be below it, so
    an array holds at most that many tasks (0: no arrays at all). None when scontrol does not answer."""
    out, _ = _run(runner, ["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", out or "", re.M)
    return int(m.group(1)) if m else None


def jobs_with_comment(comment: str, runner: Runner = subprocess.run) -> list[str]:
    """Ids of the caller's queued or running jobs whose comment is `comment` (array tasks one by one).

    A launcher writes a unique comment into each job it submits, so a relaunch finds a job whose
    submission was never recorded (the launcher died between `sbatch` and the record).
    """
    out, why = _run(runner, ["squeue", "--me", "-h", "-r", "-o", "%i|%k"])
    if out is None:
        raise RuntimeError(f"cannot list the queue to find jobs of an unrecorded submission: {why}")
    found = []
    for line in out.splitlines():
        job_id, _, job_comment = line.strip().partition("|")
        if job_id and job_comment == comment:
            found.append(job_id)
    return found
