"""Stage 1: data preparation and supervised fine-tuning (TRL SFTTrainer).

Preparation (cheap, done once, before training): the prompt files for the pairs and eval stages,
and for the tiny preset the base model with its locally trained tokenizer. With pairs.source=dataset
the texts are the preference data's (SFT: prompt + chosen of the training split, eval prompts held
out); with sft.enabled=false `use_base` only prepares and links model.name as the SFT model.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.data import preferences
from pipeline.data.reviews import load_reviews, make_prompts
from pipeline.rundir.layout import RunLayout, atomic_write_jsonl, read_json, read_jsonl, write_manifest
from pipeline.rundir.progress import ProgressFile
from pipeline.training.loop import BuiltTrainer, TrainingSetup, run_training_stage


def base_model_path(cfg: PipelineConfig, layout: RunLayout) -> str:
    return str(layout.base_model) if cfg.model.name == "tiny" else cfg.model.name


def prepare(cfg: PipelineConfig, layout: RunLayout) -> None:
    """Tiny base model (if any) and the disjoint pair/eval prompt files; skipped when present."""
    from pipeline.models.policy import build_tiny_base, load_tokenizer

    if cfg.model.name == "tiny" and not (layout.base_model / "config.json").is_file():
        build_tiny_base(cfg.model, tokenizer_texts(cfg), layout.base_model, cfg.seed)
    if layout.pair_prompts.is_file() and layout.eval_prompts.is_file():
        return
    tokenizer = load_tokenizer(base_model_path(cfg, layout), cfg.model.chat_template)
    if cfg.pairs.source == "dataset":
        pair_prompts, eval_rows, eval_pairs = dataset_prompts(cfg, tokenizer)
        atomic_write_jsonl(layout.eval_pairs, eval_pairs)
    else:
        held_out = load_reviews(cfg.data, cfg.data.prompt_split, cfg.seed)
        pair_prompts, eval_prompts = make_prompts(held_out, tokenizer, cfg.data, cfg.pairs.num_prompts,
                                                  cfg.eval.num_prompts, cfg.eval.fixed_prompts, cfg.seed)
        eval_rows = [{"prompt": p} for p in eval_prompts]
    atomic_write_jsonl(layout.eval_prompts, eval_rows)
    atomic_write_jsonl(layout.pair_prompts, [{"prompt": p} for p in pair_prompts])  # written last: the marker


def tokenizer_texts(cfg: PipelineConfig) -> list[str]:
    """What the tiny model's tokenizer is trained on: the reviews, or the preference data's own text; and
    sft.dataset's, when SFT has its own."""
    extra = []
    if cfg.sft.dataset is not None:
        from pipeline.data import sft_data

        extra = sft_data.texts_for_a_tokenizer(cfg)
    if cfg.pairs.source != "dataset":
        return load_reviews(cfg.data, cfg.data.train_split, cfg.seed) + extra
    train, eval_rows = preferences.load(cfg)  # chat data unrendered: the texts of its messages
    rows = train.rows + (eval_rows.rows if eval_rows is not None else [])
    return [text for row in rows for value in (row["prompt"], row["chosen"], row["rejected"])
            for text in ([value] if isinstance(value, str) else [m["content"] for m in value])] + extra


def dataset_prompts(cfg: PipelineConfig, tokenizer) -> tuple[list[str], list[dict], list[dict]]:
    """pairs.source=dataset: the training pairs' prompts (RLOO's); the eval prompt rows: fixed, then held
    out, for chat data each rendered prompt with its `turns` (the messages a reward model scores); and
    the held-out pairs of those prompts (preference accuracy, reward.kind=none)."""
    train, eval_rows = preferences.load(cfg, tokenizer=tokenizer)  # chat data rendered with its template
    held = preferences.held_out_prompts(cfg, train, eval_rows, tokenizer)
    pair_prompts = list(dict.fromkeys(r["prompt"] for r in preferences.training_rows(train, held)))
    held_set = set(held)
    eval_pairs = [{role: r[role] for role in ("prompt", "chosen", "rejected")}
                  for r in (eval_rows if eval_rows is not None else train).rows if r["prompt"] in held_set]
    fixed = preferences.fixed_prompts(cfg, train, tokenizer)
    if not train.conversational:
        return pair_prompts, [{"prompt": p} for p in fixed + held], eval_pairs
    turns = preferences.prompt_turns(train, eval_rows)
    turns.update({rendered: [{"role": "user", "content": p}] for rendered, p in zip(fixed, cfg.eval.fixed_prompts)})
    return pair_prompts, [{"prompt": p, "turns": turns[p]} for p in fixed + held], eval_pairs


