"""Stage 4: sentiment reward vs KL to the reference for SFT and every DPO checkpoint.

Three stages (pipeline.registry), so eval scales out with the sweep:
- eval_sft (array, after sft): the SFT model itself (the reference row) and each Best-of-N arm;
- eval_arms (array, after dpo; on SLURM task i waits only for dpo task i, `aftercorr`): every eval
  checkpoint and the final model of one trained arm;
- eval (one small job, no GPU): assembles frontier.csv, frontier.png, the training curves and report.md
  from the per-policy results.

What a policy's evaluation measures: pipeline.evaluation.policies; the tables, plot and report:
pipeline.reporting.
"""
from __future__ import annotations

import shutil
import time

from pipeline.config import PipelineConfig
from pipeline.configlib import to_dict
from pipeline.evaluation.policies import (Policy, arm_policies, evaluate_best_of_n, evaluate_policy, list_policies,
                                          sft_policy)
from pipeline.models.reward import axis_label
from pipeline.registry import Arm, sweep_arms
from pipeline.reporting.frontier import frontier_csv, plot_frontier, seed_means, seed_means_csv, several_seeds
from pipeline.reporting.report import report_markdown
from pipeline.rundir.layout import RunLayout, atomic_write_json, atomic_write_text, read_json, read_jsonl, write_manifest
from pipeline.rundir.progress import ProgressFile
from pipeline.runtime import interrupt


def _evaluate(cfg: PipelineConfig, layout: RunLayout, stage_name: str, task, policies: list[Policy]) -> dict:
    """Evaluate `policies` (one eval task's) into eval/policies/<id>.json, resuming per policy and per
    sampling batch; the task's DONE.json lists them."""
    from pipeline.registry import get_stage

    stage = get_stage(stage_name)
    if stage.is_done(layout, task):
        return read_json(stage.done_path(layout, task))
    started = time.time()
    from pipeline.models.adapters import load_policy, load_policy_weights_into
    from pipeline.models.policy import load_model, load_tokenizer, resolve_device, resolve_dtype, setup_process
    from pipeline.models.reward import make_reward

    setup_process(cfg)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.model, device)
    shared = {}  # loaded on first use: a task whose results all exist (a requeue after the last one) loads nothing

    def needs() -> dict:
        if not shared:
            rows = read_jsonl(layout.eval_prompts)
            # chat data: each rendered prompt's turns, so that a reward model scores the conversation itself
            shared.update(prompts=[r["prompt"] for r in rows],
                          turns={r["prompt"]: r["turns"] for r in rows if "turns" in r} or None,
                          # reward.kind=none: held-out pairs, for preference accuracy instead of a reward
                          eval_pairs=read_jsonl(layout.eval_pairs) if cfg.reward.kind == "none" else None,
                          tokenizer=load_tokenizer(layout.sft_model, cfg.model.chat_template),
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
                    result = evaluate_best_of_n(cfg, policy, use["ref_model"], *common, prompt_turns=use["turns"])
                else:
                    if policy.kind == "sft":
                        model = use["ref_model"]
                    elif policy_model is None:  # a LoRA checkpoint: the SFT model + its adapter, merged
                        model = policy_model = load_policy(policy.path, layout.sft_model, device, dtype)
                    else:
                        load_policy_weights_into(policy_model, policy.path, layout.sft_model)
                        model = policy_model
                    result = evaluate_policy(cfg, policy, model, use["ref_model"], *common,
                                             prompt_turns=use["turns"], eval_pairs=use["eval_pairs"])
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
    plot_frontier(results, layout.frontier_png, axis_label(cfg.reward))
    from pipeline.reporting.curves import draw_training_curves

    from pipeline.reporting.cost import cost_markdown, cost_rows

    report = report_markdown(cfg, results, draw_training_curves(cfg, layout))
    atomic_write_text(layout.report, report + "\n" + cost_markdown(cost_rows(cfg, layout)))
    sft = results[0]
    finals = {arm.tag: max((r for r in results if r.get("arm") == arm.tag), key=lambda r: r["step"])
              for arm in sweep_arms(cfg)}
    metrics = {"sft/reward": sft["reward"], "sft/kl_noise_floor": sft["kl"],
               **{f"{r['policy']}/{tag}/reward": r["reward"] for tag, r in finals.items()},
               **{f"{r['policy']}/{tag}/kl": r["kl"] for tag, r in finals.items()},
               "policies": len(results)}
    return write_manifest(layout.done_path("eval"), config=to_dict(cfg), started=started,
                          inputs={"policies": [p.id for p in policies]}, metrics=metrics)
