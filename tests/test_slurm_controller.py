"""slurmctld restarted (state kept) while a DPO job runs: the job and the run carry on, nothing lost;
`status` while the controller is down still answers, without a traceback."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import REPO, clone_before_dpo, launch, max_weight_difference, wait_for_step
from test_slurm_pipeline import cancel_and_drain, sacct_by_ids, unique_name, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER = REPO / "slurm" / "cluster"


def controller_up() -> bool:
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return ping.returncode == 0 and "UP" in ping.stdout


def test_controller_restart_while_dpo_runs_loses_nothing(tiny_run, slurm_cluster, tmp_path):
    name = unique_name("ctl")
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", name=name, dpo={"betas": [0.1]})
    stage_dir = run_dir / "dpo" / "beta-0.1"
    try:
        launch("run", "--run-dir", str(run_dir), "--executor", "slurm", "--until", "dpo", timeout=300)
        wait_for_step(stage_dir / "progress.json", 10, None, timeout=600)
        subprocess.run(["bash", str(CLUSTER / "stop.sh"), "slurmctld"], check=True, capture_output=True, timeout=120)
        assert not controller_up()
        down = launch("status", "--run-dir", str(run_dir), check=False, timeout=180)
        assert down.returncode == 0 and "Traceback" not in down.stderr, down.stderr
        assert "dpo" in down.stdout and "0.1" in down.stdout
        time.sleep(5)  # the job keeps training while nobody controls it
        subprocess.run(["bash", str(CLUSTER / "start.sh")], check=True, capture_output=True, timeout=300)
        assert controller_up()
        wait_for(lambda: (stage_dir / "DONE.json").is_file(), 900, "DPO to finish after the restart", 2)
        manifest = json.loads((stage_dir / "DONE.json").read_text())
        assert manifest["restarts"] == [] and manifest["lost_steps"] == 0 and manifest["metrics"]["global_step"] == 75
        job_id = json.loads((run_dir / "jobs" / "jobs.json").read_text())["submissions"][-1]["tasks"]["0.1"]
        wait_for(lambda: sacct_by_ids([job_id]).get(job_id, {}).get("state") == "COMPLETED", 120,
                 "accounting to show the job COMPLETED")
        assert max_weight_difference(stage_dir / "final", tiny_run / "dpo" / "beta-0.1" / "final") <= 1e-6
    finally:
        if not controller_up():
            subprocess.run(["bash", str(CLUSTER / "start.sh")], capture_output=True, timeout=300)
        cancel_and_drain(run_dir, name)
