"""What SFT and DPO share: trainer arguments, complete-checkpoint bookkeeping, wandb, final save."""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from transformers import TrainerCallback

from pipeline.runtime import distributed, interrupt
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.configlib import to_dict
from pipeline.rundir.layout import RunLayout, atomic_replace_dir, atomic_write_json, read_json, write_manifest
from pipeline.rundir.metrics_log import MetricsLog
from pipeline.rundir.progress import ProgressFile

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


# Files a checkpoint needs only to resume training; eval needs the weights alone.
RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
RESUME_ONLY_PREFIXES = ("rng_state", "global_step")  # global_stepN/ = DeepSpeed's optimizer shards


def is_eval_checkpoint(step: int, save_steps: int) -> bool:
    """Whether eval scores the checkpoint saved at `step`: the periodic ones (every `save_steps`).

    Saves made on a stop request (a time limit, a preemption) exist only for resuming. The one rule
    shared by pruning (which keeps these weights) and eval (which lists them).
    """
    return step % save_steps == 0


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, keep_weights: Callable[[int], bool] | None) -> None:
    """Keep the newest `keep_last` complete checkpoints whole; of older ones keep only the weights of
    those `keep_weights(step)` selects (the ones eval needs) and delete the rest. Directories
    without the completion marker older than the newest complete one are leftovers of a crash.
    """
    complete = complete_checkpoints(checkpoints_dir)
    if not complete:
        return
    newest = complete[-1][0]
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and not (path / COMPLETE).is_file() and int(match.group(1)) < newest:
            shutil.rmtree(path, ignore_errors=True)
    for step, path in complete[:-keep_last] if keep_last else complete:
        if keep_weights is not None and keep_weights(step):
            for item in path.iterdir():
                if item.name in RESUME_ONLY_FILES or item.name.startswith(RESUME_ONLY_PREFIXES):
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


