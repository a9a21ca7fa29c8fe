"""Training curves for the report: the SFT loss, and per DPO arm the loss, reward accuracy, reward
margin and chosen/rejected log-probs against the optimizer step.

Drawn from the metrics log each training stage keeps (`pipeline.rundir.metrics_log`), not from wandb. A run
made before that log existed falls back to the log history in the stage's newest complete
checkpoint (`trainer_state.json`, which pruning keeps) when there is one; a stage with neither is
left out of the report rather than failing it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.rundir.layout import RunLayout, read_json
from pipeline.rundir.metrics_log import merge_by_step, read_metrics_log
from pipeline.training.methods import DEFAULT_METHOD
from pipeline.registry import trained_arms

SFT_LOSS_PNG = "sft_loss.png"
DPO_CURVES_PNG = "dpo_curves.png"

SFT_METRICS = ("loss",)
# One subplot each: (title, y-axis label, the TRL metrics it draws; a second one is dashed)
DPO_PANELS = (
    ("Training loss (each arm's own objective)", "loss", ("loss",)),
    ("Reward accuracy (chosen reward > rejected)", "rewards/accuracies", ("rewards/accuracies",)),
    ("Reward margin (chosen − rejected)", "rewards/margins", ("rewards/margins",)),
    ("Policy log-probs: chosen (solid), rejected (dashed)", "log p (sum over completion tokens)",
     ("logps/chosen", "logps/rejected")),
)
DPO_METRICS = tuple(metric for _, _, metrics in DPO_PANELS for metric in metrics)
LINE_STYLES = ("-", "--")


@dataclass(frozen=True)
class Series:
    """One metric against the step; NaN where the trainer logged a non-finite value (a gap in the line)."""
    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass
class TrainingCurves:
    """What the report draws. A stage without any log is absent (not an empty series)."""
    sft: dict[str, Series] = field(default_factory=dict)               # metric -> series
    dpo: dict[str, dict[str, Series]] = field(default_factory=dict)    # arm tag -> metric -> series


def stage_log(layout: RunLayout, directory: str, task=None) -> dict[int, dict] | None:
    """Step -> metrics of one training stage: its metrics log, else the log history of its newest
    complete checkpoint (runs made before the metrics log existed), else None."""
    logged = read_metrics_log(layout.metrics_log(directory, task))
    if logged:
        return logged
    from pipeline.training.loop import latest_checkpoint

    newest = latest_checkpoint(layout.checkpoints_dir(directory, task))
    state = read_json(newest[1] / "trainer_state.json") if newest else None
    history = [record for record in (state or {}).get("log_history", []) if isinstance(record.get("step"), int)]
    return merge_by_step(history) or None


def metric_series(by_step: dict[int, dict], metric: str) -> Series | None:
    """The steps at which `metric` was logged, with its values; None if it never was."""
    points = [(step, math.nan if values[metric] is None else float(values[metric]))
              for step, values in by_step.items() if metric in values]
    if not points:
        return None
    steps, values = zip(*points)
    return Series(steps, values)


def series_of(by_step: dict[int, dict] | None, metrics: tuple[str, ...]) -> dict[str, Series]:
    found = {metric: metric_series(by_step, metric) for metric in metrics} if by_step else {}
    return {metric: series for metric, series in found.items() if series is not None}


def collect_training_curves(cfg: PipelineConfig, layout: RunLayout) -> TrainingCurves:
    """The series the report draws, read from the run directory; trained arms in sweep order (`trained_arms`)."""
    curves = TrainingCurves(sft=series_of(stage_log(layout, "sft"), SFT_METRICS))
    for arm in trained_arms(cfg):
        arm_series = series_of(stage_log(layout, "dpo", arm), DPO_METRICS)
        if arm_series:
            curves.dpo[arm.tag] = arm_series
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    return plt


def sft_loss_figure(loss: Series):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(loss.steps, loss.values, "-", lw=1.2, label="SFT")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token cross-entropy)")
    ax.set_title("SFT training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def dpo_curves_figure(by_arm: dict[str, dict[str, Series]], what: str = "DPO"):
    """One subplot per entry of DPO_PANELS, one colour per arm, each line labelled with its arm's tag
    (and the metric's last name part where a panel draws two)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=120, sharex=True)
    colours = plt.get_cmap("tab20").colors if len(by_arm) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, metrics) in zip(axes.flat, DPO_PANELS):
        for index, (tag, arm_series) in enumerate(by_arm.items()):
            for metric, style in zip(metrics, LINE_STYLES):
                if metric in arm_series:
                    series = arm_series[metric]
                    label = tag if len(metrics) == 1 else f"{tag} {metric.rsplit('/', 1)[-1]}"
                    ax.plot(series.steps, series.values, style, color=colours[index % len(colours)], lw=1.2,
                            label=label)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    axes.flat[0].legend(fontsize=8 if len(by_arm) <= 8 else 6)  # the arms' colours; the same in every panel
    fig.suptitle(f"{what} training, per arm")
    fig.tight_layout()
    return fig


def save_png(fig, path: Path) -> None:
    """Written under a temporary name and renamed, so the report never links a half-written image."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(path)


def draw_training_curves(cfg: PipelineConfig, layout: RunLayout) -> list[tuple[str, str]]:
    """Draw the training-curve PNGs next to the report; returns (title, file name) of each one drawn,
    for the report to embed. A stage that kept no log is skipped (its figure is not drawn, or an arm
    is missing from the DPO figure and its title says so)."""
    curves = collect_training_curves(cfg, layout)
    report_dir = layout.report.parent
    drawn = []
    if "loss" in curves.sft:
        save_png(sft_loss_figure(curves.sft["loss"]), report_dir / SFT_LOSS_PNG)
        drawn.append(("SFT training loss", SFT_LOSS_PNG))
    if curves.dpo:
        missing = [arm.tag for arm in trained_arms(cfg) if arm.tag not in curves.dpo]
        # the dpo stage trains every method of the sweep; "DPO" only where it is the only one
        what = "DPO" if {arm.method for arm in trained_arms(cfg)} == {DEFAULT_METHOD} else "Preference and online"
        title = f"{what} training curves per arm" + (f" (no training log for {', '.join(missing)})" if missing else "")
        save_png(dpo_curves_figure(curves.dpo, what), report_dir / DPO_CURVES_PNG)
        drawn.append((title, DPO_CURVES_PNG))
    return drawn
