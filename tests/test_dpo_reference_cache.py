"""Precomputed reference log-probs: correct, stored in the run directory, not recomputed after a requeue."""
import json
import signal

import pytest

from conftest import clone_before_dpo, max_weight_difference, start_stage_job, wait_for_step

pytestmark = pytest.mark.slow


def first_logged(stage_dir, key):
    checkpoints = sorted((stage_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    return next(entry[key] for entry in history if key in entry)


def test_precomputed_reference_is_exact_cached_and_survives_a_requeue(tiny_run, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", dpo={"precompute_ref_log_probs": True})
    stage_dir = run_dir / "dpo" / "beta-0.1"
    proc = start_stage_job(run_dir, "dpo", "0.1")
    wait_for_step(stage_dir / "progress.json", 20, proc)
    proc.send_signal(signal.SIGUSR2)
    first_out, _ = proc.communicate(timeout=300)
    assert "Computing reference log probs" in first_out
    cached = sorted((run_dir / "dpo" / "cache").rglob("cache-*.arrow"))
    assert cached  # kept in the run directory, shared by every beta

    proc = start_stage_job(run_dir, "dpo", "0.1")
    second_out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, second_out
    assert "Computing reference log probs" not in second_out  # reused after the requeue
    assert json.loads((stage_dir / "DONE.json").read_text())["lost_steps"] == 0

    live = tiny_run / "dpo" / "beta-0.1"
    # at step 1 the policy IS the reference: with exact reference log-probs the margin is 0 and the
    # loss log(2), as with the live reference model
    assert abs(first_logged(stage_dir, "rewards/margins")) < 1e-4
    assert first_logged(stage_dir, "loss") == pytest.approx(first_logged(live, "loss"), abs=1e-4)
    assert first_logged(stage_dir, "loss") == pytest.approx(0.693147, abs=1e-4)
    # Adam turns float rounding in the reference into lr-sized steps, so the weights agree loosely
    assert max_weight_difference(stage_dir / "final", live / "final") < 5e-3
