"""Stage 4: sentiment reward vs KL to the reference for SFT and every DPO checkpoint.

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
from pipeline.progress import ProgressFile
from pipeline.methods import DEFAULT_METHOD, METHODS
from pipeline.registry import sweep_arms

# policy: sft or dpo (the stage that trained it); method/strength/seed identify a DPO row's arm
# (strength = beta, the column old readers use); appended, so the old columns keep their places.
FRONTIER_COLUMNS = ["policy", "beta", "step", "reward", "kl", "n", "reward_stderr", "kl_stderr",
                    "method", "strength", "seed"]
SEED_MEAN_COLUMNS = ["method", "strength", "step", "seeds", "reward", "reward_stderr", "kl", "kl_stderr"]


@dataclass
class Policy:
    id: str
    kind: str  # sft | dpo
    beta: float | None
    step: int
    path: Path
    method: str | None = None  # DPO policies: the arm's method, training seed and tag
    seed: int | None = None
    arm: str | None = None

    def identity(self) -> dict:
        """What a result records of its arm (results cached before it was recorded get it from here)."""
        return {"method": self.method, "seed": self.seed, "arm": self.arm}


def list_policies(cfg: PipelineConfig, layout: RunLayout) -> list[Policy]:
    """SFT, then for each arm every periodic checkpoint and the final model (deduplicated by step)."""
    from pipeline.training import complete_checkpoints, is_eval_checkpoint

    policies = [Policy("sft", "sft", None, 0, layout.sft_model)]
    for arm in sweep_arms(cfg):
        manifest = read_json(layout.done_path("dpo", arm))
        if manifest is None:
            raise RuntimeError(f"eval: DPO {arm.tag} is not finished ({layout.done_path('dpo', arm)} missing)")
        final_step = manifest["metrics"]["global_step"]
        identity = {"method": arm.method, "seed": arm.training_seed(cfg.seed), "arm": arm.tag}
        for step, path in complete_checkpoints(layout.checkpoints_dir("dpo", arm)):
            if step != final_step and is_eval_checkpoint(step, cfg.dpo.save_steps):
                policies.append(Policy(f"dpo-{arm.tag}-step{step}", "dpo", arm.beta, step, path, **identity))
        policies.append(Policy(f"dpo-{arm.tag}-step{final_step}", "dpo", arm.beta, final_step,
                               layout.final_model("dpo", arm), **identity))
    return policies


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


def method_of(result: dict) -> str | None:
    """A row's method: None for SFT; results written before methods existed were DPO."""
    return None if result["policy"] == "sft" else (result.get("method") or DEFAULT_METHOD)


def arm_label(method: str, strength: float) -> str:
    """'DPO β=0.1', 'IPO τ=0.5'."""
    spec = METHODS.get(method)
    return f"{spec.label} {spec.symbol}={strength:g}" if spec else f"{method} β={strength:g}"


def frontier_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FRONTIER_COLUMNS)
    for r in results:
        beta = "" if r["beta"] is None else r["beta"]
        seed = r.get("seed")
        writer.writerow([r["policy"], beta, r["step"], f"{r['reward']:.6f}", f"{r['kl']:.6f}", r["n"],
                         f"{reward_stderr(r):.6f}", f"{r['kl_stderr']:.6f}", method_of(r) or "", beta,
                         "" if seed is None else seed])
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
        groups.setdefault((method_of(r), r["beta"]), {}).setdefault(r["step"], []).append(r)
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
                         "reward_stderr": reward_se, "kl": kl, "kl_stderr": kl_se})
    return rows


