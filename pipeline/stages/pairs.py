"""Stage 2: sample completions from the SFT model, score them, and build preference pairs.

Prompts are split into `pairs.num_shards` shards (array tasks on SLURM); each shard's file is
written atomically and is its own completion marker. `merge` joins the shards, writes every
ranked generation and all k*(k-1)/2 pairs per prompt, then the stage's DONE.json.
"""
from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

from pipeline.runtime import interrupt
from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.rundir.layout import RunLayout, atomic_write_jsonl, read_json, read_jsonl, write_manifest
from pipeline.rundir.progress import ProgressFile
from pipeline.registry import Shard


def shard_prompts(prompts: list[str], shard: int, num_shards: int) -> list[str]:
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside [0, {num_shards})")
    return prompts[shard::num_shards]


def build_pairs(prompt: str, completions: list[dict]) -> list[dict]:
    """Every pair of completions of one prompt, the higher-reward one chosen.

    Ties carry no preference and are dropped (with a continuous classifier they do not occur;
    VADER gives many texts exactly 0.5).
    """
    pairs = []
    for a, b in itertools.combinations(completions, 2):
        if a["reward"] == b["reward"]:
            continue
        chosen, rejected = (a, b) if a["reward"] > b["reward"] else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen["completion"], "rejected": rejected["completion"],
                      "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"]})
    return pairs


def run_shard(cfg: PipelineConfig, layout: RunLayout, task: Shard) -> int:
    """Generate and score one shard; returns the number of prompts it holds (0 if already done)."""
    shard = task.index
    out = layout.pairs_shard(shard)
    if out.is_file():
        return 0
    from tqdm import tqdm

    from pipeline.models.policy import load_model, load_tokenizer, resolve_device, resolve_dtype, setup_process
    from pipeline.models.reward import make_reward, score_in_batches
    from pipeline.evaluation.sampling import sample_resumable

    setup_process(cfg)
    prompts = shard_prompts([r["prompt"] for r in read_jsonl(layout.pair_prompts)], shard, cfg.pairs.num_shards)
    device = resolve_device(cfg)
    tokenizer = load_tokenizer(layout.sft_model, cfg.model.chat_template)
    model = load_model(layout.sft_model, device, resolve_dtype(cfg.model, device))
    k = cfg.pairs.completions_per_prompt
    with tqdm(total=len(prompts) * k, desc=f"pairs shard {shard}: sampling", mininterval=5) as bar:
        # saved per sampling batch: a stop (time limit, preemption) loses at most the batch in flight
        samples = sample_resumable(model, tokenizer, prompts, partial_dir(layout, shard), f"pairs shard {shard}",
                                   num_samples=k, max_new_tokens=cfg.pairs.max_new_tokens,
                                   temperature=cfg.pairs.temperature, top_k=cfg.pairs.top_k, top_p=cfg.pairs.top_p,
                                   batch_size=cfg.pairs.batch_size, seed=cfg.seed * 1000 + shard,
                                   kv_cache=cfg.pairs.kv_cache, prompt_width=cfg.data.prompt_max_tokens,
                                   progress=bar)
    del model
    interrupt.check(None, f"pairs shard {shard}: every completion sampled and saved")
    reward = make_reward(cfg.reward, device)
    flat = [s for group in samples for s in group]
    with tqdm(total=len(flat), desc=f"pairs shard {shard}: scoring", mininterval=5) as bar:
        scores = score_in_batches(reward, [s.prompt for s in flat], [s.completion for s in flat], cfg.reward.batch_size,
                                  progress=bar)
    rows, index = [], 0
    for prompt, group in zip(prompts, samples):
        completions = []
        for s in group:
            completions.append({"completion": s.completion, "reward": scores[index], "num_tokens": len(s.completion_ids)})
            index += 1
        completions.sort(key=lambda c: -c["reward"])
        rows.append({"prompt": prompt, "completions": completions})
    atomic_write_jsonl(out, rows)
    shutil.rmtree(partial_dir(layout, shard), ignore_errors=True)
    return len(rows)


def partial_dir(layout: RunLayout, shard: int) -> Path:
    """Sampling batches of an unfinished shard, kept across a stop and requeue."""
    return layout.pairs_shard(shard).with_suffix(".partial")


def missing_shards(cfg: PipelineConfig, layout: RunLayout) -> list[int]:
    return [s for s in range(cfg.pairs.num_shards) if not layout.pairs_shard(s).is_file()]


def merge(cfg: PipelineConfig, layout: RunLayout) -> dict:
    if layout.is_done("pairs"):
        return read_json(layout.done_path("pairs"))
    started = time.time()
    missing = missing_shards(cfg, layout)
    if missing:
        raise RuntimeError(f"pairs: shards {missing} are not finished; run them before merging")
    generations = [row for s in range(cfg.pairs.num_shards) for row in read_jsonl(layout.pairs_shard(s))]
    pairs = [p for row in generations for p in build_pairs(row["prompt"], row["completions"])]
    k = cfg.pairs.completions_per_prompt
    atomic_write_jsonl(layout.generations_file, generations)
    atomic_write_jsonl(layout.pairs_file, pairs)
    all_rewards = [c["reward"] for row in generations for c in row["completions"]]
    metrics = {
        "prompts": len(generations),
        "completions": len(all_rewards),
        "pairs": len(pairs),
        "pairs_possible": len(generations) * k * (k - 1) // 2,
        "pairs_dropped_ties": len(generations) * k * (k - 1) // 2 - len(pairs),
        "reward/mean": sum(all_rewards) / max(1, len(all_rewards)),
        "rewards/chosen": sum(p["chosen_reward"] for p in pairs) / max(1, len(pairs)),
        "rewards/rejected": sum(p["rejected_reward"] for p in pairs) / max(1, len(pairs)),
    }
    ProgressFile(layout.progress_path("pairs")).update(force=True, status="done", step=cfg.pairs.num_shards,
                                                       total_steps=cfg.pairs.num_shards)
    return write_manifest(layout.done_path("pairs"), config=to_dict(cfg), started=started,
                          inputs={"sft_model": str(layout.sft_model), "shards": cfg.pairs.num_shards},
                          metrics=metrics)
