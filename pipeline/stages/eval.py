"""Stage 4: sentiment reward vs KL to the reference for SFT and every DPO checkpoint.

Three stages (pipeline.registry), so eval scales out with the sweep:
- eval_sft (array, after sft): the SFT model itself (the reference row) and each Best-of-N arm;
- eval_arms (array, after dpo; on SLURM task i waits only for dpo task i, `aftercorr`): every eval
  checkpoint and the final model of one trained arm;
- eval (one small job, no GPU): assembles frontier.csv, frontier.png, the training curves and report.md
  from the per-policy results.

For each policy: sample `samples_per_prompt` completions per eval prompt, score them, and estimate
KL(pi || pi_ref) = E_{y~pi}[sum_t log pi(y_t|.) - log pi_ref(y_t|.)] with pi_ref = the SFT model.

The SFT row's KL is the noise floor of that measurement, measured: the sampler records the
log-probability q(y) of each completion under the distribution it drew from (KV-cache decoding in
the model's dtype, e.g. bf16 logits; `Sample.sampler_logp`), the scorer computes log pi_sft(y)
(full forward, float32 head), and E_{y~q}[log q(y) - log pi_sft(y)] estimates KL(q || pi_sft): 0
only if sampling and scoring compute the same distribution. (Scoring the SFT model against itself
would be 0 by construction.) Each DPO result also stores its own sampler mismatch
(`sampler_mismatch`, same estimator). A result whose samples were restored from partial files
written before `sampler_logp` existed gets NaN there (report: "not measured"). Reward and KL carry
standard errors. Each policy's result is its own file, so a restarted eval resumes per checkpoint.

Every arm of the sweep (method, strength, seed) is evaluated at each of its eval checkpoints. The
frontier plot draws one series per (method, strength): with one seed its points are the checkpoints'
own estimates (± one standard error over samples); with several seeds a point is the mean over the
seeds at that step and its bars are one standard error over seeds (`seed_means`).

A Best-of-N arm is not trained: for each prompt and each of its `samples_per_prompt` draws, N
completions are sampled from the SFT model (seeded per N and arm seed, saved per sampling batch like
the others) and the highest-reward one is kept; its reward is the mean over the kept ones. Its KL is
measured from the rewards of all the prompt's draws and also given analytically, log N - (N-1)/N
(exact for a continuous reward, an upper bound with ties): `pipeline.best_of_n` derives both. It is
one series over N in the plot.
"""
from __future__ import annotations

import csv
import io
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import interrupt
from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.layout import RunLayout, atomic_write_json, atomic_write_text, read_json, read_jsonl, write_manifest
from pipeline.methods import DEFAULT_METHOD, METHODS
from pipeline.progress import ProgressFile
from pipeline.registry import Arm, sweep_arms

# policy: sft, dpo (the stage that trained it) or best_of_n (sampled from sft); method/strength/seed
# identify an arm (strength = beta, the column old readers use, for trained methods with one; N for
# best_of_n, whose beta is empty and kl_analytic = log N - (N-1)/N); appended, so the old columns keep
# their places.
FRONTIER_COLUMNS = ["policy", "beta", "step", "reward", "kl", "n", "reward_stderr", "kl_stderr",
                    "method", "strength", "seed", "kl_analytic"]
SEED_MEAN_COLUMNS = ["method", "strength", "step", "seeds", "reward", "reward_stderr", "kl", "kl_stderr",
                     "kl_analytic"]


@dataclass
class Policy:
    id: str
    kind: str  # sft | dpo | best_of_n
    beta: float | None  # TRL's beta of a trained arm (None: SFT, Preferred-FT, Best-of-N)
    step: int
    path: Path
    method: str | None = None  # arms: the arm's method, strength, training (sampling) seed and tag
    seed: int | None = None
    arm: str | None = None
    strength: float | int | None = None

    def identity(self) -> dict:
        """What a result records of its arm (results cached before it was recorded get it from here)."""
        return {"method": self.method, "seed": self.seed, "arm": self.arm, "strength": self.strength}


def best_of_n_seed(arm: Arm, run_seed: int) -> int:
    """The sampling seed of a Best-of-N arm: one per (N, seed) pair (Cantor's pairing is one-to-one), in a
    range of its own (from 2**40 on), so never another arm's nor the SFT row's (run seed + 7)."""
    n, seed = arm.strength, arm.training_seed(run_seed)
    return 2 ** 40 + (n + seed) * (n + seed + 1) // 2 + seed


