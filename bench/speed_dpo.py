"""speed.py's `dpo` workload: DPO steps/s and MFU, 8 pairs per step.

baseline: `trl.DPOTrainer` with TRL's defaults (fp32 weights + bf16 autocast on a GPU, gradient
checkpointing, live reference, random batches). project: the preset through the stage code
(`batching.dpo_trainer_class`, `training.trainer_kwargs`), also shown amortized (reference pass
included), and with `dpo.compile=MODE` for each --compile-modes.
"""
from __future__ import annotations

import dataclasses
import math

from bench.common import Rows, mfu, run_trainer, timed_method
from bench.speed_setup import Context, dpo_pairs, model_copy


def bench_dpo(ctx: Context) -> list[dict]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline.training.batching import dpo_trainer_class
    from pipeline.models.policy import MASTER_WEIGHTS
    from pipeline.training.loop import trainer_kwargs

    s, cfg, device = ctx.sizes, ctx.cfg, ctx.device
    # compiled variants compile (and record CUDA graphs) for each new batch shape during the warm-up
    warmup = s.dpo_warmup_steps + (ctx.args.compile_warmup_steps if ctx.compiling(cfg.dpo) else 0)
    steps = s.dpo_steps
    batch = cfg.dpo.batch_size
    total_steps = warmup + steps
    rows_data = dpo_pairs(s, total_steps * batch)  # exactly the steps run: precompute covers just these
    n_params = ctx.n_params
    out_dir = ctx.workdir / "dpo"

    def baseline():
        policy = model_copy(ctx.base, ctx.baseline_dtype, train=True)
        ref = model_copy(ctx.base, ctx.baseline_dtype, train=False)  # a live reference (TRL's default)
        args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=total_steps,
                         save_strategy="no", report_to=[], disable_tqdm=True, seed=cfg.seed,
                         bf16=ctx.on_gpu,  # TRL's default is bf16=True; on the CPU it is turned off
                         use_cpu=not ctx.on_gpu)
        return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows_data),
                          processing_class=ctx.tokenizer)

    def project(compile_mode: str):
        def make():
            # as pipeline/stages/dpo.py: float32 master weights + autocast, the preset's dpo settings
            dpo = dataclasses.replace(cfg.dpo, compile=compile_mode)
            policy = model_copy(ctx.base, MASTER_WEIGHTS, train=True)
            ref = None if dpo.precompute_ref_log_probs else model_copy(ctx.base, MASTER_WEIGHTS, train=False)
            kwargs = trainer_kwargs(cfg, dpo, out_dir, device, ctx.project_dtype, report_to=[])
            kwargs.update(max_steps=total_steps, save_strategy="no")
            args = DPOConfig(**kwargs, beta=dpo.betas[0], loss_type=["sigmoid"],
                             precompute_ref_log_probs=dpo.precompute_ref_log_probs)
            return dpo_trainer_class()(model=policy, ref_model=ref, args=args,
                                       train_dataset=Dataset.from_list(rows_data), processing_class=ctx.tokenizer)
        return make

    base_dt = ctx.dtype_name(ctx.baseline_dtype)
    amp = f"+{ctx.dtype_name(ctx.project_dtype)} autocast" if ctx.on_gpu else ""
    d = cfg.dpo
    preset = (f"preset: float32 weights{amp}, grad ckpt {'ON' if d.gradient_checkpointing else 'OFF'}, "
              f"{'precomputed' if d.precompute_ref_log_probs else 'live'} ref, group_by_length={d.group_by_length}, "
              f"pad_to_multiple_of={d.pad_to_multiple_of}")
    variants = [("baseline", f"TRL defaults: {base_dt} weights{amp}, grad ckpt ON, live ref", baseline, True),
                ("project", preset + f", compile={d.compile}", project(d.compile), not d.precompute_ref_log_probs)]
    variants += [(f"project+compile={mode}", f"as project, dpo.compile={mode}", project(mode),
                  not d.precompute_ref_log_probs) for mode in ctx.args.compile_modes if mode != d.compile]
    rows = Rows("dpo", "steps/s", device)
    projected_steps = math.ceil(cfg.pairs.num_prompts * math.comb(cfg.pairs.completions_per_prompt, 2) / batch)
    for name, settings, make, live_ref in variants:
        with rows.variant(name, settings) as row:
            precompute_s: list[float] = []
            with timed_method(DPOTrainer, "_precompute_ref_logps", precompute_s, device):
                r = run_trainer(make, warmup, steps, device)
            rate = steps / r["measured_s"]
            flops = (6 + (2 if live_ref else 0)) * n_params * r["tokens"]  # policy fwd+bwd (+ reference fwd)
            rows.set_value(row, rate, mfu=mfu(flops, r["measured_s"], ctx.peak_tflops),
                           tokens_per_step=r["tokens"] / steps, padded_tokens_per_step=r["padded_tokens"] / steps,
                           projected_s=projected_steps / rate, projected_what=f"{projected_steps} steps (one beta)",
                           **r)
            if precompute_s:
                # the reference pass covered the total_steps batches of the dataset; charge the measured share
                share = sum(precompute_s) * steps / total_steps
                amortized = steps / (r["measured_s"] + share)
                row.update(precompute_s=round(sum(precompute_s), 3), amortized_steps_per_s=amortized,
                           amortized_mfu=mfu(8 * n_params * r["tokens"], r["measured_s"] + share, ctx.peak_tflops),
                           projected_s=projected_steps / amortized,
                           note="value excludes the reference pass; amortized_* include it (one beta; the "
                                "pipeline caches it on disk and shares it between betas)")
        row = rows[-1]
        if "amortized_steps_per_s" in row:
            rows.append({"workload": "dpo", "variant": f"{name} (amortized)",
                         "settings": "incl. the reference log-prob pass", "unit": "steps/s",
                         "value": row["amortized_steps_per_s"], "mfu": row["amortized_mfu"],
                         "vs_baseline": rows.vs_baseline(row["amortized_steps_per_s"]),
                         "projected_s": row["projected_s"], "projected_what": row["projected_what"]})
    return rows
