"""The trainer's logged metrics, kept in the stage directory as one JSON line per log record.

Written by the training callback (main process only) as `{"step": N, <metric>: value, ...}` with
the Trainer's own metric names (`loss`, `learning_rate`, TRL's `rewards/margins`, ...); read back by
`pipeline.reporting.curves` for the report's training curves. Kept apart from checkpoints so it survives
their pruning and deletion, and apart from wandb so a run without wandb has it too.

Requeue/resume: a resumed attempt re-logs every step after the checkpoint it resumed from. The
writer therefore drops the records after that step when an attempt begins (`keep_through_step`),
and the reader resolves any duplicate that is left (a file written without that cut) in favour of
the later line, i.e. the later attempt.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Iterable

from pipeline.rundir.layout import atomic_write_text

STEP = "step"


def numeric_metrics(logs: dict) -> dict:
    """The numeric values of a log record (a non-finite value becomes null, which JSON can carry)."""
    metrics = {}
    for name, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = value if isinstance(value, int) else float(value)
        metrics[name] = value if math.isfinite(value) else None
    return metrics


class MetricsLog:
    """Append-only JSON-lines log of one training stage (one directory: SFT, or one DPO arm)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, step: int, logs: dict) -> None:
        """One whole line per record in one write, flushed: a killed job leaves at most a torn last
        line, which the next attempt's `keep_through_step` and the reader both drop."""
        metrics = numeric_metrics(logs)
        if not metrics:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**metrics, STEP: int(step)}, sort_keys=True) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()

    def sync(self) -> None:
        """Make every line written so far durable (called before a checkpoint counts as complete, so
        the log reaches at least the step a resumed attempt continues from)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def keep_through_step(self, step: int) -> None:
        """Drop the records after `step` (and torn lines): called when an attempt begins at `step`,
        because it logs the later steps again."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        kept = [record for record in parse_lines(text) if record[STEP] <= step]
        if len(kept) != len(text.splitlines()):  # rewritten only when something is dropped
            atomic_write_text(self.path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in kept))


def parse_lines(text: str) -> list[dict]:
    """The complete records of a log's text, in file order; a torn or foreign line is skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get(STEP), int):
            records.append(record)
    return records


def merge_by_step(records: Iterable[dict]) -> dict[int, dict]:
    """Step -> {metric: value}, ascending by step. For a metric logged more than once at a step (a
    resumed attempt logging it again) the later record wins; different metrics logged at the same
    step by one attempt (a log and the end-of-training summary) are kept side by side."""
    by_step: dict[int, dict] = {}
    for record in records:
        values = by_step.setdefault(record[STEP], {})
        values.update({name: value for name, value in record.items() if name != STEP})
    return dict(sorted(by_step.items()))


def read_metrics_log(path: Path) -> dict[int, dict] | None:
    """A stage's metrics by step (see `merge_by_step`), or None when the stage kept no log."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return merge_by_step(parse_lines(text))
