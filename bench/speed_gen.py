"""speed.py's `gen` workload: sampling for the pairs stage, new tokens/s.

baseline: plain `model.generate` (dynamic cache), float32. project: `pipeline.evaluation.sampling.sample_completions`
with the preset (static cache, compute dtype, pairs.batch_size), and the same with the other KV cache.
"""
from __future__ import annotations

from bench.common import Rows, peak_gib, reset_peak, timed
from bench.speed_setup import Context, model_copy, prompts


def generated_lengths(new_tokens, eos: int) -> list[int]:
    """Tokens each row generated: up to and including its first EOS."""
    return [row.index(eos) + 1 if eos in row else len(row) for row in new_tokens.tolist()]


def bench_gen(ctx: Context) -> list[dict]:
    import torch

    from pipeline.evaluation.sampling import sample_completions

    s, cfg, device, tok = ctx.sizes, ctx.cfg, ctx.device, ctx.tokenizer
    k = cfg.pairs.completions_per_prompt
    prompt_list = prompts(s, max(1, s.gen_sequences // k), cfg)
    baseline_batch = s.gen_batch_baseline
    baseline_flat = [p for p in prompt_list[:max(1, baseline_batch // k)] for _ in range(k)]
    batch = cfg.pairs.batch_size
    target_sequences = cfg.pairs.num_prompts * k
    sampling = dict(temperature=cfg.pairs.temperature, top_k=cfg.pairs.top_k, top_p=cfg.pairs.top_p)

    def hf_generate(model, max_new_tokens: int, sequences: list[str]) -> tuple[int, int]:
        """Plain `model.generate` (dynamic KV cache), left-padded batches; (tokens generated, sequences)."""
        total = 0
        for start in range(0, len(sequences), baseline_batch):
            enc = tok(sequences[start:start + baseline_batch], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
            total += sum(generated_lengths(out[:, enc["input_ids"].shape[1]:], tok.eos_token_id))
        return total, len(sequences)

    def project(kv_cache: str):
        def run(model, max_new_tokens: int, prompt_subset: list[str]) -> tuple[int, int]:
            # as pipeline/stages/pairs.py
            groups = sample_completions(model, tok, prompt_subset, num_samples=k, max_new_tokens=max_new_tokens,
                                        batch_size=batch, seed=cfg.seed, kv_cache=kv_cache,
                                        prompt_width=cfg.data.prompt_max_tokens, **sampling)
            return sum(len(x.completion_ids) for g in groups for x in g), sum(len(g) for g in groups)
        return run

    base_dt, proj_dt = ctx.dtype_name(ctx.baseline_dtype), ctx.dtype_name(ctx.project_dtype)
    other = "dynamic" if cfg.pairs.kv_cache == "static" else "static"
    # warm-up: one full batch at the full length (a static cache's shape includes the new tokens, and on
    # a GPU its decode step is compiled and graph-captured for exactly that shape)
    warm_prompts = prompt_list[:max(1, batch // k)]
    variants = [
        ("baseline", f"HF generate, dynamic cache, {base_dt}, batch {baseline_batch}", ctx.baseline_dtype,
         lambda m, n: hf_generate(m, n, baseline_flat), lambda m: hf_generate(m, 4, baseline_flat[:baseline_batch])),
        ("project", f"sample_completions, {cfg.pairs.kv_cache} cache, {proj_dt}, batch {batch} (preset)",
         ctx.project_dtype, lambda m, n: project(cfg.pairs.kv_cache)(m, n, prompt_list),
         lambda m: project(cfg.pairs.kv_cache)(m, s.gen_new_tokens, warm_prompts)),
        (f"project, {other} cache", f"as project, pairs.kv_cache={other}", ctx.project_dtype,
         lambda m, n: project(other)(m, n, prompt_list),
         lambda m: project(other)(m, s.gen_new_tokens, warm_prompts)),
    ]
    rows = Rows("gen", "new tokens/s", device)
    for name, settings, dtype, run, warm in variants:
        with rows.variant(name, settings) as row:
            reset_peak(device)
            model = model_copy(ctx.base, dtype, train=False)
            warm(model)
            (generated, sequences), seconds = timed(lambda: run(model, s.gen_new_tokens), device)
            rows.set_value(row, generated / seconds, mfu=None, sequences=sequences,
                           new_tokens_per_sequence=s.gen_new_tokens, generated_tokens=generated, seconds=seconds,
                           sequences_per_s=sequences / seconds,
                           projected_s=seconds / sequences * target_sequences * cfg.pairs.max_new_tokens
                           / s.gen_new_tokens,
                           projected_what=f"{target_sequences} x {cfg.pairs.max_new_tokens} new tokens "
                                          f"(pairs stage, all shards, one GPU)", peak_gib=peak_gib(device))
            model = None  # freed before the next variant's copy
    return rows
