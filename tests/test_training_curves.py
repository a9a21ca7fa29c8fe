"""Training curves in the report: the stages' metrics logs, how a resume shows in them, and the PNGs."""
import json
from pathlib import Path

from transformers import TrainerControl, TrainerState

from pipeline.config import DPOConfig, PipelineConfig
from pipeline.reporting.curves import (DPO_CURVES_PNG, DPO_PANELS, SFT_LOSS_PNG, collect_training_curves, dpo_curves_figure,
                             draw_training_curves, metric_series)
from pipeline.rundir.layout import RunLayout
from pipeline.rundir.metrics_log import MetricsLog, read_metrics_log
from pipeline.rundir.progress import ProgressFile
from pipeline.registry import Arm
from pipeline.training.loop import CheckpointAndProgress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dpo_record(step: int, scale: float) -> dict:
    return {"step": step, "loss": 0.69 - 0.01 * step * scale, "rewards/accuracies": min(1.0, 0.5 + 0.02 * step),
            "rewards/margins": 0.01 * step * scale, "logps/chosen": -30.0 + 0.1 * step,
            "logps/rejected": -31.0 - 0.1 * step * scale, "learning_rate": 1e-6, "epoch": step / 100}


def write_log(path: Path, records: list[dict], torn_tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def test_a_resumed_attempt_leaves_one_value_per_step_from_the_latest_attempt(tmp_path):
    log = tmp_path / "metrics.jsonl"
    first_attempt = [{"step": s, "loss": 10.0 + s} for s in (1, 5, 10, 15)]
    # killed mid-write, resumed from the checkpoint at step 10: steps 15 and 20 logged (again), then the summary
    resumed = [{"step": 15, "loss": 2.15}, {"step": 20, "loss": 2.2},
               {"step": 20, "train_loss": 5.0, "train_runtime": 12.5}]
    write_log(log, first_attempt, torn_tail='{"step": 16, "lo')
    with log.open("a") as handle:
        handle.write("\n" + "".join(json.dumps(r) + "\n" for r in resumed))

    by_step = read_metrics_log(log)
    loss = metric_series(by_step, "loss")
    assert loss.steps == (1, 5, 10, 15, 20)
    assert loss.values == (11.0, 15.0, 20.0, 2.15, 2.2)  # step 15 from the resumed attempt
    assert by_step[20] == {"loss": 2.2, "train_loss": 5.0, "train_runtime": 12.5}  # both records of that step kept
    assert read_metrics_log(tmp_path / "missing.jsonl") is None


def test_the_callback_logs_on_the_main_process_only_and_cuts_the_log_where_a_resume_begins(tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    logs = {"loss": 0.5, "rewards/margins": 0.25, "learning_rate": 2e-5, "epoch": 0.1, "note": "text is not a metric",
            "diverged": float("nan")}

    def callback(main: bool) -> CheckpointAndProgress:
        progress = ProgressFile(tmp_path / "progress.json", enabled=main)
        return CheckpointAndProgress(progress, keep_last=1, keep_weights=None, metrics_log=MetricsLog(log_path))

    worker_state = TrainerState(global_step=5, max_steps=20, is_world_process_zero=False)
    callback(main=False).on_log(None, worker_state, TrainerControl(), logs=dict(logs))
    assert not log_path.exists()

    main = callback(main=True)
    for step in (5, 10, 15):
        main.on_log(None, TrainerState(global_step=step, max_steps=20), TrainerControl(), logs=dict(logs))
    lines = log_path.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"step": 5, "loss": 0.5, "rewards/margins": 0.25, "learning_rate": 2e-5,
                                    "epoch": 0.1, "diverged": None}

    # the job dies mid-line; the requeued one resumes from step 10 and logs step 15 again
    with log_path.open("a") as handle:
        handle.write('{"step": 20, "lo')
    resumed = callback(main=True)
    resumed.on_train_begin(None, TrainerState(global_step=10, max_steps=20), TrainerControl())
    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [5, 10]
    resumed.on_log(None, TrainerState(global_step=15, max_steps=20), TrainerControl(), logs={"loss": 0.125})
    assert metric_series(read_metrics_log(log_path), "loss").values == (0.5, 0.5, 0.125)


def test_the_report_pngs_draw_one_series_per_arm_and_skip_missing_logs(tmp_path):
    cfg = PipelineConfig(dpo=DPOConfig(betas=[0.1, 1.0, 0.05]))
    layout = RunLayout(tmp_path / "run")
    assert draw_training_curves(cfg, layout) == []  # a run without any training log: nothing drawn, no error

    write_log(layout.metrics_log("sft"), [{"step": s, "loss": 5.0 / s} for s in (1, 10, 20, 30)])
    logged_arms = {Arm(0.1): 1.0, Arm(1.0): 3.0}  # beta 0.05 kept no log (e.g. a run made before the log existed)
    for arm, scale in logged_arms.items():
        write_log(layout.metrics_log("dpo", arm), [dpo_record(s, scale) for s in (1, 5, 10, 15)])

    drawn = draw_training_curves(cfg, layout)
    assert [name for _, name in drawn] == [SFT_LOSS_PNG, DPO_CURVES_PNG]
    assert "beta-0.05" in drawn[1][0]  # the title says which arm is missing
    report_dir = layout.report.parent
    for _, name in drawn:
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert sorted(p.name for p in report_dir.iterdir()) == sorted([SFT_LOSS_PNG, DPO_CURVES_PNG])  # no temp files

    curves = collect_training_curves(cfg, layout)
    assert curves.sft["loss"].steps == (1, 10, 20, 30)
    assert list(curves.dpo) == ["beta-0.1", "beta-1.0"]  # config order; the arm without a log left out
    figure = dpo_curves_figure(curves.dpo)
    for ax, (_, _, metrics) in zip(figure.axes, DPO_PANELS):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for arm, scale in logged_arms.items():
            for metric in metrics:
                label = arm.tag if len(metrics) == 1 else f"{arm.tag} {metric.rsplit('/', 1)[-1]}"
                expected = [dpo_record(s, scale)[metric] for s in (1, 5, 10, 15)]
                assert list(lines.pop(label).get_ydata()) == expected, (label, metric)
        assert not lines  # exactly one line per arm (and metric)


def test_a_run_from_before_the_metrics_log_uses_its_newest_checkpoints_log_history(tmp_path):
    cfg = PipelineConfig(dpo=DPOConfig(betas=[0.1]))
    layout = RunLayout(tmp_path / "run")
    histories = {10: [{"step": 5, "loss": 3.0}], 20: [{"step": 5, "loss": 3.0}, {"step": 20, "loss": 1.0}]}
    for step, history in histories.items():
        checkpoint = layout.checkpoints_dir("sft") / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        (checkpoint / "COMPLETE.json").write_text(json.dumps({"step": step}))
    curves = collect_training_curves(cfg, layout)
    assert curves.sft["loss"].steps == (5, 20) and curves.dpo == {}
    assert [name for _, name in draw_training_curves(cfg, layout)] == [SFT_LOSS_PNG]