def sft_examples(cfg: PipelineConfig, layout: RunLayout, tokenizer) -> dict[str, list]:
    """SFT's dataset columns: `text`, the reviews or prompt + chosen of the preference training rows
    (eval prompts left out); for chat data `messages`, prompt + chosen turns, which TRL renders with
    the tokenizer's chat template (and tokenizes without adding its special tokens twice)."""
    if cfg.sft.dataset is not None:  # SFT's own data (pipeline.data.sft_data)
        from pipeline.data import sft_data

        return sft_data.examples(cfg, sft_data.open_split(cfg))[0]
    if cfg.pairs.source != "dataset":
        return {"text": load_reviews(cfg.data, cfg.data.train_split, cfg.seed)}
    train, _ = preferences.load(cfg, tokenizer=tokenizer)
    held = [r["prompt"] for r in read_jsonl(layout.eval_prompts)]
    rows = preferences.training_rows(train, held)
    if train.conversational:
        return {"messages": [row["messages"] for row in rows]}
    return {"text": [row["prompt"] + row["chosen"] for row in rows]}


def use_base(cfg: PipelineConfig, layout: RunLayout) -> dict:
    """sft.enabled=false: prepare, then hand model.name on as the SFT model (a link, no copy), so DPO and
    eval start from it and use it as their reference."""
    from pipeline.data.hub import resolve

    if layout.is_done("sft"):
        return read_json(layout.done_path("sft"))
    started = time.time()
    prepare(cfg, layout)
    target = Path(resolve(base_model_path(cfg, layout))).resolve()
    link = layout.sft_model
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    ProgressFile(layout.progress_path("sft")).update(force=True, status="done", step=0, total_steps=0)
    return write_manifest(layout.done_path("sft"), config=to_dict(cfg), started=started,
                          inputs={"model": base_model_path(cfg, layout)},
                          metrics={"trained": False, "sft_model": str(target)})


def run(cfg: PipelineConfig, layout: RunLayout) -> dict:
    def build(setup: TrainingSetup) -> BuiltTrainer:
        from datasets import Dataset
        from trl import SFTConfig

        from pipeline.models.adapters import peft_config
        from pipeline.training.batching import sft_trainer_class
        from pipeline.models.policy import load_model, load_tokenizer

        tokenizer = load_tokenizer(base_model_path(cfg, layout), cfg.model.chat_template)
        (column, texts), = sft_examples(cfg, layout, tokenizer).items()
        if cfg.data.max_train_examples:
            texts = texts[:cfg.data.max_train_examples]
        model = load_model(base_model_path(cfg, layout), setup.device, setup.dtype, train=True)
        args = SFTConfig(**setup.trainer_kwargs, dataset_text_field="text", packing=cfg.sft.packing,
                         packing_strategy="bfd")
        trainer = sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_dict({column: texts}),
                                      processing_class=tokenizer, callbacks=setup.callbacks,
                                      peft_config=peft_config(cfg.sft.lora))
        dataset = cfg.sft.dataset or (cfg.pairs.dataset if cfg.pairs.source == "dataset" else cfg.data.dataset)
        return BuiltTrainer(trainer, tokenizer, {"model": base_model_path(cfg, layout), "dataset": dataset,
                                                 "train_examples": len(texts), "lora": cfg.sft.lora.enabled})

    return run_training_stage(cfg, layout, directory="sft", task=None, train=cfg.sft, wandb_key="sft", build=build,
                              prepare=lambda: prepare(cfg, layout), merge_adapter=cfg.sft.lora.enabled,
                              metric_prefixes=("loss", "train_loss", "train_runtime", "mean_token_accuracy"))