def seed_means_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SEED_MEAN_COLUMNS)
    for r in rows:
        writer.writerow([r["method"], r["strength"], r["step"], r["seeds"], f"{r['reward']:.6f}",
                         f"{r['reward_stderr']:.6f}", f"{r['kl']:.6f}", f"{r['kl_stderr']:.6f}"])
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
    series = list(dict.fromkeys((r["method"], r["strength"]) for r in means))
    methods = list(dict.fromkeys(method for method, _ in series))
    colours = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors
    for index, (method, strength) in enumerate(series):
        points = [r for r in means if (r["method"], r["strength"]) == (method, strength)]
        seeds = max(r["seeds"] for r in points)
        marker = MARKERS[methods.index(method) % len(MARKERS)]
        errorbar(points, f"{marker}-", ms=4, color=colours[index % len(colours)],
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
    ax.legend(fontsize=7 if len(series) > 6 else None)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def report_markdown(cfg: PipelineConfig, results: list[dict], training_curves: list[tuple[str, str]] = ()) -> str:
    """The frontier table (policy = sft or the DPO row's method; a seed column when seeds vary), the
    means over seeds when there are several, the noise floor, training curves and samples."""
    seeded = several_seeds(results)
    lines = [f"# DPO reward vs KL — run `{cfg.name}`", "",
             f"Model `{cfg.model.name}`, reward `{cfg.reward.kind}`, {results[0]['n']} samples per policy "
             f"({cfg.eval.num_prompts} prompts × {cfg.eval.samples_per_prompt}).", "",
             "![frontier](frontier.png)", "",
             f"| policy | β |{' seed |' if seeded else ''} step | reward | KL | n |",
             f"|---|---|{'---|' if seeded else ''}---|---|---|---|"]
    for r in results:
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        seed = "" if r.get("seed") is None else r["seed"]
        kl = "n/a" if math.isnan(r["kl"]) else f"{r['kl']:.2f} ± {r['kl_stderr']:.2f}"
        lines.append(f"| {method_of(r) or r['policy']} | {beta} |{f' {seed} |' if seeded else ''} {r['step']} "
                     f"| {r['reward']:.3f} ± {reward_stderr(r):.3f} | {kl} | {r['n']} |")
    if seeded:
        lines += ["", "Mean over seeds (as plotted; ± one standard error over the seeds, `frontier_seeds.csv`):", "",
                  "| method | β | step | seeds | reward | KL |", "|---|---|---|---|---|---|"]
        for m in seed_means(results):
            kl = "n/a" if math.isnan(m["kl"]) else f"{m['kl']:.2f} ± {m['kl_stderr']:.2f}"
            lines.append(f"| {m['method']} | {m['strength']:g} | {m['step']} | {m['seeds']} "
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
    if training_curves:
        lines += ["## Training curves", "",
                  "From the trainer logs kept in the run directory (`sft/metrics.jsonl`, `dpo/<arm>/metrics.jsonl`).", ""]
        for title, png in training_curves:
            lines += [f"### {title}", "", f"![{title}]({png})", ""]
    lines += ["## Sample generations", ""]
    finals = [r for r in results if r["policy"] == "sft"]
    for arm in dict.fromkeys((method_of(r), r["beta"], r.get("seed")) for r in results if r["policy"] != "sft"):
        finals.append(max((r for r in results if (method_of(r), r["beta"], r.get("seed")) == arm),
                          key=lambda r: r["step"]))
    for r in finals:
        if r["policy"] == "sft":
            title = "SFT"
        else:
            method = METHODS.get(method_of(r))
            name = f"{method.label} {method.symbol}" if method else f"{method_of(r)} β"
            seed = f", seed {r['seed']}" if seeded else ""
            title = f"{name} = {r['beta']:g}{seed} (step {r['step']})"
        lines += [f"### {title}", ""]
        for ex in r["examples"]:
            lines += [f"**Prompt:** “{ex['prompt']}”  ", f"**Generation** (reward {ex['reward']:.2f}): "
                      f"“{ex['prompt']}{ex['completion']}”", ""]
    return "\n".join(lines) + "\n"


def run(cfg: PipelineConfig, layout: RunLayout) -> dict:
    if layout.is_done("eval"):
        return read_json(layout.done_path("eval"))
    started = time.time()
    from tqdm import tqdm

    from pipeline.models import (load_model, load_tokenizer, load_weights_into, resolve_device, resolve_dtype,
                                 setup_process)
    from pipeline.reward import make_reward

    setup_process(cfg)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.model, device)
    policies = list_policies(cfg, layout)
    prompts = [r["prompt"] for r in read_jsonl(layout.eval_prompts)]
    tokenizer = load_tokenizer(layout.sft_model)
    ref_model = load_model(layout.sft_model, device, dtype)
    reward = make_reward(cfg.reward, device)
    progress = ProgressFile(layout.progress_path("eval"))
    progress.start(sum(layout.eval_result(p.id).is_file() for p in policies))  # resumes per policy
    results = []
    policy_model = None  # one model for every DPO checkpoint, weights copied in (see load_weights_into)
    try:
        for index, policy in enumerate(tqdm(policies, desc="eval policies", mininterval=5)):
            interrupt.check(index, f"{index} of {len(policies)} policies evaluated")
            out = layout.eval_result(policy.id)
            result = read_json(out)
            if result is None:
                if policy.kind == "sft":
                    model = ref_model
                elif policy_model is None:
                    model = policy_model = load_model(policy.path, device, dtype)
                else:
                    load_weights_into(policy_model, policy.path)
                    model = policy_model
                partial = out.with_suffix(".partial")
                result = evaluate_policy(cfg, policy, model, ref_model, tokenizer, reward, prompts, partial)
                atomic_write_json(out, result)
                shutil.rmtree(partial, ignore_errors=True)
            results.append({**result, **policy.identity()} if policy.kind != "sft" else result)
            progress.update(step=index + 1, total_steps=len(policies))
    except interrupt.StageInterrupted as stop:  # saved per policy and per sampling batch; rerunning resumes
        progress.stopped(stop.reason, len(results))
        raise
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
               **{f"dpo/{tag}/reward": r["reward"] for tag, r in finals.items()},
               **{f"dpo/{tag}/kl": r["kl"] for tag, r in finals.items()},
               "policies": len(results)}
    progress.update(force=True, status="done")
    return write_manifest(layout.done_path("eval"), config=to_dict(cfg), started=started,
                          inputs={"policies": [p.id for p in policies]}, metrics=metrics)
