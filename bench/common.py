"""What the bench scripts share: GPT-2 Large's shape, and speed.py's timing and row bookkeeping.

Import-light on purpose (torch and transformers are imported inside the functions), so that
whole_run.py and gpu_check.py can take the shape from here without loading the ML stack.
"""
from __future__ import annotations

import contextlib
import gc
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# GPT-2 Large (774M parameters, tied embedding counted once), as `model.*` fields of a `tiny` model:
# the pipeline builds it from config (`pipeline.models.policy.build_tiny_base`), with 50,257 embedding rows
# whatever the size of the tokenizer, so the parameter count is the real one.
GPT2_LARGE_SHAPE = {"n_layer": 36, "n_embd": 1280, "n_head": 20, "n_positions": 1024, "embedding_rows": 50257}


def model_sets(shape: dict) -> list[str]:
    """`--set` overrides (`model.KEY=VALUE`) for a model shape such as GPT2_LARGE_SHAPE."""
    return [f"model.{key}={value}" for key, value in shape.items()]


# ----------------------------------------------------------------------------------------------------------------
# Device sync, memory, timing
# ----------------------------------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


_resident_bytes = 0  # GPU memory allocated when the current variant started (e.g. the bench's base model)


def reset_peak(device) -> None:
    """Start a variant's memory measurement: peak_gib() reports what it adds on top of what is resident now."""
    global _resident_bytes
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _resident_bytes = torch.cuda.memory_allocated(device)


def peak_gib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - _resident_bytes) / 2**30, 2)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device):
    """(result, seconds) of fn(), synchronised on both ends."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


@contextlib.contextmanager
def timed_method(cls, name: str, record: list[float], device):
    """Temporarily wrap `cls.name` so each call's wall time is appended to `record`."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        sync(device)
        record.append(time.perf_counter() - start)
        return result

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


@contextlib.contextmanager
def timed_functions(module, names: list[str], record: dict[str, float]):
    """Temporarily replace module-level functions with versions that add their wall time to `record`
    (callers that look them up on the module at call time see the wrapped ones)."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)  # returns CPU data: the device work is finished
            finally:
                record[name] = record.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------------------------------------------
# Rows: {"workload", "variant", "settings", "unit", "value", "vs_baseline", "mfu", ...}, one per variant
# ----------------------------------------------------------------------------------------------------------------

class Rows(list):
    """One workload's rows. `variant()` yields a row to fill in; a variant that raises is recorded as an
    error row and the next one still runs (one failed variant must not lose the whole GPU run)."""

    def __init__(self, workload: str, unit: str, device):
        super().__init__()
        self.workload = workload
        self.unit = unit
        self.device = device
        self.baseline_value = None

    @contextlib.contextmanager
    def variant(self, name: str, settings: str):
        row = {"workload": self.workload, "variant": name, "settings": settings, "unit": self.unit}
        try:
            yield row
        except Exception as exc:
            row.update(value=None, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        free_memory(self.device)
        self.append(row)

    def vs_baseline(self, value: float | None) -> float | None:
        return value / self.baseline_value if self.baseline_value and value is not None else None

    def set_value(self, row: dict, value: float, **fields) -> None:
        """The row's headline value (the `baseline` variant's becomes the reference) plus any raw fields."""
        row.update(value=value, **fields)
        if row["variant"] == "baseline":
            self.baseline_value = value
        row["vs_baseline"] = self.vs_baseline(value)


# ----------------------------------------------------------------------------------------------------------------
# Trainer timing: per-step wall time from a callback, real tokens per step from the data collator
# ----------------------------------------------------------------------------------------------------------------

def step_timer_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall clock at train begin and after every optimizer step; the only synchronisation added."""

        def __init__(self, device):
            self.device = device
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync(self.device)
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            sync(self.device)
            self.stamps.append(time.perf_counter())

    return StepTimer


class CountingCollator:
    """Wraps the trainer's collator and records the real (non-padding) tokens of every batch it builds.

    Batches are collated in the order they are consumed (the loader may prefetch one ahead), so the
    k-th entry belongs to optimizer step k (gradient_accumulation_steps = 1).
    """

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []
        self.padded: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            real = int(mask.sum())
        elif "position_ids" in batch and "labels" in batch:
            # packed rows (no mask): the targets plus each review's first token (position 0 followed by 1);
            # right padding also has position 0 but is followed by another 0
            pos = batch["position_ids"]
            starts = (pos[:, :-1] == 0) & (pos[:, 1:] == 1)
            real = int((batch["labels"] != -100).sum()) + int(starts.sum())
        else:
            real = int(ids.numel())
        self.tokens.append(real)
        self.padded.append(int(ids.numel()))
        return batch


def run_trainer(make_trainer, warmup: int, steps: int, device) -> dict:
    """Build a trainer (timed as setup), train warmup + steps optimizer steps, time the last `steps`."""
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    trainer = make_trainer()
    sync(device)
    setup_s = time.perf_counter() - start
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-log dict prints; the table is the output
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = step_timer_class()(device)
    trainer.add_callback(timer)
    trainer.train()
    step_times = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    if len(step_times) < warmup + steps:
        raise RuntimeError(f"only {len(step_times)} steps ran, expected {warmup + steps} (dataset too small?)")
    measured = step_times[warmup:warmup + steps]
    tokens = counter.tokens[warmup:warmup + steps]
    padded = counter.padded[warmup:warmup + steps]
    result = {"setup_s": round(setup_s, 3), "warmup_steps": warmup, "steps": steps,
              "step_times_s": [round(t, 4) for t in step_times], "measured_s": sum(measured),
              "tokens": sum(tokens), "padded_tokens": sum(padded), "peak_gib": peak_gib(device)}
    del trainer, counter, timer
    free_memory(device)
    return result
