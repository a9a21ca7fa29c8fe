"""Stop on a signal, save at that step, resume exactly; crash recovery from the last complete checkpoint."""
import json
import signal
from functools import partial
from pathlib import Path

import pytest

from conftest import clone_before_dpo, max_weight_difference, start_stage_job, wait_for_step
from pipeline.training.loop import COMPLETE, complete_checkpoints, is_eval_checkpoint, latest_checkpoint, prune_checkpoints


def make_checkpoint(root: Path, step: int, complete: bool = True, full: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 10)
    if full:
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (path / name).write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step}))
    return path


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    torn = make_checkpoint(tmp_path, 30, complete=False)
    (torn / "model.safetensors").write_bytes(b"trunc")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20]
    assert latest_checkpoint(tmp_path)[0] == 20
    assert latest_checkpoint(tmp_path / "missing") is None


def test_pruning_keeps_the_last_k_whole_and_the_weights_eval_needs(tmp_path):
    for step in (25, 37, 50, 75):  # 37: a save made on a stop request
        make_checkpoint(tmp_path, step)
    stale = make_checkpoint(tmp_path, 60, complete=False)
    prune_checkpoints(tmp_path, keep_last=2, keep_weights=partial(is_eval_checkpoint, save_steps=25))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-25", "checkpoint-50", "checkpoint-75"]
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoint-25").iterdir()) == [COMPLETE, "model.safetensors"]
    assert (tmp_path / "checkpoint-50" / "optimizer.pt").exists()  # still one of the last two


def test_sft_pruning_keeps_only_the_last_k(tmp_path):
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=1, keep_weights=None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-300"]


# ---------------------------------------------------------------- real interruptions of a tiny DPO run
def wandb_run_ids(run_dir: Path) -> set[str]:
    """Ids of the offline wandb runs (directories named offline-run-<date>_<time>-<id>)."""
    return {p.name.split("-", 3)[-1] for p in (run_dir / "wandb").rglob("offline-run-*") if p.is_dir()}


@pytest.mark.slow
def test_signal_saves_at_the_current_step_and_resume_is_exact(tiny_run, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", wandb={"enabled": True, "mode": "offline"})
    stage_dir = run_dir / "dpo" / "beta-0.1"
    proc = start_stage_job(run_dir, "dpo", "0.1")
    wait_for_step(stage_dir / "progress.json", 30, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped on request (timeout)" in out
    stopped = json.loads((stage_dir / "progress.json").read_text())
    assert (stopped["status"], stopped["stop_reason"]) == ("interrupted", "timeout")
    step = stopped["step"]
    assert latest_checkpoint(stage_dir / "checkpoints")[0] == step > 25  # saved where it stopped, not at 25
    assert not (stage_dir / "DONE.json").exists()
    ids_first_attempt = wandb_run_ids(run_dir)
    assert len(ids_first_attempt) == 1

    # a torn checkpoint newer than the real one (the job died while writing it) must be skipped
    make_checkpoint(stage_dir / "checkpoints", step + 5, complete=False)

    proc = start_stage_job(run_dir, "dpo", "0.1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    assert manifest["lost_steps"] == 0
    assert [(r["cause"], r["resumed_from_step"], r["step_before"]) for r in manifest["restarts"]] == [
        ("timeout", step, step)]
    assert manifest["metrics"]["global_step"] == 75
    assert max_weight_difference(stage_dir / "final", tiny_run / "dpo" / "beta-0.1" / "final") <= 1e-6
    assert wandb_run_ids(run_dir) == ids_first_attempt  # the same wandb run id, continued
    assert json.loads((stage_dir / "wandb_run.json").read_text())["id"] in ids_first_attempt


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_complete_checkpoint(tiny_run, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run")
    stage_dir = run_dir / "dpo" / "beta-1.0"
    proc = start_stage_job(run_dir, "dpo", "1.0")
    wait_for_step(stage_dir / "progress.json", 32, proc)
    proc.kill()  # no warning, no save
    proc.communicate()
    killed_at = json.loads((stage_dir / "progress.json").read_text())["step"]
    assert latest_checkpoint(stage_dir / "checkpoints")[0] == 25
    proc = start_stage_job(run_dir, "dpo", "1.0")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    (restart,) = manifest["restarts"]
    assert restart["cause"] == "killed" and restart["resumed_from_step"] == 25
    assert manifest["lost_steps"] == killed_at - 25 > 0
    assert max_weight_difference(stage_dir / "final", tiny_run / "dpo" / "beta-1.0" / "final") <= 1e-6
