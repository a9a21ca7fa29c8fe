"""speed.py's `sft` workload: SFT real tokens/s and MFU on an IMDb-like length distribution.

baseline: `trl.SFTTrainer` with TRL's defaults, padded batches. project: the preset through the stage
code (`batching.sft_trainer_class`: packed rows of max_length, `training.trainer_kwargs`), the preset
with padded batches, and with `sft.compile=MODE` for each --compile-modes.
"""
from __future__ import annotations

import dataclasses
import math

from bench.common import Rows, mfu, run_trainer
from bench.speed_setup import IMDB_TRAIN_REVIEWS, Context, lognormal_lengths, model_copy, sft_texts


def bench_sft(ctx: Context) -> list[dict]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.training.batching import sft_trainer_class
    from pipeline.models.policy import MASTER_WEIGHTS
    from pipeline.training.loop import trainer_kwargs

    s, cfg, device = ctx.sizes, ctx.cfg, ctx.device
    warmup = s.sft_warmup_steps + (ctx.args.compile_warmup_steps if ctx.compiling(cfg.sft) else 0)
    steps = s.sft_steps
    batch = cfg.sft.batch_size
    total_steps = warmup + steps
    # enough text for packing too: packed rows hold max_length tokens each
    expected_len = min(s.sft_mean, s.sft_max_length)
    n_texts = max(total_steps * batch, math.ceil(1.3 * total_steps * batch * s.sft_max_length / expected_len))
    texts = sft_texts(s, n_texts)
    mean_len = sum(lognormal_lengths(s, n_texts)) / n_texts
    n_params = ctx.n_params
    out_dir = ctx.workdir / "sft"

    def baseline():
        model = model_copy(ctx.base, ctx.baseline_dtype, train=True)
        args = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=total_steps,
                         max_length=s.sft_max_length, save_strategy="no", report_to=[], disable_tqdm=True,
                         seed=cfg.seed, bf16=ctx.on_gpu, use_cpu=not ctx.on_gpu)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                          processing_class=ctx.tokenizer)

    def project(packing: bool, compile_mode: str):
        def make():
            # as pipeline/stages/sft.py: float32 master weights + autocast, the preset's sft settings
            sft = dataclasses.replace(cfg.sft, packing=packing, compile=compile_mode)
            model = model_copy(ctx.base, MASTER_WEIGHTS, train=True)
            kwargs = trainer_kwargs(cfg, sft, out_dir, device, ctx.project_dtype, report_to=[])
            kwargs.update(max_steps=total_steps, save_strategy="no")
            args = SFTConfig(**kwargs, dataset_text_field="text", packing=sft.packing, packing_strategy="bfd")
            return sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                       processing_class=ctx.tokenizer)
        return make

    base_dt = ctx.dtype_name(ctx.baseline_dtype)
    amp = f"+{ctx.dtype_name(ctx.project_dtype)} autocast" if ctx.on_gpu else ""
    f = cfg.sft
    preset = f"preset: float32 weights{amp}, grad ckpt {'ON' if f.gradient_checkpointing else 'OFF'}"
    variants = [
        ("baseline", f"TRL defaults: {base_dt} weights{amp}, grad ckpt ON, padded batches", baseline),
        ("project", preset + f", packing={f.packing} (rows of max_length, per-row block-diagonal mask), "
                             f"compile={f.compile}", project(f.packing, f.compile)),
    ]
    if f.packing:
        variants.append(("project, padded", "as project, packing=False (padded batches)", project(False, f.compile)))
    variants += [(f"project+compile={mode}", f"as project, sft.compile={mode}", project(f.packing, mode))
                 for mode in ctx.args.compile_modes if mode != f.compile]
    projected_tokens = IMDB_TRAIN_REVIEWS * mean_len
    rows = Rows("sft", "tokens/s", device)
    for name, settings, make in variants:
        with rows.variant(name, settings) as row:
            r = run_trainer(make, warmup, steps, device)
            rate = r["tokens"] / r["measured_s"]
            rows.set_value(row, rate, mfu=mfu(6 * n_params * r["tokens"], r["measured_s"], ctx.peak_tflops),
                           steps_per_s=steps / r["measured_s"], tokens_per_step=r["tokens"] / steps,
                           padded_tokens_per_step=r["padded_tokens"] / steps, projected_s=projected_tokens / rate,
                           projected_what=f"1 epoch of {IMDB_TRAIN_REVIEWS} reviews "
                                          f"(~{projected_tokens / 1e6:.1f}M tokens)", **r)
    return rows
