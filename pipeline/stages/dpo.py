"""Stage 3: preference tuning (TRL DPOTrainer) for one trained sweep arm: a method (a TRL loss), its
strength (TRL's beta; none for Preferred-FT) and a seed; the sweep is one independent call per trained
arm (Best-of-N arms are not trained: the eval stage samples them from the SFT model).

Policy and reference both start from the SFT model (as in the seed report); with dpo.lora the policy
is the SFT model plus one LoRA adapter per arm, and the reference the same model with it disabled.
"""
from __future__ import annotations

from functools import partial

from pipeline.config import PipelineConfig
from pipeline.rundir.layout import RunLayout
from pipeline.training.methods import METHODS
from pipeline.registry import Arm, trained_arms
from pipeline.training.loop import BuiltTrainer, TrainingSetup, is_eval_checkpoint, run_training_stage


def trl_config(cfg: PipelineConfig, arm: Arm, trainer_kwargs: dict):
    """TRL's DPOConfig for one arm: the shared trainer arguments, the method's loss (and its options),
    the strength as beta (a method without a strength keeps TRL's default beta, which its loss does not
    use; TRL still scales its logged rewards/* by it), and the arm's seed (when it has one) as the
    Trainer's seed and data order."""
    from trl import DPOConfig

    method = METHODS[arm.method]
    seed = arm.training_seed(cfg.seed)
    if not method.trains:
        raise ValueError(f"dpo: arm {arm.key} is not trained ({method.label} is evaluated from the SFT model)")
    kwargs = {**trainer_kwargs, "seed": seed, "data_seed": seed}
    if arm.beta is not None:
        kwargs["beta"] = arm.beta
    return DPOConfig(**kwargs, loss_type=[method.loss_type], **method.trl_options(cfg),
                     precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)


def rloo_config(cfg: PipelineConfig, arm: Arm, trainer_kwargs: dict):
    """TRL's RLOOConfig for an online arm: the shared trainer arguments (less the pairwise-only ones), the
    strength as the KL coefficient beta, and online sampling. Dropout off: RLOO's importance ratio
    compares two forward passes of the same completions, and dropout makes it noise."""
    from trl import RLOOConfig

    seed = arm.training_seed(cfg.seed)
    kwargs = {k: v for k, v in trainer_kwargs.items() if k not in ("max_length", "pad_to_multiple_of")}
    kwargs.update(seed=seed, data_seed=seed, learning_rate=cfg.online.learning_rate or kwargs["learning_rate"])
    return RLOOConfig(**kwargs, beta=arm.beta, num_generations=cfg.online.num_generations,
                      max_completion_length=cfg.online.max_new_tokens, temperature=cfg.online.temperature,
                      disable_dropout=True)


def reward_function(reward, name: str = "sentiment"):
    """TRL's reward-function form of the run's reward: the score of prompt + completion, as the pairs
    and eval stages score it. Named after what it is, for TRL's `rewards/<name>/mean` metric
    (`sentiment` for a classifier or VADER, `reward_model` for a reward model)."""
    def score(prompts: list[str], completions: list[str], **_) -> list[float]:
        return list(reward.score(prompts, completions))
    score.__name__ = name
    return score


def run(cfg: PipelineConfig, layout: RunLayout, arm: Arm) -> dict:
    arms = trained_arms(cfg)
    if arm not in arms:
        raise ValueError(f"dpo: task {arm.key} is not a trained arm of this run's sweep; its trained arms: "
                         f"{', '.join(a.key for a in arms)}")
    if not layout.is_done("pairs") and not layout.is_done("dpo", arm):
        raise RuntimeError(f"dpo: {layout.done_path('pairs')} is missing; run the pairs stage first")

    def build(setup: TrainingSetup) -> BuiltTrainer:
        from datasets import Dataset

        from pipeline.models.adapters import peft_config
        from pipeline.training.batching import dpo_trainer_class
        from pipeline.models.policy import MASTER_WEIGHTS, load_model, load_tokenizer

        # Loaded from the file with an on-disk cache shared by every arm: tokenisation and (with
        # dpo.precompute_ref_log_probs) the reference log-probs are computed once per run and reused
        # by the other arms and after a requeue (TRL keys that cache by data and reference weights).
        pairs = Dataset.from_json(str(layout.pairs_file), cache_dir=str(layout.stage_dir("dpo") / "cache"),
                                  split="train").select_columns(["prompt", "chosen", "rejected"])
        tokenizer = load_tokenizer(layout.sft_model, cfg.model.chat_template)
        model = load_model(layout.sft_model, setup.device, setup.dtype, train=True)
        # The live reference has the policy's weights dtype and runs under the same autocast, so the
        # log-ratios start at exactly 0. With LoRA, TRL wraps the model and the reference is that model
        # with the adapter disabled (the SFT weights): no second copy.
        lora = peft_config(cfg.dpo.lora)
        ref_model = (None if cfg.dpo.precompute_ref_log_probs or lora is not None
                     else load_model(layout.sft_model, setup.device, MASTER_WEIGHTS))
        args = trl_config(cfg, arm, setup.trainer_kwargs)
        trainer = dpo_trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=pairs,
                                      processing_class=tokenizer, callbacks=setup.callbacks, peft_config=lora)
        return BuiltTrainer(trainer, tokenizer, {"sft_model": str(layout.sft_model), "pairs": str(layout.pairs_file),
                                                 "num_pairs": len(pairs), "lora": cfg.dpo.lora.enabled})

    def build_online(setup: TrainingSetup) -> BuiltTrainer:
        from datasets import Dataset

        from pipeline.rundir.layout import read_jsonl
        from pipeline.models.policy import load_tokenizer
        from pipeline.models.reward import make_reward
        from trl import RLOOTrainer

        prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in read_jsonl(layout.pair_prompts)])
        tokenizer = load_tokenizer(layout.sft_model, cfg.model.chat_template)
        args = rloo_config(cfg, arm, setup.trainer_kwargs)
        # the model is given by its directory: TRL loads the KL reference from the same path (an in-memory
        # model would make it load whatever `_name_or_path` says, e.g. the base model)
        metric_name = "reward_model" if cfg.reward.kind == "reward_model" else "sentiment"
        reward = reward_function(make_reward(cfg.reward, setup.device), metric_name)
        trainer = RLOOTrainer(model=str(layout.sft_model), reward_funcs=[reward], args=args, train_dataset=prompts,
                              processing_class=tokenizer, callbacks=setup.callbacks)
        return BuiltTrainer(trainer, tokenizer, {"sft_model": str(layout.sft_model),
                                                 "prompts": str(layout.pair_prompts), "num_prompts": len(prompts)})

    method = METHODS[arm.method]
    online = method.trainer == "online"
    return run_training_stage(cfg, layout, directory="dpo", task=arm, train=cfg.dpo, wandb_key=f"dpo-{arm.tag}",
                              build=build_online if online else build, keep_weights=partial(is_eval_checkpoint, save_steps=cfg.dpo.save_steps),
                              merge_adapter=cfg.dpo.lora.enabled and cfg.dpo.lora.merge_final,
                              metric_prefixes=("loss", "rewards/", "logps/", "logits/", "train_runtime", "train_loss",
                                               *(("reward", "kl", "completions/mean_length") if online else ())),
                              extra={"beta": arm.beta, "method": arm.method, "loss_type": method.loss_type,
                                     **method.trl_options(cfg), "seed": arm.training_seed(cfg.seed), "arm": arm.key})
