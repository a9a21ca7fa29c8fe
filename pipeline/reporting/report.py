"""report.md: the frontier table, the means over seeds, the noise floor, the training curves and
sample generations of each arm's final policy."""
from __future__ import annotations

import math

from pipeline.config import PipelineConfig
from pipeline.evaluation.policies import reward_stderr
from pipeline.reporting.frontier import is_best_of_n, method_of, seed_means, several_seeds, strength_of
from pipeline.training.methods import DEFAULT_METHOD, METHODS


def _fixed_or_tiny(value: float, decimals: int) -> str:
    """`value` with `decimals` decimals, or in scientific notation when those would show only zeros
    (the SFT noise floor, ~1e-7: `2.5e-07`, not `0.00`)."""
    if value != 0 and abs(value) < 0.5 * 10 ** -decimals:
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


def kl_cell(r: dict) -> str:
    """'1.50 ± 0.25'; 'n/a' when not measured; a tiny KL: '2.5e-07 ± 1.2e-07'; Best-of-N rows:
    '0.631 ± 0.001 (analytic 0.636)'."""
    if r.get("kl_analytic") is not None:  # 3 decimals: the measured and analytic values differ in the third
        return f"{r['kl']:.3f} ± {r['kl_stderr']:.3f} (analytic {r['kl_analytic']:.3f})"
    if math.isnan(r["kl"]):
        return "n/a"
    return f"{_fixed_or_tiny(r['kl'], 2)} ± {_fixed_or_tiny(r['kl_stderr'], 2)}"


def report_markdown(cfg: PipelineConfig, results: list[dict], training_curves: list[tuple[str, str]] = ()) -> str:
    """The frontier table (policy = sft or the DPO row's method; a seed column when seeds vary), the
    means over seeds when there are several, the noise floor, training curves and samples."""
    seeded = several_seeds(results)
    only_dpo = all(method_of(r) in (None, DEFAULT_METHOD) for r in results)
    title, strength_header = ("DPO reward vs KL", "β") if only_dpo else ("Reward vs KL", "strength")
    lines = [f"# {title} — run `{cfg.name}`", "",
             f"Model `{cfg.model.name}`, reward `{cfg.reward.kind}`, {results[0]['n']} samples per policy "
             f"({cfg.eval.num_prompts} prompts × {cfg.eval.samples_per_prompt})."
             + (f" No reward model: the reward column is the held-out preference accuracy over "
                f"{results[0].get('accuracy_pairs')} pairs (implicit reward margin > 0; a tie counts one half, so "
                "the SFT reference reads 0.5)." if cfg.reward.kind == "none" else ""), "",
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
                  "per prompt; `pipeline/evaluation/best_of_n.py`). n counts kept samples.", ""]
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
            scored = f" (reward {ex['reward']:.2f})" if ex.get("reward") is not None else ""
            lines += [f"**Prompt:** “{ex['prompt']}”  ", f"**Generation**{scored}: "
                      f"“{ex['prompt']}{ex['completion']}”", ""]
    return "\n".join(lines) + "\n"
