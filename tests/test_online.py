"""The online method (sweep.methods: rloo): TRL's RLOO on the run's own reward, as one sweep arm.

The analogue of the DPO paper's PPO-GT: the policy samples from the pair prompts, the ground-truth
reward (the classifier, VADER offline) scores prompt + completion, and the KL to the SFT model is
the penalty. Fast tests check what TRL is given; the slow one trains an arm and sees the reward rise.
"""
import json
import signal

import pytest

from conftest import clone_before_dpo, start_stage_job, wait_for_step
from jobs.config import resolve_config
from pipeline.registry import Arm, sweep_arms

ONLINE = ["sweep.methods=[dpo,rloo]", "sweep.strengths.rloo=[0.05]"]


def test_an_online_arm_reaches_trl_with_its_beta_sampling_and_seed(tmp_path):
    import torch

    from pipeline.stages.dpo import rloo_config
    from pipeline.training.loop import trainer_kwargs

    cfg = resolve_config("tiny", sets=[*ONLINE, "seed=3", "online.num_generations=8", "online.max_new_tokens=24",
                                       "online.learning_rate=1e-5"])
    arm = Arm(0.05, "rloo")
    assert arm in sweep_arms(cfg) and arm.key == "rloo:0.05"
    args = rloo_config(cfg, arm, trainer_kwargs(cfg, cfg.dpo, tmp_path, torch.device("cpu"), torch.float32, []))
    assert (args.beta, args.num_generations, args.max_completion_length) == (0.05, 8, 24)
    assert args.learning_rate == 1e-5 and (args.seed, args.data_seed) == (3, 3) and args.disable_dropout
    assert args.per_device_train_batch_size == cfg.dpo.batch_size and args.save_steps == cfg.dpo.save_steps


def test_the_online_reward_is_the_runs_reward_of_prompt_and_completion():
    from pipeline.models.reward import make_reward
    from pipeline.stages.dpo import reward_function

    cfg = resolve_config("tiny")
    reward = make_reward(cfg.reward)
    prompts, completions = ["This movie was", "I"], [" wonderful, I loved it.", " hated every awful minute."]
    scores = reward_function(reward)(prompts=prompts, completions=completions, completion_ids=None)
    assert scores == reward(["This movie was wonderful, I loved it.", "I hated every awful minute."])
    assert scores[0] > 0.8 > 0.2 > scores[1]


def test_an_online_batch_must_hold_whole_groups_of_completions():
    with pytest.raises(ValueError, match=r"dpo.batch_size: is 16; .*multiple of it"):
        resolve_config("tiny", sets=[*ONLINE, "online.num_generations=6"])
    resolve_config("tiny", sets=[*ONLINE, "online.num_generations=8"])  # 16 = 2 prompts x 8


@pytest.mark.slow
def test_the_online_arm_raises_the_configured_reward_and_resumes_where_it_stopped(tiny_run, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", sweep={"methods": ["rloo"], "strengths": {"rloo": [0.05]}},
                               online={"max_new_tokens": 40})
    arm_dir = run_dir / "dpo" / "rloo-beta-0.05"
    # stopped by a time-limit warning mid-training, it saves at that step and the next attempt resumes there
    proc = start_stage_job(run_dir, "dpo", "rloo:0.05")
    wait_for_step(arm_dir / "progress.json", 20, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped on request (timeout)" in out
    stopped_at = json.loads((arm_dir / "progress.json").read_text())["step"]
    proc = start_stage_job(run_dir, "dpo", "rloo:0.05")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    log = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [(r["step"], r["reward"]) for r in log if "reward" in r]
    # the only reward optimised is the run's (TRL logs one entry per reward function)
    assert all(r["rewards/sentiment/mean"] == r["reward"] for r in log if "reward" in r)
    assert log[0]["kl"] == 0.0  # the first step's policy is the SFT model, the KL reference
    first, last = rewards[0][1], sum(v for _, v in rewards[-3:]) / 3
    assert last > first + 0.1, rewards  # VADER reward rises (0.53 -> 0.78 in 50 steps when written)
    manifest = json.loads((arm_dir / "DONE.json").read_text())
    assert manifest["method"] == "rloo" and manifest["inputs"]["num_prompts"] == 200
    assert [(r["cause"], r["resumed_from_step"], r["step_before"]) for r in manifest["restarts"]] == [
        ("timeout", stopped_at, stopped_at)]
    steps = [r["step"] for r in log if "reward" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 50  # the resumed attempt's log continues, no step twice
    assert manifest["metrics"]["global_step"] == 200 // (16 // 4)  # 4 prompts (x 4 completions) per step