def sft_policy(layout: RunLayout) -> Policy:
    return Policy("sft", "sft", None, 0, layout.sft_model)


def arm_policies(cfg: PipelineConfig, layout: RunLayout, arm: Arm) -> list[Policy]:
    """A trained arm's policies: every periodic eval checkpoint and the final model (deduplicated by
    step); a Best-of-N arm's one policy (the SFT model, sampled N times per draw)."""
    from pipeline.training import complete_checkpoints, is_eval_checkpoint

    identity = {"method": arm.method, "seed": arm.training_seed(cfg.seed), "arm": arm.tag, "strength": arm.strength}
    if not arm.trains:
        return [Policy(arm.tag, arm.method, None, 0, layout.sft_model, **identity)]
    manifest = read_json(layout.done_path("dpo", arm))
    if manifest is None:
        raise RuntimeError(f"eval: {arm.method} {arm.tag} is not trained yet ({layout.done_path('dpo', arm)} "
                           f"missing); its dpo task {arm.key!r} must finish first")
    final_step = manifest["metrics"]["global_step"]
    policies = [Policy(f"dpo-{arm.tag}-step{step}", "dpo", arm.beta, step, path, **identity)
                for step, path in complete_checkpoints(layout.checkpoints_dir("dpo", arm))
                if step != final_step and is_eval_checkpoint(step, cfg.dpo.save_steps)]
    return policies + [Policy(f"dpo-{arm.tag}-step{final_step}", "dpo", arm.beta, final_step,
                              layout.final_model("dpo", arm), **identity)]


def list_policies(cfg: PipelineConfig, layout: RunLayout) -> list[Policy]:
    """Every policy of the frontier: SFT, then each arm's (`arm_policies`) in sweep order."""
    return [sft_policy(layout)] + [p for arm in sweep_arms(cfg) for p in arm_policies(cfg, layout, arm)]


def stderr_from_population_std(std: float, n: int) -> float:
    """Standard error of a mean from the population std (divisor n) of its n values: the sample std
    (divisor n - 1, as torch.std for the KL) over sqrt(n)."""
    return std / math.sqrt(n - 1) if n > 1 else 0.0


