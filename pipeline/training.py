"""What SFT and DPO share: trainer arguments, complete-checkpoint bookkeeping, wandb, final save."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.config import PipelineConfig, TrainConfig
from pipeline.layout import atomic_replace_dir, atomic_write_json, read_json
from pipeline.progress import ProgressFile

COMPLETE = "COMPLETE.json"  # written into checkpoint-N/ only after the Trainer finished saving it
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints that carry the completion marker, oldest first.

    A checkpoint without the marker was being written when the job died: it is ignored.
    """
    found = []
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and (path / COMPLETE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1] if found else None


class CheckpointAndProgress(TrainerCallback):
    """Marks each saved checkpoint complete and keeps the stage's progress file current."""

    def __init__(self, progress: ProgressFile):
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.update(force=True, step=state.global_step, total_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(step=state.global_step, total_steps=state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            atomic_write_json(path / COMPLETE, {"step": state.global_step})
            self.progress.update(force=True, step=state.global_step, last_checkpoint=path.name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.progress.update(last_metrics={k: v for k, v in logs.items() if isinstance(v, (int, float))})


def configure_wandb(cfg: PipelineConfig, wandb_dir: Path, run_key: str, id_file: Path) -> list[str]:
    """Environment for the Trainer's wandb integration; returns `report_to`.

    The run id is stored in the run directory so a requeued job continues the same wandb run.
    The API key is only ever read from the environment, never written.
    """
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return []
    stored = read_json(id_file, {}) or {}
    run_id = stored.get("id")
    if not run_id:
        import uuid

        run_id = f"{cfg.name}-{run_key}-{uuid.uuid4().hex[:8]}".replace(".", "_")
        atomic_write_json(id_file, {"id": run_id})
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update({"WANDB_MODE": cfg.wandb.mode, "WANDB_DIR": str(wandb_dir), "WANDB_RUN_ID": run_id,
                       "WANDB_RESUME": "allow", "WANDB_PROJECT": cfg.wandb.project, "WANDB_NAME": f"{cfg.name}-{run_key}",
                       "WANDB_SILENT": "true"})
    if cfg.wandb.entity:
        os.environ["WANDB_ENTITY"] = cfg.wandb.entity
    return ["wandb"]


def trainer_kwargs(cfg: PipelineConfig, train: TrainConfig, output_dir: Path, device: torch.device,
                   dtype: torch.dtype, report_to: list[str]) -> dict:
    """TrainingArguments shared by the SFT and DPO configs (TRL's bf16/checkpointing defaults overridden)."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        max_length=train.max_length,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to,
        run_name=cfg.name,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def save_final(trainer, tokenizer, final_dir: Path) -> None:
    """Final weights + tokenizer, written to a temp directory and renamed into place."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        atomic_replace_dir(tmp, final_dir)


def train_metrics(trainer, prefix_keys: tuple[str, ...]) -> dict:
    """Last logged value of each metric whose name starts with one of `prefix_keys`."""
    last: dict = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith(prefix_keys):
                last[key] = value
    last["global_step"] = trainer.state.global_step
    return last