class CheckpointAndProgress(TrainerCallback):
    """Marks saved checkpoints complete, prunes old ones, keeps the progress file current, appends
    every log record to the stage's metrics log (if given), and turns a stop request (set by a signal
    handler) into a save at the current step followed by a stop.
    """

    def __init__(self, progress: ProgressFile, keep_last: int, keep_weights: Callable[[int], bool] | None,
                 zero_stage: int = 0, metrics_log: MetricsLog | None = None):
        self.progress = progress
        self.metrics_log = metrics_log
        self.zero_stage = zero_stage
        self.keep_last = keep_last
        self.keep_weights = keep_weights
        self._step_ended = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.update(force=True, step=state.global_step, total_steps=state.max_steps)
        if self.metrics_log is not None and state.is_world_process_zero:
            # this attempt logs every step after the one it resumed from again: one curve, not two
            self.metrics_log.keep_through_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress.update(step=state.global_step, total_steps=state.max_steps)
        if interrupt.synchronized_stop_requested(state.global_step):
            control.should_save = True           # every rank takes part in this save
            control.should_training_stop = True
        self._step_ended = time.monotonic()  # the Trainer saves right after the step's callbacks
        return control

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        distributed.barrier()  # every rank has written its shard before the checkpoint counts
        if state.is_world_process_zero and path.is_dir():
            if self.metrics_log is not None:
                self.metrics_log.sync()  # the log reaches the step a resume continues from
            reason = interrupt.stop_reason() or "periodic"
            save_s = round(time.monotonic() - self._step_ended, 2)
            atomic_write_json(path / COMPLETE, {"step": state.global_step, "reason": reason,
                                                "world_size": distributed.world().size,
                                                "zero_stage": self.zero_stage, "save_s": save_s})
            prune_checkpoints(Path(args.output_dir), self.keep_last, self.keep_weights)
            # how long saves take, against the time SLURM's warning leaves (status warns)
            timing = {"last_save_s": save_s, **({"stop_save_s": save_s} if reason != "periodic" else {})}
            self.progress.update(force=True, step=state.global_step, last_checkpoint=path.name, **timing)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.progress.update(last_metrics={k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if self.metrics_log is not None:
                self.metrics_log.append(state.global_step, logs)


def finish_or_raise(trainer, progress: ProgressFile) -> None:
    """After `trainer.train()`: if the ranks agree it stopped on request before its last step, record
    that and raise StageInterrupted (every rank saved the checkpoint at that step).

    The agreement is one collective: a signal that came after the ranks last compared flags would
    otherwise make some ranks finish (a collective final save) while others raise, and hang.
    A stop that came with the last step changes nothing: the stage is complete.
    """
    reason = interrupt.agreed_stop_reason()
    step = trainer.state.global_step
    if reason is not None and step < trainer.state.max_steps:
        progress.stopped(reason, step)
        interrupt.check(step, "checkpoint saved")


def configure_wandb(cfg: PipelineConfig, wandb_dir: Path, run_key: str, id_file: Path, is_main: bool = True) -> list[str]:
    """Environment for the Trainer's wandb integration; returns `report_to`.

    The run id is stored in the run directory so a requeued job continues the same wandb run.
    The API key is only ever read from the environment, never written. Only the main process
    logs (the Trainer's own rule), so only it touches the id file.
    """
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return []
    if not is_main:
        return ["wandb"]
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


class ResumePoint(NamedTuple):
    step: int
    path: Path
    universal: bool  # DeepSpeed must load it as a universal checkpoint (the world size or ZeRO stage changed)


def prepare_resume(checkpoints_dir: Path, zero_stage: int) -> ResumePoint | None:
    """The checkpoint to resume from, and whether DeepSpeed must load it as a universal checkpoint.

    A ZeRO checkpoint is sharded per rank; when the job now runs with another number of processes
    (or ZeRO stage), rank 0 converts it to DeepSpeed's universal format first (once), so the step,
    optimizer state and LR schedule continue instead of restarting.
    """
    found = latest_checkpoint(checkpoints_dir)
    if found is None:
        return None
    step, path = found
    saved = read_json(path / COMPLETE, {}) or {}
    world = distributed.world()
    same_layout = (saved.get("world_size", world.size), saved.get("zero_stage", zero_stage)) == (world.size, zero_stage)
    if not zero_stage or not saved.get("zero_stage") or same_layout:
        return ResumePoint(step, path, False)
    tag = f"global_step{step}"
    universal = path / f"{tag}_universal"
    if world.is_main and not (path / "latest_universal").is_file():
        import subprocess
        import sys

        shutil.rmtree(universal, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / tag),
                        "--output_folder", str(universal), "--inject_missing_state", "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], check=True, stdout=subprocess.DEVNULL)
        (path / "latest_universal").write_text(universal.name)  # marks the conversion complete
    distributed.barrier()
    return ResumePoint(step, path, True)


def trainer_kwargs(cfg: PipelineConfig, train: TrainConfig, output_dir: Path, device: torch.device,
                   dtype: torch.dtype, report_to: list[str], load_universal: bool = False) -> dict:
    """TrainingArguments shared by the SFT and DPO configs (TRL's bf16/checkpointing defaults overridden).

    `dtype` is the compute dtype: bf16/fp16 run as autocast over float32 weights (see
    `models.MASTER_WEIGHTS`), so small Adam updates are not rounded away.

    With several processes: the process group made by `distributed.init` is used as configured,
    and with ZeRO the DeepSpeed config is generated for this world size and kept in the stage dir.
    """
    world = distributed.world()
    extra: dict = {}
    if world.distributed or cfg.distributed.zero_stage:
        extra["accelerator_config"] = {"use_configured_state": True}
        if cfg.distributed.zero_stage:
            ds = distributed.deepspeed_config(cfg.distributed.zero_stage, cfg.distributed.offload, train.batch_size,
                                              train.grad_accum, world.size, bf16=dtype == torch.bfloat16,
                                              fp16=dtype == torch.float16)
            if load_universal:
                ds["checkpoint"] = {"load_universal": True}
            extra["deepspeed"] = distributed.write_deepspeed_config(Path(output_dir).parent / "deepspeed.json", ds)
    return dict(**extra,
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        # transformers reads a warmup_steps below 1 as a fraction of the steps (its warmup_ratio)
        warmup_steps=train.warmup_steps or train.warmup_ratio,
        optim=train.optimizer,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        max_length=train.max_length,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        gradient_checkpointing=train.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        pad_to_multiple_of=train.pad_to_multiple_of,
        torch_compile=train.compile != "off",
        torch_compile_mode=None if train.compile in ("off", "default") else train.compile,
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


def save_final(trainer, tokenizer, final_dir: Path, merge_adapter: bool = False) -> None:
    """Final weights + tokenizer, written to a temp directory and renamed into place. A LoRA model saves
    its adapter, or with `merge_adapter` the adapter merged into the base (a whole model)."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    if merge_adapter:  # config.py refuses it under ZeRO-3: every rank holds the whole weights
        if trainer.is_world_process_zero():
            from pipeline.models.adapters import save_merged

            save_merged(trainer, tmp)
    else:
        trainer.save_model(str(tmp))  # collective under ZeRO-3 (weights gathered to rank 0)
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
    if torch.cuda.is_available():
        last["memory/peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return last


# ------------------------------------------------------------------ the training-stage skeleton
@dataclass
class TrainingSetup:
    """What the skeleton hands a stage's `build` function."""
    device: torch.device
    dtype: torch.dtype
    world: distributed.World
    trainer_kwargs: dict         # TrainingArguments shared by SFT and DPO (see `trainer_kwargs`)
    callbacks: list


@dataclass
class BuiltTrainer:
    """What a stage's `build` returns: its trainer, the tokenizer saved with the final model, and the
    inputs recorded in the manifest."""
    trainer: object
    tokenizer: object
    inputs: dict


def run_training_stage(cfg: PipelineConfig, layout: RunLayout, *, directory: str, task, train: TrainConfig,
                       wandb_key: str, build: Callable[[TrainingSetup], BuiltTrainer],
                       metric_prefixes: tuple[str, ...], keep_weights: Callable[[int], bool] | None = None,
                       prepare: Callable[[], None] | None = None, extra: dict | None = None,
                       merge_adapter: bool = False) -> dict:
    """Resume, progress, trainer, final save and manifest: what SFT and DPO share.

    The stage gives its own part as `build` (data, models, its TRL trainer), `prepare` (run once
    on the main process before training) and what its manifest records; `merge_adapter`: a LoRA stage's
    final/ is the adapter merged into the base instead of the adapter. Idempotent: a finished
    stage returns its manifest.
    """
    done = layout.done_path(directory, task)
    if done.is_file():
        return read_json(done)
    started = time.time()
    from pipeline.models.policy import resolve_device, resolve_dtype, setup_process

    setup_process(cfg)
    device = resolve_device(cfg)
    world = distributed.init(device.type, deepspeed=cfg.distributed.zero_stage > 0)
    if prepare is not None:
        if world.is_main:
            prepare()
        distributed.barrier()
    dtype = resolve_dtype(cfg.model, device)
    stage_dir = layout.stage_dir(directory, task)
    checkpoints = layout.checkpoints_dir(directory, task)
    report_to = configure_wandb(cfg, layout.wandb, wandb_key, stage_dir / "wandb_run.json", world.is_main)
    resume = prepare_resume(checkpoints, cfg.distributed.zero_stage)
    universal = bool(resume and resume.universal)
    progress = ProgressFile(layout.progress_path(directory, task), enabled=world.is_main)
    progress.start(resume.step if resume else None, world_size=world.size, universal_checkpoint=universal)
    callback = CheckpointAndProgress(progress, train.keep_last, keep_weights, cfg.distributed.zero_stage,
                                     metrics_log=MetricsLog(layout.metrics_log(directory, task)))
    built = build(TrainingSetup(device, dtype, world,
                                trainer_kwargs(cfg, train, checkpoints, device, dtype, report_to, universal),
                                [callback]))
    trainer = built.trainer
    trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    finish_or_raise(trainer, progress)
    save_final(trainer, built.tokenizer, layout.final_model(directory, task), merge_adapter)
    metrics = train_metrics(trainer, metric_prefixes)
    progress.update(force=True, status="done", step=trainer.state.global_step)
    distributed.barrier()
    if not world.is_main:
        return {}
    return write_manifest(done, config=to_dict(cfg), started=started, inputs=built.inputs, metrics=metrics,
                          extra={**(extra or {}), "restarts": progress.state["restarts"],
                                 "lost_steps": progress.lost_steps})
