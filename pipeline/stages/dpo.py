"""Stage 3: DPO (TRL DPOTrainer) for one beta; the sweep is one independent call per beta.

Policy and reference both start from the SFT model (as in the seed report).
"""
from __future__ import annotations

import time

from pipeline import distributed
from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.layout import RunLayout, beta_tag, read_json, write_manifest
from pipeline.progress import ProgressFile


def run(cfg: PipelineConfig, layout: RunLayout, beta: float) -> dict:
    tag = beta_tag(beta)
    if beta not in cfg.dpo.betas:
        raise ValueError(f"dpo: beta={beta} is not in dpo.betas={cfg.dpo.betas}")
    if layout.is_done("dpo", tag):
        return read_json(layout.done_path("dpo", tag))
    if not layout.is_done("pairs"):
        raise RuntimeError(f"dpo: {layout.done_path('pairs')} is missing; run the pairs stage first")
    started = time.time()
    from datasets import Dataset
    from trl import DPOConfig

    from pipeline.batching import dpo_trainer_class
    from pipeline.models import MASTER_WEIGHTS, load_model, load_tokenizer, resolve_device, resolve_dtype, setup_process
    from pipeline.training import (CheckpointAndProgress, configure_wandb, finish_or_raise, prepare_resume,
                                   save_final, train_metrics, trainer_kwargs)

    setup_process(cfg)
    device = resolve_device(cfg)
    world = distributed.init(device.type, deepspeed=cfg.distributed.zero_stage > 0)
    dtype = resolve_dtype(cfg.model, device)
    # Loaded from the file with an on-disk cache shared by every beta: tokenisation and (with
    # dpo.precompute_ref_log_probs) the reference log-probs are computed once per run and reused
    # by the other betas and after a requeue (TRL keys that cache by data and reference weights).
    pairs = Dataset.from_json(str(layout.pairs_file), cache_dir=str(layout.stage_dir("dpo") / "cache"),
                              split="train").select_columns(["prompt", "chosen", "rejected"])
    tokenizer = load_tokenizer(layout.sft_model)
    model = load_model(layout.sft_model, device, dtype, train=True)
    # The live reference has the policy's weights dtype and runs under the same autocast, so the
    # log-ratios start at exactly 0.
    ref_model = None if cfg.dpo.precompute_ref_log_probs else load_model(layout.sft_model, device, MASTER_WEIGHTS)
    stage_dir = layout.stage_dir("dpo", tag)
    report_to = configure_wandb(cfg, layout.wandb, f"dpo-beta{tag}", stage_dir / "wandb_run.json", world.is_main)
    resume = prepare_resume(layout.checkpoints_dir("dpo", tag), cfg.distributed.zero_stage)
    args = DPOConfig(**trainer_kwargs(cfg, cfg.dpo, layout.checkpoints_dir("dpo", tag), device, dtype, report_to,
                                    load_universal=bool(resume and resume[2])),
                     beta=beta, loss_type=[cfg.dpo.loss_type],
                     precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
    progress = ProgressFile(layout.progress_path("dpo", tag), enabled=world.is_main)
    progress.start(resume[0] if resume else None, world_size=world.size,
                   universal_checkpoint=bool(resume and resume[2]))
    trainer = dpo_trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=pairs,
                                  processing_class=tokenizer,
                                  callbacks=[CheckpointAndProgress(progress, cfg.dpo.keep_last, cfg.dpo.save_steps, cfg.distributed.zero_stage)])
    trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    finish_or_raise(trainer, progress)
    save_final(trainer, tokenizer, layout.dpo_final(tag))
    metrics = train_metrics(trainer, ("loss", "rewards/", "logps/", "logits/", "train_runtime", "train_loss"))
    progress.update(force=True, status="done", step=trainer.state.global_step)
    distributed.barrier()
    if not world.is_main:
        return {}
    return write_manifest(layout.done_path("dpo", tag), config=to_dict(cfg), started=started,
                          inputs={"sft_model": str(layout.sft_model), "pairs": str(layout.pairs_file),
                                  "num_pairs": len(pairs)},
                          metrics=metrics, extra={"beta": beta, "restarts": progress.state["restarts"],
                                                  "lost_steps": progress.lost_steps})
