#!/usr/bin/env python3
"""The whole `gpt2-large` experiment on one machine, timed (a benchmark, not a test).

`launch.py run --preset gpt2-large --executor local` with what a machine without the hub can have:
a GPT-2 built from config at GPT-2 Large's shape (random weights, 774M parameters with 50,257
embedding rows), the generated review corpus at IMDb's size and review length (25,000 reviews per
split, ~250 words each), VADER as the reward (the classifier is timed by bench/speed.py), no wandb,
one process (no ZeRO). Every other setting is the preset's: 1,000 prompts x 4 completions, DPO for
three betas with checkpoints every 100 steps, eval of SFT and every checkpoint. Stages run one after
another as local jobs (queue wait excluded by construction). Prints and writes the wall time of each
unit (sft, pairs, each beta, each eval task, the eval assembly) and the total.

  python bench/whole_run.py --run-dir /tmp/whole --out /tmp/whole.json            # one GPU
  python bench/whole_run.py --smoke --run-dir /tmp/whole-smoke                     # CPU, minutes
  python bench/whole_run.py --run-dir /tmp/whole --set dpo.compile=reduce-overhead  # extra overrides
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import GPT2_LARGE_SHAPE, model_sets  # noqa: E402

GPT2_LARGE = ["model.name=tiny", *model_sets(GPT2_LARGE_SHAPE), "model.vocab_size=8000"]
OFFLINE = ["data.dataset=tiny", "data.tiny_reviews=25000", "data.tiny_max_sentences=80", "reward.kind=vader",
           "wandb.enabled=false", "distributed.zero_stage=0"]
# --smoke: the same flow with a small model and few examples, to check the script on a CPU
SMOKE = ["device=cpu", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_positions=256",
         "model.embedding_rows=null", "model.vocab_size=1000", "data.tiny_reviews=300", "data.tiny_max_sentences=8",
         "sft.max_length=256", "dpo.max_length=256", "pairs.num_prompts=24", "pairs.max_new_tokens=16",
         "pairs.batch_size=32", "pairs.num_shards=2", "dpo.save_steps=4", "eval.num_prompts=8",
         "eval.max_new_tokens=16", "eval.batch_size=32"]


def stage_times(run_dir: Path, started: float) -> dict[str, float]:
    """Wall time of each unit, process start and model loading included: local units run one after
    another, so each one's share is the time between consecutive DONE.json files."""
    done = sorted(run_dir.glob("**/DONE.json"), key=lambda p: p.stat().st_mtime)
    times, previous = {}, started
    for path in done:
        finished = path.stat().st_mtime
        times[str(path.parent.relative_to(run_dir))] = round(finished - previous, 1)
        previous = finished
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a new run directory (reruns skip finished stages)")
    parser.add_argument("--out", help="write the timings as JSON here")
    parser.add_argument("--smoke", action="store_true", help="small model and data: a CPU check of the flow")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides (a.b=value)")
    args = parser.parse_args()
    overrides = GPT2_LARGE + OFFLINE + (SMOKE if args.smoke else []) + args.set
    command = [sys.executable, str(REPO / "launch.py"), "run", "--preset", "gpt2-large", "--executor", "local",
               "--run-dir", args.run_dir]
    for item in overrides:
        command += ["--set", item]
    print(" ".join(command), flush=True)
    started, started_wall = time.perf_counter(), time.time()
    proc = subprocess.run(command, cwd=REPO)
    total = time.perf_counter() - started
    run_dir = Path(args.run_dir)
    report = {"command": command, "returncode": proc.returncode, "total_wall_s": round(total, 1),
              "stages_wall_s": stage_times(run_dir, started_wall)}
    frontier = run_dir / "eval" / "frontier.csv"
    if frontier.is_file():
        report["frontier_csv"] = frontier.read_text()
    try:
        import torch

        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        report["device"] = None
    print(f"\ndevice: {report['device']}   total wall time: {total:.1f} s (exit status {proc.returncode})")
    for stage, seconds in report["stages_wall_s"].items():
        print(f"  {stage:<22} {seconds:>8.1f} s" if seconds is not None else f"  {stage:<22}        -")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