def reward_stderr(result: dict) -> float:
    """A result's reward standard error; results cached before it was stored derive it from reward_std and n."""
    if "reward_stderr" in result:
        return result["reward_stderr"]
    return stderr_from_population_std(result["reward_std"], result["n"])


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and its standard error (sample std over sqrt(n)) of a 1-d float tensor."""
    n = len(values)
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else 0.0


def sampler_mismatch(samples, scored_logp) -> tuple[float, float]:
    """Estimate of KL(q || pi) and its standard error, q the distribution the sampler drew `samples`
    from, pi the scored model: the mean of sampler_logp - scored log pi(y) (the samples are from q).
    NaN if any sample has no sampler_logp (restored from a partial file written before it was
    recorded): a mean over the rest would cover only some prompts."""
    import torch

    recorded = [s.sampler_logp for s in samples]
    if not samples or any(v is None for v in recorded):
        return math.nan, math.nan
    return mean_and_stderr(torch.tensor(recorded, dtype=torch.float64) - scored_logp)


def evaluate_policy(cfg: PipelineConfig, policy: Policy, model, ref_model, tokenizer, reward, prompts: list[str],
                    partial_dir: Path) -> dict:
    from pipeline.reward import score_in_batches
    from pipeline.sampling import completion_logprobs, sample_resumable, sequence_kl

    ev = cfg.eval
    # saved per sampling batch: a stop inside a policy loses at most the batch in flight
    groups = sample_resumable(model, tokenizer, prompts, partial_dir, f"eval {policy.id}",
                              num_samples=ev.samples_per_prompt, max_new_tokens=ev.max_new_tokens,
                              temperature=ev.temperature, batch_size=ev.batch_size, seed=cfg.seed + 7,
                              kv_cache=ev.kv_cache, prompt_width=cfg.data.prompt_max_tokens)
    flat = [s for group in groups for s in group]
    rewards = score_in_batches(reward, [s.text for s in flat], cfg.reward.batch_size)
    is_reference = policy.kind == "sft"  # the SFT model is the reference: scored once
    lp = completion_logprobs(model, flat, tokenizer.pad_token_id, temperature=ev.temperature,
                             batch_size=ev.logprob_batch_size, ref_model=None if is_reference else ref_model)
    mismatch, mismatch_stderr = sampler_mismatch(flat, lp["logp"])
    if is_reference:  # the noise floor: KL(sampler || scorer) of the reference itself (module docstring)
        kl, kl_stderr = mismatch, mismatch_stderr
        kl_tokenwise = None  # KL(pi_sft || pi_sft) per step is 0 by definition; nothing to measure
    else:
        kl = sequence_kl(lp["logp"], lp["ref_logp"])
        kl_stderr = mean_and_stderr(lp["logp"] - lp["ref_logp"])[1]
        kl_tokenwise = float(lp["kl_tokenwise"].mean())
    n = len(flat)
    mean_reward = sum(rewards) / n
    reward_std = (sum((r - mean_reward) ** 2 for r in rewards) / n) ** 0.5
    fixed = set(cfg.eval.fixed_prompts)
    examples = [{"prompt": g[0].prompt, "completion": g[0].completion, "reward": rewards[i * ev.samples_per_prompt]}
                for i, g in enumerate(groups) if g[0].prompt in fixed]
    return {"policy": policy.kind, "id": policy.id, "beta": policy.beta, **policy.identity(), "step": policy.step,
            "reward": mean_reward,
            "reward_std": reward_std, "reward_stderr": stderr_from_population_std(reward_std, n), "kl": kl,
            "kl_stderr": kl_stderr, "kl_tokenwise": kl_tokenwise, "sampler_mismatch": mismatch,
            "sampler_mismatch_stderr": mismatch_stderr, "n": n,
            "mean_completion_tokens": sum(len(s.completion_ids) for s in flat) / n, "examples": examples}


def evaluate_best_of_n(cfg: PipelineConfig, policy: Policy, sft_model, tokenizer, reward, prompts: list[str],
                       partial_dir: Path) -> dict:
    """A Best-of-N arm: per prompt `samples_per_prompt` groups of N SFT samples, the highest-reward one of
    each group kept. Reward: mean ± standard error over the kept samples. KL: `best_of_n.empirical_kl` of
    each prompt's S * N rewards, mean ± standard error over prompts; `kl_analytic` = log N - (N-1)/N."""
    from pipeline.best_of_n import analytic_kl, empirical_kl, keep_best
    from pipeline.reward import score_in_batches
    from pipeline.sampling import sample_resumable

    ev, n = cfg.eval, int(policy.strength)
    draws = ev.samples_per_prompt
    # saved per sampling batch: a stop inside the arm loses at most the batch in flight
    groups = sample_resumable(sft_model, tokenizer, prompts, partial_dir, f"eval {policy.id}",
                              num_samples=draws * n, max_new_tokens=ev.max_new_tokens,
                              temperature=ev.temperature, batch_size=ev.batch_size,
                              seed=best_of_n_seed(Arm(n, policy.method, policy.seed), cfg.seed),
                              kv_cache=ev.kv_cache, prompt_width=cfg.data.prompt_max_tokens)
    flat = [s for group in groups for s in group]
    rewards = score_in_batches(reward, [s.text for s in flat], cfg.reward.batch_size)
    kept = keep_best(rewards, n)  # groups of n consecutive samples of one prompt (draws * n per prompt)
    kept_rewards = [rewards[i] for i in kept]
    per_prompt = [rewards[p * draws * n:(p + 1) * draws * n] for p in range(len(prompts))]
    kls = [empirical_kl(r, n) for r in per_prompt]
    count = len(kept)
    mean_reward = sum(kept_rewards) / count
    reward_std = (sum((r - mean_reward) ** 2 for r in kept_rewards) / count) ** 0.5
    kl = sum(kls) / len(kls)
    kl_stderr = stderr_from_population_std((sum((k - kl) ** 2 for k in kls) / len(kls)) ** 0.5, len(kls))
    fixed = set(cfg.eval.fixed_prompts)
    examples = [{"prompt": flat[kept[p * draws]].prompt, "completion": flat[kept[p * draws]].completion,
                 "reward": kept_rewards[p * draws]} for p, prompt in enumerate(prompts) if prompt in fixed]
    return {"policy": policy.kind, "id": policy.id, "beta": None, **policy.identity(), "step": policy.step,
            "reward": mean_reward, "reward_std": reward_std,
            "reward_stderr": stderr_from_population_std(reward_std, count), "kl": kl, "kl_stderr": kl_stderr,
            "kl_analytic": analytic_kl(n), "kl_tokenwise": None, "sampler_mismatch": None,
            "sampler_mismatch_stderr": None, "n": count, "samples_drawn": len(flat),
            "mean_completion_tokens": sum(len(flat[i].completion_ids) for i in kept) / count, "examples": examples}


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


