"""Stage 4: sentiment reward vs KL to the reference for SFT and every DPO checkpoint.

For each policy: sample `samples_per_prompt` completions per eval prompt, score them, and estimate
KL(pi || pi_ref) = E_{y~pi}[sum_t log pi(y_t|.) - log pi_ref(y_t|.)] with pi_ref = the SFT model.
Each policy's result is its own file, so a restarted eval resumes per checkpoint.
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
from pipeline.registry import dpo_arms

FRONTIER_COLUMNS = ["policy", "beta", "step", "reward", "kl", "n"]


@dataclass
class Policy:
    id: str
    kind: str  # sft | dpo
    beta: float | None
    step: int
    path: Path


def list_policies(cfg: PipelineConfig, layout: RunLayout) -> list[Policy]:
    """SFT, then for each arm every periodic checkpoint and the final model (deduplicated by step)."""
    from pipeline.training import complete_checkpoints, is_eval_checkpoint

    policies = [Policy("sft", "sft", None, 0, layout.sft_model)]
    for arm in dpo_arms(cfg):
        manifest = read_json(layout.done_path("dpo", arm))
        if manifest is None:
            raise RuntimeError(f"eval: DPO {arm.tag} is not finished ({layout.done_path('dpo', arm)} missing)")
        final_step = manifest["metrics"]["global_step"]
        for step, path in complete_checkpoints(layout.checkpoints_dir("dpo", arm)):
            if step != final_step and is_eval_checkpoint(step, cfg.dpo.save_steps):
                policies.append(Policy(f"dpo-{arm.tag}-step{step}", "dpo", arm.beta, step, path))
        policies.append(Policy(f"dpo-{arm.tag}-step{final_step}", "dpo", arm.beta, final_step,
                               layout.final_model("dpo", arm)))
    return policies


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
    if ref_model is None:  # the SFT policy is its own reference
        kl = kl_tokenwise = kl_stderr = 0.0
    else:
        lp = completion_logprobs(model, flat, tokenizer.pad_token_id, temperature=ev.temperature,
                                 batch_size=ev.logprob_batch_size, ref_model=ref_model)
        diff = lp["logp"] - lp["ref_logp"]
        kl = sequence_kl(lp["logp"], lp["ref_logp"])
        kl_stderr = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        kl_tokenwise = float(lp["kl_tokenwise"].mean())
    n = len(flat)
    mean_reward = sum(rewards) / n
    fixed = set(cfg.eval.fixed_prompts)
    examples = [{"prompt": g[0].prompt, "completion": g[0].completion, "reward": rewards[i * ev.samples_per_prompt]}
                for i, g in enumerate(groups) if g[0].prompt in fixed]
    return {"policy": policy.kind, "id": policy.id, "beta": policy.beta, "step": policy.step, "reward": mean_reward,
            "reward_std": (sum((r - mean_reward) ** 2 for r in rewards) / n) ** 0.5, "kl": kl,
            "kl_stderr": kl_stderr, "kl_tokenwise": kl_tokenwise, "n": n,
            "mean_completion_tokens": sum(len(s.completion_ids) for s in flat) / n, "examples": examples}


def frontier_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FRONTIER_COLUMNS)
    for r in results:
        writer.writerow([r["policy"], "" if r["beta"] is None else r["beta"], r["step"], f"{r['reward']:.6f}",
                         f"{r['kl']:.6f}", r["n"]])
    return buffer.getvalue()


def plot_frontier(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for beta in sorted({r["beta"] for r in results if r["policy"] == "dpo"}):
        points = sorted((r for r in results if r["beta"] == beta), key=lambda r: r["step"])
        ax.plot([r["kl"] for r in points], [r["reward"] for r in points], "o-", ms=4, label=f"DPO β={beta:g}")
    sft = next(r for r in results if r["policy"] == "sft")
    ax.plot([sft["kl"]], [sft["reward"]], "k*", ms=14, label="SFT (reference)")
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel("mean sentiment reward P(positive)")
    ax.set_title("Reward vs KL: SFT and every DPO checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def report_markdown(cfg: PipelineConfig, results: list[dict]) -> str:
    lines = [f"# DPO reward vs KL — run `{cfg.name}`", "",
             f"Model `{cfg.model.name}`, reward `{cfg.reward.kind}`, {results[0]['n']} samples per policy "
             f"({cfg.eval.num_prompts} prompts × {cfg.eval.samples_per_prompt}).", "",
             "![frontier](frontier.png)", "",
             "| policy | β | step | reward | KL | n |", "|---|---|---|---|---|---|"]
    for r in results:
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(f"| {r['policy']} | {beta} | {r['step']} | {r['reward']:.3f} | {r['kl']:.2f} | {r['n']} |")
    lines += ["", "## Sample generations", ""]
    finals = [r for r in results if r["policy"] == "sft"]
    for beta in sorted({r["beta"] for r in results if r["policy"] == "dpo"}):
        finals.append(max((r for r in results if r["beta"] == beta), key=lambda r: r["step"]))
    for r in finals:
        title = "SFT" if r["policy"] == "sft" else f"DPO β = {r['beta']:g} (step {r['step']})"
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
                result = evaluate_policy(cfg, policy, model, None if policy.kind == "sft" else ref_model,
                                         tokenizer, reward, prompts, partial)
                atomic_write_json(out, result)
                shutil.rmtree(partial, ignore_errors=True)
            results.append(result)
            progress.update(step=index + 1, total_steps=len(policies))
    except interrupt.StageInterrupted as stop:  # saved per policy and per sampling batch; rerunning resumes
        progress.stopped(stop.reason, len(results))
        raise
    atomic_write_text(layout.frontier_csv, frontier_csv(results))
    plot_frontier(results, layout.frontier_png)
    atomic_write_text(layout.report, report_markdown(cfg, results))
    sft = results[0]
    finals = {arm.tag: max((r for r in results if r["beta"] == arm.beta), key=lambda r: r["step"])
              for arm in dpo_arms(cfg)}
    metrics = {"sft/reward": sft["reward"],
               **{f"dpo/{tag}/reward": r["reward"] for tag, r in finals.items()},
               **{f"dpo/{tag}/kl": r["kl"] for tag, r in finals.items()},
               "policies": len(results)}
    progress.update(force=True, status="done")
    return write_manifest(layout.done_path("eval"), config=to_dict(cfg), started=started,
                          inputs={"policies": [p.id for p in policies]}, metrics=metrics)
