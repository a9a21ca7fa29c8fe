"""Presets: named starting configurations, ML and SLURM settings together, in one place.

Each is a dict layered over the dataclass defaults (then `--config` and `--set` go on top); the
CLI's `--preset` choices come from here.
"""
from __future__ import annotations

from pipeline.configlib import deep_merge

GPU_JOB = {"gpus_per_node": 1, "cpus_per_task": 8, "mem": "64G"}

# The seed experiment (dpo-report.md, section 6): GPT-2 Large, IMDb, siebert reward, lr 2e-5, one epoch.
GPT2_LARGE = {
    "name": "gpt2-large-imdb",
    "model": {"name": "gpt2-large"},
    "data": {"dataset": "stanfordnlp/imdb"},
    "reward": {"kind": "classifier"},
    # The seed's recipe exactly: SFT on 8 reviews per optimizer step (3,125 steps over IMDb's 25,000
    # training reviews), DPO on random batches of 8 pairs (750 steps per beta over 6,000 pairs). Speed
    # settings that keep the arithmetic stay on: reference log-probs computed once, batches padded to
    # a multiple of 16, static-cache sampling in batches of 500 (4 x 125 prompts per shard batch).
    # sft.packing and dpo.group_by_length change which examples share a step: opt-in.
    "sft": {"epochs": 1.0, "learning_rate": 2e-5, "batch_size": 8, "save_steps": 500, "max_length": 1024},
    "pairs": {"num_prompts": 1000, "completions_per_prompt": 4, "max_new_tokens": 128, "num_shards": 4,
              "batch_size": 500, "kv_cache": "static"},
    "dpo": {"betas": [0.05, 0.1, 1.0], "learning_rate": 2e-5, "epochs": 1.0, "batch_size": 8,
            "save_steps": 100, "max_length": 512, "pad_to_multiple_of": 16, "precompute_ref_log_probs": True},
    "eval": {"num_prompts": 100, "samples_per_prompt": 4, "max_new_tokens": 128, "batch_size": 400,
             "kv_cache": "static"},
    "wandb": {"enabled": True, "mode": "offline"},
    "distributed": {"zero_stage": 2},
    "slurm": {"sft": {**GPU_JOB, "time": "06:00:00"}, "pairs": {**GPU_JOB, "time": "02:00:00"},
              "dpo": {**GPU_JOB, "time": "04:00:00"}, "eval": {**GPU_JOB, "time": "04:00:00"}},
}

# The DPO paper's IMDb experiment (Rafailov et al. 2023, arXiv:2305.18290).
# Appendix C.1 (data): prompts are IMDb prefixes of 2-8 tokens; gpt2-large is the base model, SFT for one
# epoch on IMDb; siebert/sentiment-roberta-large-english is the ground-truth reward; 4 completions are
# sampled for each of 25,000 prefixes and all 6 pairs of each are kept (150,000 pairs).
# Appendix B (optimiser): RMSprop, learning rate 1e-6 warmed up linearly from 0 over 150 steps, batch 64;
# beta = 0.1 by default, and section 6.1 sweeps beta over {0.05, 0.1, 1, 5} for the reward-KL frontier.
# Not given by the paper, chosen here: the 25,100 distinct pair and eval prefixes are cut from IMDb's
# 50,000-review `unsupervised` split (its test split has too few distinct 2-8 token prefixes once
# deduplicated), SFT keeps the seed's optimiser settings (Appendix B is about DPO), one DPO epoch,
# a checkpoint every 250 steps for the frontier. 64 pairs per step = batch_size x grad_accum x GPUs.
DPO_PAPER = deep_merge(deep_merge({}, GPT2_LARGE), {
    "name": "dpo-paper-imdb",
    "data": {"prompt_split": "unsupervised", "prompt_min_tokens": 2, "prompt_max_tokens": 8},
    "pairs": {"num_prompts": 25_000, "completions_per_prompt": 4, "num_shards": 25},
    "dpo": {"betas": [0.05, 0.1, 1.0, 5.0], "optimizer": "rmsprop", "learning_rate": 1e-6, "lr_scheduler": "constant_with_warmup",
            "warmup_steps": 150, "batch_size": 16, "grad_accum": 4, "epochs": 1.0, "save_steps": 250},
    "slurm": {"dpo": {"time": "12:00:00"}},
})