def frontier_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FRONTIER_COLUMNS)
    for r in results:
        beta = "" if r["beta"] is None else r["beta"]
        strength, seed, analytic = strength_of(r), r.get("seed"), r.get("kl_analytic")
        writer.writerow([r["policy"], beta, r["step"], f"{r['reward']:.6f}", f"{r['kl']:.6f}", r["n"],
                         f"{reward_stderr(r):.6f}", f"{r['kl_stderr']:.6f}", method_of(r) or "",
                         "" if strength is None else strength, "" if seed is None else seed,
                         "" if analytic is None else f"{analytic:.6f}"])
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
                         f"{r['reward']:.6f}", f"{r['reward_stderr']:.6f}", f"{r['kl']:.6f}", f"{r['kl_stderr']:.6f}",
                         "" if r.get("kl_analytic") is None else f"{r['kl_analytic']:.6f}"])
    return buffer.getvalue()


def several_seeds(results: list[dict]) -> bool:
    """Whether the DPO rows come from more than one training seed."""
    return len({r.get("seed") for r in results if r["policy"] != "sft"}) > 1


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_frontier(results: list[dict], path: Path) -> None:
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
    ax.set_ylabel("mean sentiment reward P(positive)")
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


def kl_cell(r: dict) -> str:
    """'1.50 ± 0.25'; 'n/a' when not measured; Best-of-N rows: '0.631 ± 0.001 (analytic 0.636)'."""
    if r.get("kl_analytic") is not None:  # 3 decimals: the measured and analytic values differ in the third
        return f"{r['kl']:.3f} ± {r['kl_stderr']:.3f} (analytic {r['kl_analytic']:.3f})"
    return "n/a" if math.isnan(r["kl"]) else f"{r['kl']:.2f} ± {r['kl_stderr']:.2f}"


