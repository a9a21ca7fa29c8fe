"""Progress files that `launch.py status` reads while a stage runs.

One small JSON per stage (or beta / shard loop): step, total steps, last complete checkpoint and
restart history. Writes are throttled and atomic so polling never sees half a file.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.runtime.interrupt import KILLED
from pipeline.rundir.layout import atomic_write_json, read_json


def lost_steps(restarts: list[dict]) -> int:
    """Steps computed twice because a restart resumed from before where the previous attempt stopped.

    The one definition: progress files, DONE.json manifests and `status` all use it.
    """
    return sum(max(0, r["step_before"] - r["resumed_from_step"]) for r in restarts)


class ProgressFile:
    def __init__(self, path: Path, min_interval_s: float = 0.5, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # only the main process of a multi-process stage writes
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        previous = read_json(self.path, {}) or {}
        self.state: dict = {
            "step": previous.get("step", 0),
            "total_steps": previous.get("total_steps"),
            "last_checkpoint": previous.get("last_checkpoint"),
            "restarts": previous.get("restarts", []),
            "status": previous.get("status", "new"),
            "stop_reason": previous.get("stop_reason"),
        }

    def start(self, resumed_from_step: int | None, **details) -> None:
        """Record a (re)start; a start after the first is a restart, with the step it resumed from."""
        if self.path.exists():
            # an attempt that stopped on request recorded why (`stopped`); one that just vanished was killed
            cause = self.state.get("stop_reason") if self.state.get("status") == "interrupted" else KILLED
            self.state["restarts"].append({
                "cause": cause,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "step_before": self.state.get("step", 0),
                "resumed_from_step": resumed_from_step or 0,
                "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                **details,
            })
        self.state["status"] = "running"
        self.state.pop("stop_reason", None)
        # for the ETA: steps of this attempt over its wall time
        self.state["attempt_started_at"] = time.time()
        self.state["attempt_start_step"] = resumed_from_step or 0
        self.write(force=True)

    def stopped(self, reason: str, step: int) -> None:
        """Record a stop on request (the next start reads the reason as its restart cause)."""
        self.update(force=True, status="interrupted", stop_reason=reason, step=step)

    @property
    def lost_steps(self) -> int:
        return lost_steps(self.state["restarts"])

    def update(self, force: bool = False, **fields) -> None:
        self.state.update(fields)
        self.write(force=force)

    def write(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if not force and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        # forced writes (starts, checkpoints, ends) are durable; the frequent step updates need not be
        atomic_write_json(self.path, {**self.state, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, durable=force)
