"""Stage 1: data preparation and supervised fine-tuning (TRL SFTTrainer).

Preparation (cheap, done once, before training): the prompt files for the pairs and eval stages,
and for the tiny preset the base model with its locally trained tokenizer.
"""
from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.data.reviews import load_reviews, make_prompts
from pipeline.rundir.layout import RunLayout, atomic_write_jsonl
from pipeline.training.loop import BuiltTrainer, TrainingSetup, run_training_stage


def base_model_path(cfg: PipelineConfig, layout: RunLayout) -> str:
    return str(layout.base_model) if cfg.model.name == "tiny" else cfg.model.name


def prepare(cfg: PipelineConfig, layout: RunLayout) -> None:
    """Tiny base model (if any) and the disjoint pair/eval prompt files; skipped when present."""
    from pipeline.models.policy import build_tiny_base, load_tokenizer

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
    def build(setup: TrainingSetup) -> BuiltTrainer:
        from datasets import Dataset
        from trl import SFTConfig

        from pipeline.models.adapters import peft_config
        from pipeline.training.batching import sft_trainer_class
        from pipeline.models.policy import load_model, load_tokenizer

        texts = load_reviews(cfg.data, cfg.data.train_split, cfg.seed)
        if cfg.data.max_train_examples:
            texts = texts[:cfg.data.max_train_examples]
        tokenizer = load_tokenizer(base_model_path(cfg, layout))
        model = load_model(base_model_path(cfg, layout), setup.device, setup.dtype, train=True)
        args = SFTConfig(**setup.trainer_kwargs, dataset_text_field="text", packing=cfg.sft.packing,
                         packing_strategy="bfd")
        trainer = sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                      processing_class=tokenizer, callbacks=setup.callbacks,
                                      peft_config=peft_config(cfg.sft.lora))
        return BuiltTrainer(trainer, tokenizer, {"model": base_model_path(cfg, layout), "dataset": cfg.data.dataset,
                                                 "train_examples": len(texts), "lora": cfg.sft.lora.enabled})

    return run_training_stage(cfg, layout, directory="sft", task=None, train=cfg.sft, wandb_key="sft", build=build,
                              prepare=lambda: prepare(cfg, layout), merge_adapter=cfg.sft.lora.enabled,
                              metric_prefixes=("loss", "train_loss", "train_runtime", "mean_token_accuracy"))