def report_markdown(cfg: PipelineConfig, results: list[dict], training_curves: list[tuple[str, str]] = ()) -> str:
    """The frontier table (policy = sft or the DPO row's method; a seed column when seeds vary), the
    means over seeds when there are several, the noise floor, training curves and samples."""
    seeded = several_seeds(results)
    only_dpo = all(method_of(r) in (None, DEFAULT_METHOD) for r in results)
    title, strength_header = ("DPO reward vs KL", "β") if only_dpo else ("Reward vs KL", "strength")
    lines = [f"# {title} — run `{cfg.name}`", "",
             f"Model `{cfg.model.name}`, reward `{cfg.reward.kind}`, {results[0]['n']} samples per policy "
             f"({cfg.eval.num_prompts} prompts × {cfg.eval.samples_per_prompt}).", "",
             "![frontier](frontier.png)", "",
             f"| policy | {strength_header} |{' seed |' if seeded else ''} step | reward | KL | n |",
             f"|---|---|{'---|' if seeded else ''}---|---|---|---|"]
    for r in results:
        strength = strength_of(r)
        beta = "" if strength is None else (f"N={strength:g}" if is_best_of_n(r) else f"{strength:g}")
        seed = "" if r.get("seed") is None else r["seed"]
        kl = kl_cell(r)
        lines.append(f"| {method_of(r) or r['policy']} | {beta} |{f' {seed} |' if seeded else ''} {r['step']} "
                     f"| {r['reward']:.3f} ± {reward_stderr(r):.3f} | {kl} | {r['n']} |")
    if seeded:
        lines += ["", "Mean over seeds (as plotted; ± one standard error over the seeds, `frontier_seeds.csv`):", "",
                  f"| method | {strength_header} | step | seeds | reward | KL |", "|---|---|---|---|---|---|"]
        for m in seed_means(results):
            kl = kl_cell(m)
            strength = "" if m["strength"] is None else f"{m['strength']:g}"
            lines.append(f"| {m['method']} | {strength} | {m['step']} | {m['seeds']} "
                         f"| {m['reward']:.3f} ± {m['reward_stderr']:.3f} | {kl} |")
    sft = next(r for r in results if r["policy"] == "sft")
    what = ("the SFT row's KL is the noise floor of the KL measurement: for each SFT completion, the sampler's "
            "own log-probability of it (KV-cache decoding in the model's dtype, as every row is sampled) minus the "
            "SFT model's score of it (full forward, float32 head, as every row is scored), averaged: an estimate of "
            "KL(sampler ‖ scorer), 0 only if the two compute the same distribution")
    if math.isnan(sft["kl"]):
        floor = (f"**Noise floor**: not measured (n/a): {what}, and these SFT samples were restored from partial "
                 "files written before the sampler's log-probabilities were recorded. Delete the SFT result "
                 "(eval/policies/sft.json) and rerun eval to measure it.")
    else:
        floor = (f"**Noise floor**: {what}; here {sft['kl']:.2g} ± {sft['kl_stderr']:.2g} nats. A DPO KL that is "
                 "not clearly above it does not tell the policy apart from the reference.")
    lines += ["", f"± is one standard error over the samples{' (in the means: over the seeds)' if seeded else ''}. "
              f"{floor}", ""]
    if any(is_best_of_n(r) for r in results):
        lines += ["**Best-of-N** (no training): per prompt and draw, N samples of the SFT model, the highest-reward "
                  "one kept; reward = mean of the kept samples. Its KL is measured from the rewards of all the "
                  "prompt's samples (the exact Best-of-N KL for their empirical reward distribution, which handles "
                  "tied rewards; ± over prompts) and, in brackets, the analytic log N − (N−1)/N: exact for a "
                  "continuous reward, an upper bound when rewards tie (Beirami et al. 2024); the measurement is "
                  "slightly below it even for distinct rewards (0.6334 against 0.6363 at N = 4 with 16 samples "
                  "per prompt; `pipeline/best_of_n.py`). n counts kept samples.", ""]
    if training_curves:
        lines += ["## Training curves", "",
                  "From the trainer logs kept in the run directory (`sft/metrics.jsonl`, `dpo/<arm>/metrics.jsonl`).", ""]
        for title, png in training_curves:
            lines += [f"### {title}", "", f"![{title}]({png})", ""]
    lines += ["## Sample generations", ""]
    finals = [r for r in results if r["policy"] == "sft"]
    for arm in dict.fromkeys((method_of(r), strength_of(r), r.get("seed")) for r in results if r["policy"] != "sft"):
        finals.append(max((r for r in results if (method_of(r), strength_of(r), r.get("seed")) == arm),
                          key=lambda r: r["step"]))
    for r in finals:
        if r["policy"] == "sft":
            title = "SFT"
        else:
            method, strength = METHODS.get(method_of(r)), strength_of(r)
            name = f"{method.label} {method.symbol}" if method else f"{method_of(r)} β"
            seed = f", seed {r['seed']}" if seeded else ""
            if strength is None:
                title = f"{method.label if method else method_of(r)}{seed} (step {r['step']})"
            elif is_best_of_n(r):
                title = f"{name} = {strength:g}{seed} (kept sample)"
            else:
                title = f"{name} = {strength:g}{seed} (step {r['step']})"
        lines += [f"### {title}", ""]
        for ex in r["examples"]:
            lines += [f"**Prompt:** “{ex['prompt']}”  ", f"**Generation** (reward {ex['reward']:.2f}): "
                      f"“{ex['prompt']}{ex['completion']}”", ""]
    return "\n".join(lines) + "\n"


