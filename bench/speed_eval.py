"""speed.py's `eval` workload: one policy's evaluation through `pipeline.evaluation.policies.evaluate_policy`
(sampling + reward + KL) with the preset's eval settings, samples/s, and its projection to the sweep."""
from __future__ import annotations

import dataclasses
import math
import time

from bench.common import Rows, peak_gib, reset_peak, timed, timed_functions
from bench.speed_setup import Context, model_copy, prompts


def bench_eval(ctx: Context) -> list[dict]:
    import pipeline.evaluation.sampling as sampling
    from pipeline.models.reward import ClassifierReward
    from pipeline.registry import trained_arms
    from pipeline.evaluation.policies import Policy, evaluate_policy

    s, device = ctx.sizes, ctx.device
    reward_cfg = dataclasses.replace(ctx.cfg.reward, kind="classifier", model=str(ctx.classifier_dir))
    cfg = dataclasses.replace(ctx.cfg, reward=reward_cfg)
    prompt_list = prompts(s, s.eval_prompts, cfg, seed=5)
    n_samples = len(prompt_list) * cfg.eval.samples_per_prompt
    full_samples = cfg.eval.num_prompts * cfg.eval.samples_per_prompt
    steps = math.ceil(cfg.pairs.num_prompts * math.comb(cfg.pairs.completions_per_prompt, 2) / cfg.dpo.batch_size)
    n_policies = 1 + len(trained_arms(cfg)) * (len(range(cfg.dpo.save_steps, steps, cfg.dpo.save_steps)) + 1)
    rows = Rows("eval", "samples/s", device)
    settings = (f"evaluate_policy: {ctx.dtype_name(ctx.project_dtype)}, {len(prompt_list)} prompts x "
                f"{cfg.eval.samples_per_prompt} x {cfg.eval.max_new_tokens} tokens, batch {cfg.eval.batch_size}")
    with rows.variant("project", settings) as row:
        reset_peak(device)
        policy = model_copy(ctx.base, ctx.project_dtype, train=False)
        ref = model_copy(ctx.base, ctx.project_dtype, train=False)
        reward = ClassifierReward(cfg.reward, device)
        timed_reward = {}

        def reward_fn(texts):
            start = time.perf_counter()
            try:
                return reward(texts)
            finally:
                timed_reward["reward"] = timed_reward.get("reward", 0.0) + time.perf_counter() - start

        target = Policy(id="bench", kind="dpo", beta=cfg.dpo.betas[0], step=0, path=ctx.workdir)
        # warm-up at the measured shapes (static cache: compiled / graph-captured per shape on a GPU); each
        # call saves its sampling batches in its own new directory (one it found would be resumed from)
        evaluate_policy(cfg, target, policy, ref, ctx.tokenizer, reward,
                        prompt_list[:max(1, cfg.eval.batch_size // cfg.eval.samples_per_prompt)],
                        partial_dir=ctx.workdir / "eval-warmup")
        parts: dict[str, float] = {}
        # evaluate_policy and sample_resumable look these up in pipeline.evaluation.sampling at call time: timed ones
        with timed_functions(sampling, ["sample_completions", "completion_logprobs"], parts):
            result, seconds = timed(lambda: evaluate_policy(cfg, target, policy, ref, ctx.tokenizer, reward_fn,
                                                            prompt_list, partial_dir=ctx.workdir / "eval"), device)
        per_policy = seconds / n_samples * full_samples
        row.update(value=n_samples / seconds, mfu=None, vs_baseline=None, samples=n_samples, seconds=seconds,
                   sampling_s=parts.get("sample_completions"), kl_s=parts.get("completion_logprobs"),
                   reward_s=timed_reward.get("reward"), mean_completion_tokens=result["mean_completion_tokens"],
                   projected_s=per_policy, projected_what=f"one policy, {full_samples} samples "
                                                          f"(x{n_policies} policies = {per_policy * n_policies:.0f} s)",
                   policies_in_sweep=n_policies, peak_gib=peak_gib(device))
        policy = ref = reward = None
    return rows
