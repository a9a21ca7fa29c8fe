"""Stage 3: DPO (TRL DPOTrainer) for one sweep arm (a beta); the sweep is one independent call per arm.

Policy and reference both start from the SFT model (as in the seed report).
"""
from __future__ import annotations

from functools import partial

from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout
from pipeline.registry import Arm, dpo_arms
from pipeline.training import BuiltTrainer, TrainingSetup, is_eval_checkpoint, run_training_stage


def run(cfg: PipelineConfig, layout: RunLayout, arm: Arm) -> dict:
    if arm not in dpo_arms(cfg):
        raise ValueError(f"dpo: beta={arm.beta} is not in dpo.betas={cfg.dpo.betas}")
    if not layout.is_done("pairs") and not layout.is_done("dpo", arm):
        raise RuntimeError(f"dpo: {layout.done_path('pairs')} is missing; run the pairs stage first")

    def build(setup: TrainingSetup) -> BuiltTrainer:
        from datasets import Dataset
        from trl import DPOConfig

        from pipeline.batching import dpo_trainer_class
        from pipeline.models import MASTER_WEIGHTS, load_model, load_tokenizer

        # Loaded from the file with an on-disk cache shared by every arm: tokenisation and (with
        # dpo.precompute_ref_log_probs) the reference log-probs are computed once per run and reused
        # by the other arms and after a requeue (TRL keys that cache by data and reference weights).
        pairs = Dataset.from_json(str(layout.pairs_file), cache_dir=str(layout.stage_dir("dpo") / "cache"),
                                  split="train").select_columns(["prompt", "chosen", "rejected"])
        tokenizer = load_tokenizer(layout.sft_model)
        model = load_model(layout.sft_model, setup.device, setup.dtype, train=True)
        # The live reference has the policy's weights dtype and runs under the same autocast, so the
        # log-ratios start at exactly 0.
        ref_model = (None if cfg.dpo.precompute_ref_log_probs
                     else load_model(layout.sft_model, setup.device, MASTER_WEIGHTS))
        args = DPOConfig(**setup.trainer_kwargs, beta=arm.beta, loss_type=[cfg.dpo.loss_type],
                         precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
        trainer = dpo_trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=pairs,
                                      processing_class=tokenizer, callbacks=setup.callbacks)
        return BuiltTrainer(trainer, tokenizer, {"sft_model": str(layout.sft_model), "pairs": str(layout.pairs_file),
                                                 "num_pairs": len(pairs)})

    return run_training_stage(cfg, layout, directory="dpo", task=arm, train=cfg.dpo, wandb_key=f"dpo-{arm.tag}",
                              build=build, keep_weights=partial(is_eval_checkpoint, save_steps=cfg.dpo.save_steps),
                              metric_prefixes=("loss", "rewards/", "logps/", "logits/", "train_runtime", "train_loss"),
                              extra={"beta": arm.beta})