# CPU-sized: the same stages on a generated corpus, a 2-layer GPT-2 and VADER; minutes on 2 cores.
# The speed paths are on here too, so the tests run them end to end.
TINY = {
    "name": "tiny",
    "device": "cpu",
    "model": {"name": "tiny", "dtype": "float32"},
    "data": {"dataset": "tiny", "tiny_reviews": 2000},
    "reward": {"kind": "vader", "batch_size": 256},
    "sft": {"epochs": 3.0, "learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
            "batch_size": 8, "max_length": 128, "save_steps": 100, "logging_steps": 20, "packing": True},
    "pairs": {"num_prompts": 200, "completions_per_prompt": 4, "max_new_tokens": 40,
              "batch_size": 100, "num_shards": 2, "kv_cache": "static"},
    "dpo": {"betas": [0.05, 0.1, 1.0], "learning_rate": 3e-4, "warmup_ratio": 0.1, "epochs": 1.0, "batch_size": 16,
            "save_steps": 25, "max_length": 64, "logging_steps": 5, "group_by_length": True},
    "eval": {"num_prompts": 48, "samples_per_prompt": 4, "max_new_tokens": 40, "batch_size": 192,
             "logprob_batch_size": 192, "kv_cache": "static"},
    "slurm": {section: {"cpus_per_task": 1, "time": "00:30:00", "signal_lead_s": 30}
              for section in ("sft", "pairs", "dpo", "eval")},
}

# tiny's pipeline with every method of `pipeline.training.methods`, two seeds each, and shorter arms (80 prompts
# -> 480 pairs -> 30 DPO steps of 16, a checkpoint every 10) so 18 trained arms stay minutes on a CPU.
# Strengths are TRL's beta for all four losses, but what it scales differs, so each method gets values
# that ask for comparable log-ratio margins on these ~40-token completions:
# - dpo, robust: -log sigmoid(beta * margin) flattens once beta * margin is a few units: beta 0.1 lets the
#   sequence margin grow to ~30 nats, beta 1.0 stops near ~3 (tiny's two ends; robust only at 0.1, to
#   compare with dpo at the same beta: its difference is the label-noise correction alone).
# - hinge: relu(1 - beta * margin) is zero past a margin of 1/beta: 10 nats at 0.1, 1 nat at 1.0.
# - ipo: TRL's IPO regresses the margin *per completion token* onto 1/(2 tau): tau 0.5 -> 1 nat per token
#   (~40 per sequence, near dpo 0.1's end), tau 5 -> 0.1 per token (~4, near dpo 1.0's). IPO's tau is on
#   another scale than DPO's beta: at tau 0.1 it would ask for 5 nats per token (~200 per sequence).
# - rloo (online, the reward itself): beta 0.05 is the KL coefficient of reward - beta * KL (TRL's default);
#   80 prompts x 4 completions in batches of 16 -> 20 steps, completions of 40 tokens as in pairs.
# - preferred_ft (SFT on the chosen completions, the DPO paper's baseline) has no strength: 2 arms.
# - best_of_n is not trained (eval samples it from the SFT model): N in {2, 4, 8} costs 48 prompts x 4 draws
#   x 14 samples per seed (KL analytic 0.19, 0.64, 1.20 nats; about the DPO arms' range here).
TINY_METHODS = deep_merge(deep_merge({}, TINY), {
    "name": "tiny-methods",
    "pairs": {"num_prompts": 80},
    "dpo": {"betas": [0.1, 1.0], "save_steps": 10},
    "sweep": {"methods": ["dpo", "ipo", "robust", "hinge", "preferred_ft", "rloo", "best_of_n"],
              "strengths": {"ipo": [0.5, 5.0], "robust": [0.1], "rloo": [0.05], "best_of_n": [2, 4, 8]},
              "seeds": [0, 1]},
    "online": {"max_new_tokens": 40},
})

# The CPU stand-in for "your own chat model and preference data": a tiny GPT-2 with a chat template, an
# UltraFeedback-binarized-shaped conversational dataset (train_prefs / test_prefs) and a one-output reward
# model with its own template. All three are built by tests/hub_fixture_data.py and served by the test hub
# (`python tests/hub_fixture.py`, then HF_ENDPOINT); prefetch pins them, jobs read them offline.
TINY_CHAT = deep_merge(deep_merge({}, TINY), {
    "name": "tiny-chat",
    "model": {"name": "slurm-dpo/tiny-chat-gpt2"},
    "pairs": {"source": "dataset", "dataset": "slurm-dpo/tiny-chat-prefs", "train_split": "train_prefs"},
    "reward": {"kind": "reward_model", "model": "slurm-dpo/tiny-chat-reward", "batch_size": 64, "max_length": 128},
    "sft": {"epochs": 2.0},
    "dpo": {"betas": [0.1, 1.0], "max_length": 64},
    "eval": {"prompt_split": "test_prefs", "num_prompts": 16},
})

