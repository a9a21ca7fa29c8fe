"""Stage 2 with pairs.source=dataset: convert and validate the preference dataset instead of sampling.

`convert` (the pairs array's one task) reads pairs.train_split, leaves out the held-out eval prompts
(RUN/data/eval_prompts.jsonl, written by the sft stage), drops rows that are empty, have identical
chosen and rejected, or are longer than dpo.max_length tokens with the SFT model's tokenizer, and
writes the kept pairs as shard 0 (its counts first, beside it). `merge` writes pairs.jsonl in the form
the dpo stage reads and DONE.json with every count: nothing is dropped without a number.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.data import preferences
from pipeline.registry import Shard
from pipeline.rundir.layout import RunLayout, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl, write_manifest
from pipeline.rundir.progress import ProgressFile


def counts_path(layout: RunLayout) -> Path:
    return layout.pairs_shard(0).with_suffix(".counts.json")


def convert(cfg: PipelineConfig, layout: RunLayout, task: Shard) -> int:
    """Convert the training split; returns the number of pairs kept (0 if already done)."""
    if task.index != 0:
        raise ValueError(f"pairs: pairs.source=dataset has one task (0), not {task.index}")
    out = layout.pairs_shard(0)
    if out.is_file():
        return 0
    from pipeline.models.policy import load_tokenizer

    tokenizer = load_tokenizer(layout.sft_model, cfg.model.chat_template)
    split = preferences.open_split(cfg, cfg.pairs.train_split, "pairs.train_split")
    train = preferences.convert(cfg, split, tokenizer)  # chat data rendered with the policy's template
    eval_prompts = [r["prompt"] for r in read_jsonl(layout.eval_prompts)]
    rows = preferences.training_rows(train, eval_prompts)
    held_out = len(train.rows) - len(rows)
    rows, too_long = preferences.drop_too_long(rows, tokenizer, cfg.dpo.max_length)
    rows = [{role: row[role] for role in ("prompt", "chosen", "rejected")} for row in rows]  # as DPO reads them
    dropped = {**train.dropped, "too_long": too_long}
    if not rows:
        raise ValueError(f"pairs.dataset: no usable pairs left in {cfg.pairs.dataset} ({train.total} rows; dropped "
                         f"{dropped}; {held_out} held out for eval): raise dpo.max_length or use another dataset")
    atomic_write_json(counts_path(layout), {"rows": train.total, "held_out_rows": held_out, "dropped": dropped,
                                            "implicit_prompt": train.implicit_prompt,
                                            "conversational": train.conversational})
    atomic_write_jsonl(out, rows)  # written last: the task's completion marker
    return len(rows)


def merge(cfg: PipelineConfig, layout: RunLayout) -> dict:
    if layout.is_done("pairs"):
        return read_json(layout.done_path("pairs"))
    started = time.time()
    if not layout.pairs_shard(0).is_file():
        raise RuntimeError("pairs: the converting task (0) has not finished; run it before merging")
    pairs = read_jsonl(layout.pairs_shard(0))
    counts = read_json(counts_path(layout))
    atomic_write_jsonl(layout.pairs_file, pairs)
    metrics = {"source": "dataset", "rows": counts["rows"], "pairs": len(pairs),
               "held_out_rows": counts["held_out_rows"], "implicit_prompt": counts["implicit_prompt"],
               "conversational": counts.get("conversational", False),
               **{f"dropped_{reason}": n for reason, n in counts["dropped"].items()},
               "prompts": len({p["prompt"] for p in pairs})}
    dropped = counts["dropped"]
    summary = (f"pairs: {len(pairs)} pairs from {counts['rows']} rows of {cfg.pairs.dataset} [{cfg.pairs.train_split}]; "
               f"dropped {dropped['empty']} empty, {dropped['identical']} with identical chosen/rejected, "
               f"{dropped['too_long']} longer than dpo.max_length={cfg.dpo.max_length} tokens; "
               f"{counts['held_out_rows']} rows held out (eval prompts)")
    ProgressFile(layout.progress_path("pairs")).update(force=True, status="done", step=1, total_steps=1)
    return write_manifest(layout.done_path("pairs"), config=to_dict(cfg), started=started,
                          inputs={"sft_model": str(layout.sft_model), "dataset": cfg.pairs.dataset,
                                  "split": cfg.pairs.train_split, "columns": preferences.column_names(cfg)},
                          metrics=metrics, extra={"summary": summary})
