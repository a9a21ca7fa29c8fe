"""Cooperative stop requests: a signal handler only sets a flag; loops act at their next boundary.

The scheduler side (`jobs/`) decides which signals mean what and installs the handlers; training
loops save a checkpoint at the step they are on and raise `StageInterrupted`; sampling loops stop
after their current unit (a pairs shard, an evaluated checkpoint).
"""
from __future__ import annotations

import threading

# Why a stage stopped: the stop reasons a signal handler gives, and the restart cause of an attempt
# that vanished without one (SIGKILL, node failure). Plain strings: they are written to JSON as is.
TIMEOUT, PREEMPTED, TERMINATED, KILLED = "timeout", "preempted", "terminated", "killed"

_reason: str | None = None
_lock = threading.Lock()


class StageInterrupted(Exception):
    """A stage stopped early on request, after saving what it had; rerunning it resumes."""

    def __init__(self, reason: str, step: int | None, detail: str = ""):
        self.reason = reason
        self.step = step
        super().__init__(f"stopped on request ({reason}) at step {step}{': ' + detail if detail else ''}; "
                         "rerunning the stage resumes from there")


def request_stop(reason: str) -> None:
    """Async-signal-safe enough for Python handlers: only stores a string."""
    global _reason
    if _reason is None:
        _reason = reason


def stop_reason() -> str | None:
    return _reason


def clear() -> None:
    global _reason
    with _lock:
        _reason = None


def check(step: int | None = None, detail: str = "") -> None:
    """Raise `StageInterrupted` if a stop was requested (call at a safe boundary)."""
    if _reason is not None:
        raise StageInterrupted(_reason, step, detail)


SYNC_EVERY_STEPS = 5  # ranks agree on a stop every few steps: a collective + host sync per step would cost speed


def agreed_stop_reason() -> str | None:
    """The stop reason every rank agrees on, now (one collective; use once, e.g. when training ended).

    Ranks compare flags only every SYNC_EVERY_STEPS steps, so a signal that arrived after the last
    comparison is known to some ranks only; deciding on local flags would split them (and hang).
    """
    _agree()
    return _reason


def _agree() -> bool:
    """All-reduce the stop flags (the reason as a code, the highest wins); True if any rank stopped."""
    requested = _reason is not None
    try:
        import torch.distributed as dist
    except ImportError:
        return requested
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    # the reason travels too so that rank 0, which requeues, knows it even when only another rank got the signal
    code = torch.tensor([float(_REASON_CODES.get(_reason, 1) if requested else 0)], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    agreed = int(code.item())
    if agreed and _reason is None:
        request_stop(_CODE_REASONS.get(agreed, TERMINATED))
    return agreed > 0


def synchronized_stop_requested(step: int) -> bool:
    """True on every rank, at the same step, if any rank was asked to stop (ranks may see a signal at
    different steps). With several processes they compare flags every SYNC_EVERY_STEPS steps only.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return _reason is not None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _reason is not None
    if step % SYNC_EVERY_STEPS:
        return False
    return _agree()


_REASON_CODES = {TERMINATED: 1, PREEMPTED: 2, TIMEOUT: 3}
_CODE_REASONS = {code: reason for reason, code in _REASON_CODES.items()}
