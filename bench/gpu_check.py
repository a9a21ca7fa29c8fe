#!/usr/bin/env python3
"""GPU check (not part of CI): GPT-2 Large built from its config (random init: no hub access on GPU
nodes), a few SFT and DPO steps in bf16 under DeepSpeed ZeRO-2 through the project's own stage code,
each interrupted by a real SIGUSR2 mid-run (save at that step) and resumed. Prints step times, peak
GPU memory and whether the resume lost steps; writes the same as JSON.

  python bench/gpu_check.py --out /tmp/gpu_check            # on one GPU (a few minutes)
  python bench/gpu_check.py --out /tmp/gpu_check --tiny     # the same flow on the CPU, small model
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import GPT2_LARGE_SHAPE, model_sets  # noqa: E402


def settings(tiny: bool) -> list[str]:
    common = ["data.tiny_reviews=400", "data.max_train_examples=320", "sft.epochs=1", "sft.batch_size=8",
              "sft.save_steps=10", "sft.logging_steps=5", "sft.max_length=512", "pairs.num_prompts=64",
              "pairs.num_shards=1", "pairs.max_new_tokens=64", "dpo.betas=[0.1]", "dpo.batch_size=8",
              "dpo.save_steps=10", "dpo.logging_steps=5", "dpo.learning_rate=1e-5", "sft.learning_rate=1e-4",
              "eval.num_prompts=8",
              # padded batches: 40 SFT steps, so the interrupt at step 15 happens (packed rows of these short
              # reviews make 3 to 9 steps); packing has its own tests
              "sft.packing=false"]
    if tiny:
        return common + ["device=cpu", "model.dtype=float32", "distributed.zero_stage=2",
                         "sft.max_length=128"]  # the tiny model's context
    return common + model_sets(GPT2_LARGE_SHAPE) + ["device=cuda", "model.dtype=bfloat16", "distributed.zero_stage=2"]


def run_job(run_dir: Path, stage: str, task: str | None, stop_at: int | None) -> float:
    """Run one stage task as a subprocess; with `stop_at`, send SIGUSR2 once that step is reached."""
    from pipeline.rundir.layout import RunLayout
    from pipeline.registry import get_stage

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from jobs.stages import StageJob; "
            "StageJob(sys.argv[2], sys.argv[3], sys.argv[4] or None, time_limit_s=60, signal_lead_s=30)()")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(run_dir), stage, task or ""])
    progress = get_stage(stage).progress_path(RunLayout(run_dir), get_stage(stage).parse_task(task))
    while stop_at is not None and proc.poll() is None:
        try:
            if json.loads(progress.read_text()).get("step", 0) >= stop_at:
                proc.send_signal(signal.SIGUSR2)
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.wait()
    return time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run directory (wiped)")
    parser.add_argument("--tiny", action="store_true", help="CPU sanity run with the tiny model")
    args = parser.parse_args()
    from jobs.config import resolve_config, save_config
    from pipeline.rundir.layout import RunLayout
    from pipeline.registry import get_stage

    run_dir = Path(args.out).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    layout = RunLayout(run_dir)
    save_config(resolve_config("tiny", sets=settings(args.tiny)), layout)
    report: dict = {"device": "cpu"}
    try:
        import torch

        if torch.cuda.is_available():
            report["device"] = torch.cuda.get_device_name(0)
        report["torch"] = torch.__version__
    except ImportError:
        pass
    # pairs.num_shards=1: one pairs task (shard 0), then the merge
    for stage, task, stop_at in (("sft", None, 15), ("pairs", "0", None), ("pairs_merge", None, None),
                                 ("dpo", "0.1", 12)):
        wall = [run_job(run_dir, stage, task, stop_at)]
        if stop_at is not None:
            wall.append(run_job(run_dir, stage, task, None))  # the resume
        spec, parsed = get_stage(stage), get_stage(stage).parse_task(task)
        if not spec.is_done(layout, parsed):
            print(f"FAILED: {stage} did not finish; see the output above", file=sys.stderr)
            return 1
        done = spec.done_path(layout, parsed)  # a pairs shard has none: the merge writes it
        manifest = json.loads(done.read_text()) if done.is_file() else {}
        metrics = manifest.get("metrics", {})
        steps = metrics.get("global_step")
        runtime = metrics.get("train_runtime")
        report[stage] = {
            "wall_s": [round(w, 1) for w in wall], "steps": steps,
            "train_runtime_last_attempt_s": runtime,
            "peak_gib": metrics.get("memory/peak_allocated_gib"),
            "restarts": manifest.get("restarts"), "lost_steps": manifest.get("lost_steps"),
            "resume_ok": None if stop_at is None else (manifest.get("lost_steps") == 0
                                                       and len(manifest.get("restarts", [])) == 1),
        }
    print(json.dumps(report, indent=2))
    (run_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    ok = all(report[s]["resume_ok"] for s in ("sft", "dpo"))
    print("resume OK" if ok else "resume FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
