"""Evaluating one policy: sample completions of the eval prompts, score them with the run's reward,
and estimate KL(pi || pi_ref) to the SFT model, with standard errors.

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

A Best-of-N arm is not trained: for each prompt and each of its `samples_per_prompt` draws, N
completions are sampled from the SFT model (seeded per N and arm seed, saved per sampling batch like
the others) and the highest-reward one is kept; its reward is the mean over the kept ones. Its KL is
measured from the rewards of all the prompt's draws and also given analytically, log N - (N-1)/N
(exact for a continuous reward, an upper bound with ties): `pipeline.evaluation.best_of_n` derives both. It is
one series over N in the plot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.registry import Arm, sweep_arms
from pipeline.rundir.layout import RunLayout, read_json


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
    from pipeline.training.loop import complete_checkpoints, is_eval_checkpoint

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
                    partial_dir: Path, prompt_turns: dict | None = None, eval_pairs: list[dict] | None = None) -> dict:
    """One policy's reward (or, with `reward` None, its held-out preference accuracy on `eval_pairs`) and
    its KL to the reference, each with a standard error."""
    from pipeline.models.reward import score_in_batches
    from pipeline.evaluation.sampling import completion_logprobs, sample_resumable, sequence_kl

    ev = cfg.eval
    # saved per sampling batch: a stop inside a policy loses at most the batch in flight
    groups = sample_resumable(model, tokenizer, prompts, partial_dir, f"eval {policy.id}",
                              num_samples=ev.samples_per_prompt, max_new_tokens=ev.max_new_tokens,
                              temperature=ev.temperature, batch_size=ev.batch_size, seed=cfg.seed + 7,
                              kv_cache=ev.kv_cache, prompt_width=cfg.data.prompt_max_tokens)
    flat = [s for group in groups for s in group]
    rewards = None if reward is None else score_in_batches(
        reward, [s.prompt for s in flat], [s.completion for s in flat], cfg.reward.batch_size,
        turns=[prompt_turns[s.prompt] for s in flat] if prompt_turns else None)
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
    if rewards is None:  # reward.kind=none: the y-axis is held-out preference accuracy
        from pipeline.evaluation.accuracy import preference_accuracy

        acc = preference_accuracy(model, model if is_reference else ref_model, tokenizer, eval_pairs or [],
                                  ev.logprob_batch_size)
        y = {"reward": acc["accuracy"], "reward_std": math.sqrt(acc["accuracy"] * (1 - acc["accuracy"])),
             "reward_stderr": acc["accuracy_stderr"], "accuracy_pairs": acc["pairs"],
             "mean_margin": acc["mean_margin"]}
    else:
        mean_reward = sum(rewards) / n
        reward_std = (sum((r - mean_reward) ** 2 for r in rewards) / n) ** 0.5
        y = {"reward": mean_reward, "reward_std": reward_std,
             "reward_stderr": stderr_from_population_std(reward_std, n)}
    fixed = set(prompts[:len(cfg.eval.fixed_prompts)])  # eval prompts start with them (rendered for chat data)
    examples = [{"prompt": g[0].prompt, "completion": g[0].completion,
                 "reward": rewards[i * ev.samples_per_prompt] if rewards is not None else None}
                for i, g in enumerate(groups) if g[0].prompt in fixed]
    return {"policy": policy.kind, "id": policy.id, "beta": policy.beta, **policy.identity(), "step": policy.step,
            **y, "kl": kl,
            "kl_stderr": kl_stderr, "kl_tokenwise": kl_tokenwise, "sampler_mismatch": mismatch,
            "sampler_mismatch_stderr": mismatch_stderr, "n": n,
            "mean_completion_tokens": sum(len(s.completion_ids) for s in flat) / n, "examples": examples}


def evaluate_best_of_n(cfg: PipelineConfig, policy: Policy, sft_model, tokenizer, reward, prompts: list[str],
                       partial_dir: Path, prompt_turns: dict | None = None) -> dict:
    """A Best-of-N arm: per prompt `samples_per_prompt` groups of N SFT samples, the highest-reward one of
    each group kept. Reward: mean ± standard error over the kept samples. KL: `best_of_n.empirical_kl` of
    each prompt's S * N rewards, mean ± standard error over prompts; `kl_analytic` = log N - (N-1)/N."""
    from pipeline.evaluation.best_of_n import analytic_kl, empirical_kl, keep_best
    from pipeline.models.reward import score_in_batches
    from pipeline.evaluation.sampling import sample_resumable

    ev, n = cfg.eval, int(policy.strength)
    draws = ev.samples_per_prompt
    # saved per sampling batch: a stop inside the arm loses at most the batch in flight
    groups = sample_resumable(sft_model, tokenizer, prompts, partial_dir, f"eval {policy.id}",
                              num_samples=draws * n, max_new_tokens=ev.max_new_tokens,
                              temperature=ev.temperature, batch_size=ev.batch_size,
                              seed=best_of_n_seed(Arm(n, policy.method, policy.seed), cfg.seed),
                              kv_cache=ev.kv_cache, prompt_width=cfg.data.prompt_max_tokens)
    flat = [s for group in groups for s in group]
    rewards = score_in_batches(reward, [s.prompt for s in flat], [s.completion for s in flat], cfg.reward.batch_size,
                               turns=[prompt_turns[s.prompt] for s in flat] if prompt_turns else None)
    kept = keep_best(rewards, n)  # groups of n consecutive samples of one prompt (draws * n per prompt)
    kept_rewards = [rewards[i] for i in kept]
    per_prompt = [rewards[p * draws * n:(p + 1) * draws * n] for p in range(len(prompts))]
    kls = [empirical_kl(r, n) for r in per_prompt]
    count = len(kept)
    mean_reward = sum(kept_rewards) / count
    reward_std = (sum((r - mean_reward) ** 2 for r in kept_rewards) / count) ** 0.5
    kl = sum(kls) / len(kls)
    kl_stderr = stderr_from_population_std((sum((k - kl) ** 2 for k in kls) / len(kls)) ** 0.5, len(kls))
    fixed = set(prompts[:len(cfg.eval.fixed_prompts)])  # eval prompts start with them (rendered for chat data)
    examples = [{"prompt": flat[kept[p * draws]].prompt, "completion": flat[kept[p * draws]].completion,
                 "reward": kept_rewards[p * draws]} for p, prompt in enumerate(prompts) if prompt in fixed]
    return {"policy": policy.kind, "id": policy.id, "beta": None, **policy.identity(), "step": policy.step,
            "reward": mean_reward, "reward_std": reward_std,
            "reward_stderr": stderr_from_population_std(reward_std, count), "kl": kl, "kl_stderr": kl_stderr,
            "kl_analytic": analytic_kl(n), "kl_tokenwise": None, "sampler_mismatch": None,
            "sampler_mismatch_stderr": None, "n": count, "samples_drawn": len(flat),
            "mean_completion_tokens": sum(len(flat[i].completion_ids) for i in kept) / count, "examples": examples}
