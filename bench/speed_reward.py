"""speed.py's `reward` workload: classifier scoring, sequences/s (RoBERTa-large-shaped, random init).

baseline: a transformers `pipeline` with its defaults (the saved dtype, batch 1). project:
`pipeline.models.reward.ClassifierReward` + `score_in_batches` with the preset's reward settings.
"""
from __future__ import annotations

import dataclasses

from bench.common import Rows, peak_gib, reset_peak, timed
from bench.speed_setup import Context, reward_texts


def bench_reward(ctx: Context) -> list[dict]:
    from transformers import AutoTokenizer, pipeline

    from pipeline.models.reward import ClassifierReward, score_in_batches

    s, cfg, device = ctx.sizes, ctx.cfg, ctx.device
    path = ctx.classifier_dir
    texts = reward_texts(s, s.reward_sequences)
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(path)(texts)["input_ids"]]
    reward_cfg = dataclasses.replace(cfg.reward, kind="classifier", model=str(path))
    target = cfg.pairs.num_prompts * cfg.pairs.completions_per_prompt

    def baseline():
        # transformers pipeline defaults: the saved dtype (float32), batch_size 1
        pipe = pipeline("text-classification", model=str(path), device=device, top_k=None, truncation=True)
        return (lambda batch: pipe(batch)), pipe.model.dtype

    def project():
        reward = ClassifierReward(reward_cfg, device)  # bfloat16 on a GPU
        # whole texts: the prompt is the text, the completion empty (scored as prompt + completion)
        return (lambda batch: score_in_batches(reward, batch, [""] * len(batch), reward_cfg.batch_size)), \
            reward._pipe.model.dtype

    variants = [("baseline", "transformers pipeline defaults: {dtype}, batch_size 1", baseline),
                ("project", f"ClassifierReward + score_in_batches: {{dtype}}, batch {reward_cfg.batch_size}, "
                            f"max_length {reward_cfg.max_length}", project)]
    rows = Rows("reward", "seq/s", device)
    for name, settings, make in variants:
        with rows.variant(name, settings.format(dtype="?")) as row:
            reset_peak(device)
            score, dtype = make()
            row["settings"] = settings.format(dtype=ctx.dtype_name(dtype))
            score(texts[:min(len(texts), reward_cfg.batch_size)])  # warm-up
            _, seconds = timed(lambda: score(texts), device)
            rate = len(texts) / seconds
            rows.set_value(row, rate, mfu=None, sequences=len(texts), tokens_per_sequence=sum(lengths) / len(lengths),
                           seconds=seconds, projected_s=target / rate,
                           projected_what=f"{target} texts (pairs stage)", peak_gib=peak_gib(device))
            score = None
    return rows