def _evaluate(cfg: PipelineConfig, layout: RunLayout, stage_name: str, task, policies: list[Policy]) -> dict:
    """Evaluate `policies` (one eval task's) into eval/policies/<id>.json, resuming per policy and per
    sampling batch; the task's DONE.json lists them."""
    from pipeline.registry import get_stage

    stage = get_stage(stage_name)
    if stage.is_done(layout, task):
        return read_json(stage.done_path(layout, task))
    started = time.time()
    from pipeline.models import (load_model, load_tokenizer, load_weights_into, resolve_device, resolve_dtype,
                                 setup_process)
    from pipeline.reward import make_reward

    setup_process(cfg)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.model, device)
    shared = {}  # loaded on first use: a task whose results all exist (a requeue after the last one) loads nothing

    def needs() -> dict:
        if not shared:
            shared.update(prompts=[r["prompt"] for r in read_jsonl(layout.eval_prompts)],
                          tokenizer=load_tokenizer(layout.sft_model),
                          ref_model=load_model(layout.sft_model, device, dtype),  # also what SFT/Best-of-N sample
                          reward=make_reward(cfg.reward, device))
        return shared

    progress = ProgressFile(stage.progress_path(layout, task))
    progress.start(sum(layout.eval_result(p.id).is_file() for p in policies))  # resumes per policy
    results = []
    policy_model = None  # one model for every checkpoint of the arm, weights copied in (see load_weights_into)
    label = stage.label(task)
    try:
        for index, policy in enumerate(policies):
            interrupt.check(index, f"{label}: {index} of {len(policies)} policies evaluated")
            out = layout.eval_result(policy.id)
            result = read_json(out)
            if result is None:
                partial = out.with_suffix(".partial")
                use = needs()
                common = (use["tokenizer"], use["reward"], use["prompts"], partial)
                if policy.kind == "best_of_n":  # sampled from the SFT model, no weights to load
                    result = evaluate_best_of_n(cfg, policy, use["ref_model"], *common)
                else:
                    if policy.kind == "sft":
                        model = use["ref_model"]
                    elif policy_model is None:
                        model = policy_model = load_model(policy.path, device, dtype)
                    else:
                        load_weights_into(policy_model, policy.path)
                        model = policy_model
                    result = evaluate_policy(cfg, policy, model, use["ref_model"], *common)
                atomic_write_json(out, result)
                shutil.rmtree(partial, ignore_errors=True)
            print(f"{label}: {policy.id}: reward {result['reward']:.4f}, KL {result['kl']:.4f}", flush=True)
            results.append(result)
            progress.update(step=index + 1, total_steps=len(policies))
    except interrupt.StageInterrupted as stop:  # saved per policy and per sampling batch; rerunning resumes
        progress.stopped(stop.reason, len(results))
        raise
    final = results[-1]
    metrics = {"policies": len(results), "reward": final["reward"], "kl": final["kl"], "step": final["step"]}
    progress.update(force=True, status="done")
    return write_manifest(stage.done_path(layout, task), config=to_dict(cfg), started=started,
                          inputs={"policies": [p.id for p in policies]}, metrics=metrics)


def run_from_sft(cfg: PipelineConfig, layout: RunLayout, task) -> dict:
    """An eval_sft task: the SFT model itself (the reference row) or a Best-of-N arm sampled from it."""
    policies = [sft_policy(layout)] if task.arm is None else arm_policies(cfg, layout, task.arm)
    return _evaluate(cfg, layout, "eval_sft", task, policies)


def run_arm(cfg: PipelineConfig, layout: RunLayout, arm: Arm) -> dict:
    """An eval_arms task: every eval checkpoint and the final model of one trained arm."""
    return _evaluate(cfg, layout, "eval_arms", arm, arm_policies(cfg, layout, arm))


def run(cfg: PipelineConfig, layout: RunLayout) -> dict:
    """The eval stage: assemble the frontier (csv, plot), the training curves and the report from the
    results the eval_sft and eval_arms tasks wrote. No model is loaded: it needs no GPU."""
    if layout.is_done("eval"):
        return read_json(layout.done_path("eval"))
    started = time.time()
    policies = list_policies(cfg, layout)
    missing = [p.id for p in policies if not layout.eval_result(p.id).is_file()]
    if missing:
        raise RuntimeError(f"eval: no result for {len(missing)} polic(ies) ({', '.join(missing[:6])}"
                           f"{' ...' if len(missing) > 6 else ''}): their eval_sft / eval_arms task did not finish; "
                           "`launch.py resume` runs what is missing")
    results = []
    for policy in policies:
        result = read_json(layout.eval_result(policy.id))
        results.append({**result, **policy.identity()} if policy.kind != "sft" else result)
    atomic_write_text(layout.frontier_csv, frontier_csv(results))
    if several_seeds(results):
        atomic_write_text(layout.frontier_seeds_csv, seed_means_csv(seed_means(results)))
    plot_frontier(results, layout.frontier_png)
    from pipeline.curves import draw_training_curves

    atomic_write_text(layout.report, report_markdown(cfg, results, draw_training_curves(cfg, layout)))
    sft = results[0]
    finals = {arm.tag: max((r for r in results if r.get("arm") == arm.tag), key=lambda r: r["step"])
              for arm in sweep_arms(cfg)}
    metrics = {"sft/reward": sft["reward"], "sft/kl_noise_floor": sft["kl"],
               **{f"{r['policy']}/{tag}/reward": r["reward"] for tag, r in finals.items()},
               **{f"{r['policy']}/{tag}/kl": r["kl"] for tag, r in finals.items()},
               "policies": len(results)}
    return write_manifest(layout.done_path("eval"), config=to_dict(cfg), started=started,
                          inputs={"policies": [p.id for p in policies]}, metrics=metrics)