# The alignment-handbook's Zephyr-7B-beta DPO recipe, values read from its
# recipes/zephyr-7b-beta/dpo/config_full.yaml (huggingface/alignment-handbook @ 81c66b2c; the same values at
# 19f03455): alignment-handbook/zephyr-7b-sft-full, HuggingFaceH4/ultrafeedback_binarized train_prefs (eval
# prompts from test_prefs), beta 0.01, adamw_torch at lr 5e-7, cosine schedule with warmup_ratio 0.1, one
# epoch, 8 pairs per device x grad_accum 2 on 8 GPUs (128 a step), max_length 1024, bf16, gradient
# checkpointing, a checkpoint every 100 steps, seed 42. Full fine-tuning runs on ZeRO-3.
# Not carried over: max_prompt_length 512 (TRL >= 1 has no such field; max_length keeps each sequence's start,
# and the pairs stage drops and counts pairs longer than max_length instead of truncating them), and the
# recipe's eval loss on test_prefs (eval here: held-out preference accuracy on test_prefs pairs vs KL, no
# reward model; set reward.kind=reward_model and reward.model for a reward axis).
ZEPHYR_DPO = {
    "name": "zephyr-dpo",
    "seed": 42,
    "model": {"name": "alignment-handbook/zephyr-7b-sft-full", "dtype": "bfloat16"},
    "pairs": {"source": "dataset", "dataset": "HuggingFaceH4/ultrafeedback_binarized", "train_split": "train_prefs"},
    "reward": {"kind": "none"},
    "sft": {"enabled": False},
    "dpo": {"betas": [0.01], "optimizer": "adamw_torch", "learning_rate": 5e-7, "lr_scheduler": "cosine",
            "warmup_ratio": 0.1, "epochs": 1.0, "batch_size": 8, "grad_accum": 2, "max_length": 1024,
            "save_steps": 100, "logging_steps": 10, "gradient_checkpointing": True},
    "eval": {"prompt_split": "test_prefs", "num_prompts": 200, "samples_per_prompt": 2, "max_new_tokens": 256,
             "batch_size": 64, "logprob_batch_size": 8, "fixed_prompts": []},
    "wandb": {"enabled": True, "mode": "offline"},
    "distributed": {"zero_stage": 3},
    "slurm": {"sft": {"cpus_per_task": 4, "mem": "32G", "time": "01:00:00"},
              "pairs": {"cpus_per_task": 8, "mem": "32G", "time": "01:00:00"},
              "dpo": {"gpus_per_node": 8, "cpus_per_task": 8, "mem": "512G", "time": "24:00:00"},
              "eval": {**GPU_JOB, "mem": "128G", "time": "08:00:00"}},
}

# Its LoRA variant: the adapter and optimiser of the handbook's recipes/zephyr-7b-beta/dpo/config_lora.yaml
# (@ e4f98e7d): r 64, alpha 16, dropout 0.1 on q/k/v/o_proj, beta 0.1, rmsprop at lr 5e-7, linear schedule,
# warmup_ratio 0.1, 3 epochs, 2 pairs per device x grad_accum 32. That recipe starts from the SFT *adapter*
# (zephyr-7b-sft-lora); this one from the full SFT model, so the reference is that model (the adapter
# disabled, no second copy). ZeRO-2: LoRA with ZeRO-3 is not tested here.
ZEPHYR_DPO_LORA = deep_merge(deep_merge({}, ZEPHYR_DPO), {
    "name": "zephyr-dpo-lora",
    "dpo": {"betas": [0.1], "optimizer": "rmsprop", "learning_rate": 5e-7, "lr_scheduler": "linear",
            "warmup_ratio": 0.1, "epochs": 3.0, "batch_size": 2, "grad_accum": 32,
            "lora": {"enabled": True, "r": 64, "alpha": 16.0, "dropout": 0.1,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "distributed": {"zero_stage": 2},
    "slurm": {"dpo": {"mem": "256G"}},
})

PRESETS = {"tiny": TINY, "tiny-methods": TINY_METHODS, "tiny-chat": TINY_CHAT, "gpt2-large": GPT2_LARGE,
           "dpo-paper": DPO_PAPER, "zephyr-dpo": ZEPHYR_DPO, "zephyr-dpo-lora": ZEPHYR_DPO_LORA}
PRESET_HELP = {"tiny": "CPU, minutes, offline",
               "tiny-methods": "tiny with DPO, IPO, robust DPO, hinge, Preferred-FT, RLOO and Best-of-N, 2 seeds",
               "tiny-chat": "CPU: a chat model, conversational preference data, a reward model (from the test hub)",
               "zephyr-dpo": "the alignment-handbook's Zephyr-7B-beta DPO recipe, full fine-tuning, ZeRO-3",
               "zephyr-dpo-lora": "zephyr-dpo with the handbook's LoRA DPO recipe (adapter, rmsprop, 3 epochs)",
               "gpt2-large": "the seed experiment", "dpo-paper": "the DPO paper's IMDb setup (App. B, C.1)"}


def preset_layers(name: str, with_slurm: bool = True) -> dict:
    """The preset as a config layer (a copy); `with_slurm=False` for the ML config alone."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    layers = deep_merge({}, PRESETS[name])
    if not with_slurm:
        layers.pop("slurm", None)
    return layers
