#!/usr/bin/env python3
"""Speed benchmark (not a test, not part of CI): each workload of the pipeline timed twice in ONE run on
the same machine, once with library defaults ("baseline") and once with this project's own stage
settings ("project", plus a variant or two), so the ratios are same-machine.

  dpo     DPO steps/s and MFU, 8 pairs per step: TRL DPOTrainer with TRL defaults vs the gpt2-large preset
          through the stage code (length-grouped batches, precomputed reference, fp32 master weights +
          autocast), and the preset with torch.compile (--compile-modes)                  bench/speed_dpo.py
  sft     SFT tokens/s and MFU on an IMDb-like length distribution: TRL SFTTrainer defaults vs the preset
          (packed rows), the preset with padded batches, and with torch.compile          bench/speed_sft.py
  gen     sampling for the pairs stage: new tokens/s, plain HF generate vs pipeline.evaluation.sampling.sample_completions
          (static cache, batch 500) and the same with the dynamic cache; projected for 1,000 prompts x 4 x 128
                                                                                         bench/speed_gen.py
  reward  classifier scoring, sequences/s for 128 x 160 tokens (transformers pipeline defaults vs
          pipeline.models.reward.ClassifierReward)                                              bench/speed_reward.py
  eval    one policy's evaluation (pipeline.evaluation.policies.evaluate_policy: sampling + reward + KL), 100 prompts x 4
                                                                                         bench/speed_eval.py

Models are built from their configs with random weights (the pipeline's tiny GPT-2 at GPT-2 Large's shape, a
RoBERTa-large shaped classifier), tokenizers are word-level ones (one word = one token, so sequence lengths
are exact): no hub, no internet (bench/speed_setup.py). The project rows use the `gpt2-large` preset with
distributed.zero_stage=0 (one process, no DeepSpeed) and wandb off. Timing and rows: bench/common.py.

  python bench/speed.py --out /tmp/speed.json                    # one GPU (a few minutes)
  OMP_NUM_THREADS=1 python bench/speed.py --tiny --out /tmp/speed_tiny.json   # CPU smoke run (a few minutes)
  python bench/speed.py --only dpo,sft --peak-tflops 989 --out /tmp/speed.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.speed_setup import FULL, TINY, Context, Sizes  # noqa: E402

WORKLOADS = ("dpo", "sft", "gen", "reward", "eval")


def workload(name: str):
    """The workload's function (its module imported only when it runs)."""
    import importlib

    return getattr(importlib.import_module(f"bench.speed_{name}"), f"bench_{name}")


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def fmt_seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} s" if value < 3600 else f"{value / 3600:.2f} h"


def print_table(rows: list[dict]) -> None:
    header = ["workload", "variant", "value", "unit", "MFU", "vs base", "peak GiB", "projected", "settings"]
    lines = []
    for r in rows:
        value = "ERROR" if r.get("error") else fmt(r.get("value"), ".4g")
        lines.append([r["workload"], r["variant"], value, r["unit"],
                      "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                      "-" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}x",
                      fmt(r.get("peak_gib"), ".1f"), fmt_seconds(r.get("projected_s")), r.get("settings", "")])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    print()
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    print()
    for r in rows:
        if r.get("projected_what"):
            print(f"  projected [{r['workload']} / {r['variant']}]: {r['projected_what']}")
        if r.get("error"):
            print(f"  ERROR [{r['workload']} / {r['variant']}]: {r['error']}")
        if r.get("note"):
            print(f"  note [{r['workload']} / {r['variant']}]: {r['note']}")
        if r["workload"] == "eval" and r.get("value") is not None:
            print(f"  eval breakdown: sampling {fmt(r['sampling_s'])} s, reward {fmt(r['reward_s'])} s, "
                  f"KL log-probs {fmt(r['kl_s'])} s for {r['samples']} samples")
    print()


def environment(device, args, sizes: Sizes) -> dict:
    import torch
    import transformers
    import trl

    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha, "torch_threads": torch.get_num_threads(), "tiny": args.tiny,
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "mfu_formula": "DPO: (6 N T_policy + 2 N T_ref) / (step_time * peak); SFT: 6 N T / (time * peak); "
                       "N = parameters (tied embedding once), T = real (non-padding) tokens; attention FLOPs "
                       "and gradient-checkpointing recompute not counted",
        "sizes": dataclasses.asdict(sizes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small model, few steps: a CPU smoke run")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every workload)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak dense bf16 TFLOP/s for MFU (H100/H200 SXM: 989; H100 PCIe: 756)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dpo-steps", type=int, help="measured DPO steps (after warm-up)")
    parser.add_argument("--sft-steps", type=int, help="measured SFT steps (after warm-up)")
    parser.add_argument("--compile-modes", default="reduce-overhead",
                        help="extra DPO/SFT variants with this torch.compile mode (comma-separated; '' for none)")
    parser.add_argument("--compile-warmup-steps", type=int, default=6,
                        help="extra warm-up steps (every DPO/SFT variant) when a compiled variant runs")
    args = parser.parse_args()
    from pipeline.config import COMPILE_MODES

    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    if set(args.compile_modes) - set(COMPILE_MODES):
        parser.error(f"--compile-modes: choose from {', '.join(COMPILE_MODES)}")
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(only) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sizes = TINY if args.tiny else FULL
    if args.dpo_steps:
        sizes = dataclasses.replace(sizes, dpo_steps=args.dpo_steps)
    if args.sft_steps:
        sizes = dataclasses.replace(sizes, sft_steps=args.sft_steps)

    report = {"environment": environment(device, args, sizes), "rows": []}
    print(f"device: {report['environment']['device']}  torch {torch.__version__}  "
          f"transformers {report['environment']['transformers']}  trl {report['environment']['trl']}"
          f"  workloads: {','.join(only)}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speed-bench-") as tmp:
        ctx = Context(args, sizes, device, Path(tmp))
        report["environment"]["n_params_policy"] = ctx.n_params if {"dpo", "sft", "gen", "eval"} & set(only) else None
        for name in WORKLOADS:
            if name not in only:
                continue
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                rows = workload(name)(ctx)
            except Exception as exc:  # set-up failures (model build, imports): record and go on
                traceback.print_exc()
                rows = [{"workload": name, "variant": "-", "unit": "-", "value": None,
                         "error": f"{type(exc).__name__}: {exc}"}]
            for row in rows:
                row["workload_wall_s"] = round(time.perf_counter() - t0, 1)
            report["rows"].extend(rows)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    report["environment"]["total_wall_s"] = round(time.perf_counter() - started, 1)
    print_table(report["rows"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    print(f"total wall time {report['environment']['total_wall_s']} s")
    return 1 if any(r.get("error") for r in report["rows"]) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
