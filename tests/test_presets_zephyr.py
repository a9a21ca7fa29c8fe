"""The zephyr-dpo presets: the alignment-handbook's Zephyr-7B-beta DPO recipes (issue 18, item 7).

Values are checked against the recipe files they cite (recipes/zephyr-7b-beta/dpo/config_full.yaml and
config_lora.yaml, copied here as the handbook states them); the hub references and the rendered
scripts are checked without the hub (the 7B model cannot be fetched here)."""
import pytest

from conftest import launch
from jobs.config import resolve_config
from pipeline.data import hub

# the handbook's TRL fields, as in config_full.yaml (@ 81c66b2c)
FULL_RECIPE = {"model_name_or_path": "alignment-handbook/zephyr-7b-sft-full", "beta": 0.01, "learning_rate": 5.0e-7,
               "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "num_train_epochs": 1, "optim": "adamw_torch",
               "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_length": 1024,
               "save_steps": 100, "seed": 42, "gradient_checkpointing": True, "bf16": True}
# config_lora.yaml (@ e4f98e7d)
LORA_RECIPE = {"beta": 0.1, "learning_rate": 5.0e-7, "lr_scheduler_type": "linear", "warmup_ratio": 0.1,
               "num_train_epochs": 3, "optim": "rmsprop", "per_device_train_batch_size": 2,
               "gradient_accumulation_steps": 32, "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
               "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def as_recipe(cfg) -> dict:
    d = cfg.dpo
    return {"model_name_or_path": cfg.model.name, "beta": d.betas[0], "learning_rate": d.learning_rate,
            "lr_scheduler_type": d.lr_scheduler, "warmup_ratio": d.warmup_ratio, "num_train_epochs": d.epochs,
            "optim": d.optimizer, "per_device_train_batch_size": d.batch_size,
            "gradient_accumulation_steps": d.grad_accum, "max_length": d.max_length, "save_steps": d.save_steps,
            "seed": cfg.seed, "gradient_checkpointing": d.gradient_checkpointing, "bf16": cfg.model.dtype == "bfloat16",
            "lora_r": d.lora.r, "lora_alpha": d.lora.alpha, "lora_dropout": d.lora.dropout,
            "lora_target_modules": d.lora.target_modules}


def test_zephyr_dpo_carries_the_handbooks_full_recipe():
    cfg = resolve_config("zephyr-dpo")
    got = as_recipe(cfg)
    assert {k: got[k] for k in FULL_RECIPE} == FULL_RECIPE
    assert (cfg.pairs.source, cfg.pairs.dataset, cfg.pairs.train_split, cfg.eval.prompt_split) == \
        ("dataset", "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs")
    assert cfg.distributed.zero_stage == 3 and not cfg.dpo.lora.enabled and not cfg.sft.enabled
    # prefetch pins the SFT model and the dataset only: no review corpus, no reward model (accuracy eval)
    assert [(r.field, r.repo_id) for r in hub.references(cfg)] == [
        ("model.name", "alignment-handbook/zephyr-7b-sft-full"), ("pairs.dataset", "HuggingFaceH4/ultrafeedback_binarized")]


def test_zephyr_dpo_lora_carries_the_handbooks_lora_recipe():
    cfg = resolve_config("zephyr-dpo-lora")
    got = as_recipe(cfg)
    assert {k: got[k] for k in LORA_RECIPE} == LORA_RECIPE
    assert cfg.dpo.lora.enabled and cfg.distributed.zero_stage == 2


@pytest.mark.parametrize("preset, stage_line", [("zephyr-dpo", "# ---- stage dpo tasks 0.01"),
                                                 ("zephyr-dpo-lora", "# ---- stage dpo tasks 0.1")])
def test_zephyr_presets_render_an_8_gpu_dpo_job(tmp_path, preset, stage_line):
    out = launch("run", "--preset", preset, "--run-dir", str(tmp_path / "run"), "--executor", "slurm",
                 "--dry-run").stdout
    dpo = out[out.index(stage_line):]
    dpo = dpo[:dpo.index("# ---- stage", 1)]
    assert "#SBATCH --gpus-per-node=8" in dpo and "#SBATCH --ntasks-per-node=8" in dpo
    sft = out[out.index("# ---- stage sft"):out.index("# ---- stage pairs")]
    assert "--gpus-per-node" not in sft  # sft.enabled=false: the stage only links the model, no GPU
    assert not (tmp_path / "run").exists()
