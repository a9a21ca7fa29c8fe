"""The frontier's tables and plot: frontier.csv (one row per evaluated policy), the means over seeds
(frontier_seeds.csv) and frontier.png.

Every arm of the sweep (method, strength, seed) is evaluated at each of its eval checkpoints. The
frontier plot draws one series per (method, strength): with one seed its points are the checkpoints'
own estimates (± one standard error over samples); with several seeds a point is the mean over the
seeds at that step and its bars are one standard error over seeds (`seed_means`).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from pipeline.evaluation.policies import reward_stderr
from pipeline.training.methods import DEFAULT_METHOD, METHODS

# policy: sft, dpo (the stage that trained it) or best_of_n (sampled from sft); method/strength/seed
# identify an arm (strength = beta, the column old readers use, for trained methods with one; N for
# best_of_n, whose beta is empty and kl_analytic = log N - (N-1)/N); appended, so the old columns keep
# their places.
FRONTIER_COLUMNS = ["policy", "beta", "step", "reward", "kl", "n", "reward_stderr", "kl_stderr",
                    "method", "strength", "seed", "kl_analytic"]
SEED_MEAN_COLUMNS = ["method", "strength", "step", "seeds", "reward", "reward_stderr", "kl", "kl_stderr",
                     "kl_analytic"]


def method_of(result: dict) -> str | None:
    """A row's method: None for SFT; results written before methods existed were DPO."""
    return None if result["policy"] == "sft" else (result.get("method") or DEFAULT_METHOD)


def strength_of(result: dict):
    """A row's strength: beta for results written before strengths were recorded; None for SFT and
    methods without one."""
    return result["strength"] if "strength" in result else result["beta"]


def is_best_of_n(result: dict) -> bool:
    spec = METHODS.get(method_of(result) or "")
    return spec is not None and not spec.trains


def arm_label(method: str, strength) -> str:
    """'DPO β=0.1', 'IPO τ=0.5', 'Preferred-FT', 'Best-of-N N=4'."""
    spec = METHODS.get(method)
    if strength is None:
        return spec.label if spec else method
    return f"{spec.label} {spec.symbol}={strength:g}" if spec else f"{method} β={strength:g}"


def num(value: float) -> str:
    """A CSV number with six significant digits: the SFT noise floor (~1e-7) and small standard errors
    keep their digits (`2.53e-07`, not `0.000000`)."""
    return f"{value:.6g}"


def frontier_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FRONTIER_COLUMNS)
    for r in results:
        beta = "" if r["beta"] is None else r["beta"]
        strength, seed, analytic = strength_of(r), r.get("seed"), r.get("kl_analytic")
        writer.writerow([r["policy"], beta, r["step"], num(r['reward']), num(r['kl']), r["n"],
                         num(reward_stderr(r)), num(r['kl_stderr']), method_of(r) or "",
                         "" if strength is None else strength, "" if seed is None else seed,
                         "" if analytic is None else num(analytic)])
    return buffer.getvalue()


