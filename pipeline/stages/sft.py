"""Stage 1: data preparation and supervised fine-tuning (TRL SFTTrainer).

Preparation (cheap, done once, before training): the prompt files for the pairs and eval stages,
and for the tiny preset the base model with its locally trained tokenizer.
"""
from __future__ import annotations

import time

from pipeline import distributed
from pipeline.batching import sft_trainer_class
from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.data import load_reviews, make_prompts
from pipeline.layout import RunLayout, atomic_write_jsonl, read_json, write_manifest
from pipeline.models import build_tiny_base, load_model, load_tokenizer, resolve_device, resolve_dtype, setup_process
from pipeline.progress import ProgressFile
from pipeline.training import (CheckpointAndProgress, configure_wandb, finish_or_raise, prepare_resume,
                               save_final, train_metrics, trainer_kwargs)


def base_model_path(cfg: PipelineConfig, layout: RunLayout) -> str:
    return str(layout.base_model) if cfg.model.name == "tiny" else cfg.model.name


def prepare(cfg: PipelineConfig, layout: RunLayout) -> None:
    """Tiny base model (if any) and the disjoint pair/eval prompt files; skipped when present."""
    if cfg.model.name == "tiny" and not (layout.base_model / "config.json").is_file():
        texts = load_reviews(cfg.data, cfg.data.train_split, cfg.seed)
        build_tiny_base(cfg.model, texts, layout.base_model, cfg.seed)
    if layout.pair_prompts.is_file() and layout.eval_prompts.is_file():
        return
    tokenizer = load_tokenizer(base_model_path(cfg, layout))
    held_out = load_reviews(cfg.data, cfg.data.prompt_split, cfg.seed)
    pair_prompts, eval_prompts = make_prompts(held_out, tokenizer, cfg.data, cfg.pairs.num_prompts,
                                              cfg.eval.num_prompts, cfg.eval.fixed_prompts, cfg.seed)
    atomic_write_jsonl(layout.eval_prompts, [{"prompt": p} for p in eval_prompts])
    atomic_write_jsonl(layout.pair_prompts, [{"prompt": p} for p in pair_prompts])  # written last: the marker


def run(cfg: PipelineConfig, layout: RunLayout) -> dict:
    if layout.is_done("sft"):
        return read_json(layout.done_path("sft"))
    started = time.time()
    setup_process(cfg)
    device = resolve_device(cfg)
    world = distributed.init(device.type, deepspeed=cfg.distributed.zero_stage > 0)
    if world.is_main:
        prepare(cfg, layout)
    distributed.barrier()

    from datasets import Dataset
    from trl import SFTConfig

    dtype = resolve_dtype(cfg.model, device)
    texts = load_reviews(cfg.data, cfg.data.train_split, cfg.seed)
    if cfg.data.max_train_examples:
        texts = texts[:cfg.data.max_train_examples]
    tokenizer = load_tokenizer(base_model_path(cfg, layout))
    model = load_model(base_model_path(cfg, layout), device, dtype, train=True)
    stage_dir = layout.stage_dir("sft")
    report_to = configure_wandb(cfg, layout.wandb, "sft", stage_dir / "wandb_run.json", world.is_main)
    resume = prepare_resume(layout.checkpoints_dir("sft"), cfg.distributed.zero_stage)
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, layout.checkpoints_dir("sft"), device, dtype, report_to,
                                    load_universal=bool(resume and resume[2])),
                     dataset_text_field="text", packing=cfg.sft.packing, packing_strategy="bfd")
    progress = ProgressFile(layout.progress_path("sft"), enabled=world.is_main)
    progress.start(resume[0] if resume else None, world_size=world.size,
                   universal_checkpoint=bool(resume and resume[2]))
    trainer = sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                  processing_class=tokenizer,
                                  callbacks=[CheckpointAndProgress(progress, cfg.sft.keep_last, None,
                                                                   cfg.distributed.zero_stage)])
    trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    finish_or_raise(trainer, progress)
    save_final(trainer, tokenizer, layout.sft_model)
    metrics = train_metrics(trainer, ("loss", "train_loss", "train_runtime", "mean_token_accuracy"))
    progress.update(force=True, status="done", step=trainer.state.global_step)
    distributed.barrier()
    if not world.is_main:
        return {}
    return write_manifest(layout.done_path("sft"), config=to_dict(cfg), started=started,
                          inputs={"model": base_model_path(cfg, layout), "dataset": cfg.data.dataset,
                                  "train_examples": len(texts)},
                          metrics=metrics, extra={"restarts": progress.state["restarts"],
                                                  "lost_steps": progress.lost_steps})