def _mean_and_stderr_over(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std, divisor k - 1, over sqrt(k)) of k >= 2 values."""
    k = len(values)
    mean = sum(values) / k
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1)) / math.sqrt(k)


def seed_means(results: list[dict]) -> list[dict]:
    """One row per (method, strength, step) of the DPO results, in the order the series first appear.

    Over the k seeds that reached the step: reward and KL are their means and the standard errors are
    over seeds (sample std over sqrt(k); each seed's estimate carries its own sampling noise, so this
    covers both). With k = 1 the one result's own standard errors (over samples) are kept.
    """
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in results:
        if r["policy"] == "sft":
            continue
        groups.setdefault((method_of(r), strength_of(r)), {}).setdefault(r["step"], []).append(r)
    rows = []
    for (method, strength), by_step in groups.items():
        for step in sorted(by_step):
            runs = by_step[step]
            if len(runs) == 1:
                reward, reward_se, kl, kl_se = runs[0]["reward"], reward_stderr(runs[0]), runs[0]["kl"], runs[0]["kl_stderr"]
            else:
                reward, reward_se = _mean_and_stderr_over([r["reward"] for r in runs])
                kl, kl_se = _mean_and_stderr_over([r["kl"] for r in runs])
            rows.append({"method": method, "strength": strength, "step": step, "seeds": len(runs), "reward": reward,
                         "reward_stderr": reward_se, "kl": kl, "kl_stderr": kl_se,
                         "kl_analytic": runs[0].get("kl_analytic")})
    return rows


def seed_means_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SEED_MEAN_COLUMNS)
    for r in rows:
        writer.writerow([r["method"], "" if r["strength"] is None else r["strength"], r["step"], r["seeds"],
                         num(r['reward']), num(r['reward_stderr']), num(r['kl']), num(r['kl_stderr']),
                         "" if r.get("kl_analytic") is None else num(r['kl_analytic'])])
    return buffer.getvalue()


def several_seeds(results: list[dict]) -> bool:
    """Whether the DPO rows come from more than one training seed."""
    return len({r.get("seed") for r in results if r["policy"] != "sft"}) > 1


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_frontier(results: list[dict], path: Path, reward_label: str = "mean reward") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def errorbar(points: list[dict], fmt: str, **style) -> None:  # bars: ±1 standard error
        ax.errorbar([r["kl"] for r in points], [r["reward"] for r in points],
                    xerr=[r["kl_stderr"] for r in points], yerr=[reward_stderr(r) for r in points],
                    fmt=fmt, capsize=2, elinewidth=0.8, **style)

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    means = seed_means(results)
    untrained = {m for m, spec in METHODS.items() if not spec.trains}
    # one series per (method, strength) over steps; a Best-of-N method is one series over N
    series = list(dict.fromkeys((r["method"], None if r["method"] in untrained else r["strength"]) for r in means))
    methods = list(dict.fromkeys(method for method, _ in series))
    colours = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors
    for index, (method, strength) in enumerate(series):
        colour = colours[index % len(colours)]
        marker = MARKERS[methods.index(method) % len(MARKERS)]
        if method in untrained:
            points = sorted((r for r in means if r["method"] == method), key=lambda r: r["strength"])
            seeds = max(r["seeds"] for r in points)
            spec = METHODS[method]
            ns = ", ".join(f"{r['strength']:g}" for r in points)
            errorbar(points, f"{marker}--", ms=5, color=colour,
                     label=f"{spec.label}, {spec.symbol} = {ns} (KL measured"
                           + (f"; mean of {seeds} seeds)" if seeds > 1 else ")"))
            ax.plot([r["kl_analytic"] for r in points], [r["reward"] for r in points], marker, ms=6, mfc="none",
                    color=colour, label=f"{spec.label}, KL analytic log N − (N−1)/N")
            for r in points:
                ax.annotate(f"{spec.symbol}={r['strength']:g}", (r["kl"], r["reward"]), fontsize=6,
                            xytext=(3, -8), textcoords="offset points", color=colour)
            continue
        points = [r for r in means if (r["method"], r["strength"]) == (method, strength)]
        seeds = max(r["seeds"] for r in points)
        errorbar(points, f"{marker}-", ms=4, color=colour,
                 label=arm_label(method, strength) + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    sft = next(r for r in results if r["policy"] == "sft")
    if math.isnan(sft["kl"]):  # restored samples without sampler log-probs: drawn at 0, hollow
        ax.plot([0.0], [sft["reward"]], "k*", ms=14, mfc="none", label="SFT (reference; noise floor not measured)")
    else:
        errorbar([sft], "k*", ms=14, label="SFT (reference; KL = noise floor: sampler ‖ scorer)")
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel(reward_label)
    only_dpo = methods in ([], [DEFAULT_METHOD])
    what = "every DPO checkpoint" if only_dpo else "every checkpoint of each method"
    bars = "±1 s.e. over seeds" if any(r["seeds"] > 1 for r in means) else "±1 s.e."
    ax.set_title(f"Reward vs KL: SFT and {what} ({bars})", fontsize=None if only_dpo else 10)
    ax.grid(alpha=0.3)
    if len(series) > 6:  # many series (the methods sweep): the legend beside the axes, not over the points
        fig.set_size_inches(10.0, 4.6)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
