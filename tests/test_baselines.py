"""The two baselines of the sweep: Preferred-FT trains only on the chosen completions; Best-of-N keeps the
highest-reward sample of each group of N, and its KL estimate and analytic value are what the derivation
in pipeline/evaluation/best_of_n.py says (continuous rewards: log N - (N-1)/N; tied rewards: below it)."""
import itertools
import math
import random

import pytest
import torch

from pipeline.evaluation.best_of_n import analytic_kl, empirical_kl, keep_best
from pipeline.config import PipelineConfig
from pipeline.configlib import from_dict
from pipeline.registry import Arm
from pipeline.models.reward import TextReward
from test_fast_paths import dpo_rows, grads, tiny_gpt2, word_tokenizer


# ------------------------------------------------------------------ Preferred-FT
def preferred_ft_loss(tmp_path, rows):
    """Loss and gradients of one full batch of `rows` under the project's trainer with the preferred_ft
    arm's TRL config (a fresh model with the same initial weights on every call)."""
    from datasets import Dataset

    from pipeline.training.batching import dpo_trainer_class
    from pipeline.stages.dpo import trl_config
    from pipeline.training.loop import trainer_kwargs

    cfg = from_dict(PipelineConfig, {"device": "cpu", "dpo": {"batch_size": len(rows), "max_length": 64},
                                     "sweep": {"methods": ["dpo", "preferred_ft"]}})
    args = trl_config(cfg, Arm(None, "preferred_ft"),
                      trainer_kwargs(cfg, cfg.dpo, tmp_path / "out", torch.device("cpu"), torch.float32, []))
    assert args.loss_type == ["sft"]
    model = tiny_gpt2(0)
    trainer = dpo_trainer_class()(model=model, ref_model=tiny_gpt2(1), args=args, processing_class=word_tokenizer(),
                                  train_dataset=Dataset.from_list(rows))
    loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    loss.backward()
    return loss.item(), grads(model), model


def plain_chosen_nll(model, rows) -> float:
    """Mean negative log-likelihood per token of the chosen completions (EOS included), one row at a time."""
    tokenizer = word_tokenizer()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            full = tokenizer(row["prompt"] + row["chosen"])["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([full])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]
            total, count = total - picked.sum().item(), count + len(picked)
    return total / count


def replace_words(text: str, rng: random.Random) -> str:
    """The same number of words (so the same number of tokens), other words."""
    return "".join(f" w{rng.randrange(1, 97)}" for _ in text.split())


def test_preferred_ft_trains_only_on_the_chosen_completions(tmp_path):
    rows = dpo_rows(6, seed=3)
    rng = random.Random(11)
    loss, grad, model = preferred_ft_loss(tmp_path / "a", rows)
    # its loss is the chosen completions' mean token NLL (TRL's 'sft' loss)
    assert loss == pytest.approx(plain_chosen_nll(model, rows), abs=1e-5)

    other_rejected = [{**r, "rejected": replace_words(r["rejected"], rng)} for r in rows]
    assert all(a["rejected"] != b["rejected"] for a, b in zip(rows, other_rejected))
    same_loss, same_grad, _ = preferred_ft_loss(tmp_path / "b", other_rejected)
    assert same_loss == loss  # bit for bit: same batch shapes, rejected rows never reach the loss
    assert grad.keys() == same_grad.keys() and all(torch.equal(grad[k], same_grad[k]) for k in grad)

    longer_rejected = [{**r, "rejected": r["rejected"] + " w5 w6 w7 w8 w9 w10 w11 w12 w13 w14"} for r in rows]
    wider_loss, wider_grad, _ = preferred_ft_loss(tmp_path / "c", longer_rejected)
    assert wider_loss == pytest.approx(loss, abs=1e-6)  # wider padded batch: same values up to float rounding
    assert max((grad[k] - wider_grad[k]).abs().max().item() for k in grad) < 1e-6

    other_chosen = [{**r, "chosen": replace_words(r["chosen"], rng)} for r in rows]
    changed_loss, changed_grad, _ = preferred_ft_loss(tmp_path / "d", other_chosen)
    assert abs(changed_loss - loss) > 1e-3
    assert max((grad[k] - changed_grad[k]).abs().max().item() for k in grad) > 1e-3


# ------------------------------------------------------------------ Best-of-N: selection
def test_keep_best_keeps_the_first_maximum_of_each_group():
    rewards = [0.1, 0.9, 0.3, 0.9,   0.5, 0.2, 0.7, 0.6,   0.0, 0.0, 0.0, 0.0]
    assert keep_best(rewards, 4) == [1, 6, 8]
    assert keep_best(rewards, 1) == list(range(12))
    with pytest.raises(ValueError, match="groups of 5"):
        keep_best(rewards, 5)


class LengthReward(TextReward):
    """A fake reward: the completion's length in characters / 1000, recording every text it scores."""

    def __init__(self, prompts):
        self.prompts, self.seen = prompts, []

    def __call__(self, texts):
        self.seen.extend(texts)
        out = []
        for text in texts:
            prompt = next(p for p in self.prompts if text.startswith(p))
            out.append(len(text) - len(prompt))
        return [v / 1000 for v in out]


def test_best_of_n_keeps_the_highest_reward_sample_of_each_group(tmp_path):
    from pipeline.evaluation.policies import Policy, evaluate_best_of_n

    n, draws = 4, 3
    fixed = "w1 w2"
    prompts = [fixed, "w3 w4 w5", "w6"]
    cfg = from_dict(PipelineConfig, {"device": "cpu", "seed": 2, "data": {"prompt_max_tokens": 4},
                                     "eval": {"num_prompts": 3, "samples_per_prompt": draws, "max_new_tokens": 12,
                                              "batch_size": 10, "fixed_prompts": [fixed], "kv_cache": "dynamic"},
                                     "sweep": {"methods": ["dpo", "best_of_n"]}})
    policy = Policy("best-of-n-4", "best_of_n", None, 0, tmp_path, method="best_of_n", seed=2, arm="best-of-n-4",
                    strength=n)
    model, tokenizer = tiny_gpt2(0).eval(), word_tokenizer()
    reward = LengthReward(prompts)
    result = evaluate_best_of_n(cfg, policy, model, tokenizer, reward, prompts, tmp_path / "partial")

    scored = [len(t) - len(next(p for p in prompts if t.startswith(p))) for t in reward.seen]
    assert len(scored) == len(prompts) * draws * n == result["samples_drawn"]
    groups = [scored[i:i + n] for i in range(0, len(scored), n)]
    assert len(set(scored)) > 3 and any(len(set(g)) > 1 for g in groups)  # the groups are not trivial
    kept = [max(g) / 1000 for g in groups]  # the highest reward of each group of N, nothing else
    assert result["n"] == len(groups) == len(prompts) * draws
    assert result["reward"] == pytest.approx(sum(kept) / len(kept), abs=1e-12)
    assert result["reward"] > sum(scored) / len(scored) / 1000  # better than a plain SFT sample
    assert result["examples"][0]["prompt"] == fixed and result["examples"][0]["reward"] == kept[0]
    assert len(result["examples"][0]["completion"]) == max(groups[0])
    per_prompt = [[v / 1000 for v in scored[p * draws * n:(p + 1) * draws * n]] for p in range(len(prompts))]
    assert result["kl"] == pytest.approx(sum(empirical_kl(r, n) for r in per_prompt) / len(prompts))
    assert result["kl_analytic"] == pytest.approx(math.log(4) - 0.75)
    assert (result["method"], result["strength"], result["seed"], result["step"], result["beta"]) == (
        "best_of_n", 4, 2, 0, None)

    # the samples were saved per batch: a rerun over the same partial directory draws nothing new
    again = evaluate_best_of_n(cfg, policy, model, tokenizer, LengthReward(prompts), prompts, tmp_path / "partial")
    assert again["reward"] == result["reward"] and again["kl"] == result["kl"]


# ------------------------------------------------------------------ Best-of-N: KL
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_analytic_kl_is_the_expected_log_density_ratio_of_best_of_n_on_a_continuous_reward(n):
    """Monte Carlo of the definition: rewards ~ U(0,1) (F(r) = r), the kept one is the max of N draws and
    log pi_N/pi_ref = log(N F^(N-1)); its mean over 100,000 groups is within 4 standard errors."""
    rng = random.Random(n)
    values = [math.log(n) + (n - 1) * math.log(max(rng.random() for _ in range(n))) for _ in range(100_000)]
    mean = sum(values) / len(values)
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    assert abs(mean - analytic_kl(n)) < 4 * stderr


@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_kl_estimate_approaches_the_analytic_value_on_a_continuous_reward(n):
    """Distinct rewards: the plug-in is the Best-of-N KL on L equally likely atoms, whatever the values
    (so there is no sampling noise: only L matters), below log N - (N-1)/N and rising to it with L."""
    rng = random.Random(0)
    estimates = {}
    for draws in (1, 4, 16, 250):
        rewards = [rng.random() for _ in range(draws * n)]
        estimates[draws] = empirical_kl(rewards, n)
        assert estimates[draws] == pytest.approx(empirical_kl(list(range(draws * n)), n), abs=1e-12)  # ranks only
    assert estimates[1] < estimates[4] < estimates[16] < estimates[250] < analytic_kl(n)
    # the tolerances are the discretisation gap, computed: at 16 draws it is 4.7e-4 (N=2), 1.8e-4 (N=4)
    # and 1.7e-4 (N=8) below the analytic value; at 250 draws (L = 500..2000) under 3e-6
    assert analytic_kl(n) - estimates[16] < 1e-3
    assert analytic_kl(n) - estimates[250] < 1e-5
    assert analytic_kl(4) - empirical_kl(list(range(16)), 4) == pytest.approx(0.0029, abs=1e-4)  # tiny-methods' L


def exact_discrete_kl(levels: list[float], probs: list[float], n: int) -> float:
    """KL(Best-of-n || reference) for a reward taking `levels` with `probs`, by enumerating every outcome
    of the n draws (the kept one is the first maximum): independent of the derivation's formula."""
    kept = [0.0] * len(levels)
    for outcome in itertools.product(range(len(levels)), repeat=n):
        weight = math.prod(probs[i] for i in outcome)
        kept[max(outcome, key=lambda i: levels[i])] += weight
    return sum(k * math.log(k / p) for k, p in zip(kept, probs) if k > 0)


def test_with_tied_rewards_the_estimate_finds_the_smaller_kl():
    levels, probs, n = [0.2, 0.5, 0.9], [0.3, 0.5, 0.2], 4
    exact = exact_discrete_kl(levels, probs, n)
    # the derivation's formula, for these atoms: sum (F^n - F-^n) log((F^n - F-^n) / p)
    cdf = [0.3, 0.8, 1.0]
    formula = sum((f ** n - g ** n) * math.log((f ** n - g ** n) / p) for f, g, p in zip(cdf, [0, 0.3, 0.8], probs))
    assert formula == pytest.approx(exact, abs=1e-12)
    assert exact < analytic_kl(n) - 0.1  # ties: the analytic value (0.636) is only an upper bound (0.522)
    # exact population proportions give the exact value; 40,000 draws come within 0.01 (the estimate's
    # standard deviation over 20 repetitions at this size was 0.0014: 0.01 is seven of those)
    assert empirical_kl([0.2] * 3 + [0.5] * 5 + [0.9] * 2, n) == pytest.approx(exact, abs=1e-12)
    rng = random.Random(5)
    draws = rng.choices(levels, probs, k=40_000)
    assert empirical_kl(draws, n) == pytest.approx(exact, abs=0.01)


def test_best_of_n_sampling_seeds_never_collide():
    """Every (N, seed) arm samples with its own seed, never the SFT row's (run seed + 7), for any seeds
    (a formula linear in N and seed repeated itself once seeds grew past its multiplier)."""
    from pipeline.evaluation.policies import best_of_n_seed

    run_seed = 9000
    seeds = {(n, s): best_of_n_seed(Arm(n, "best_of_n", s), run_seed) for n in range(2, 65) for s in range(0, 9000, 7)}
    seeds[(4, None)] = best_of_n_seed(Arm(4, "best_of_n"), run_seed)  # the run's own seed (9000, not listed)
    assert len(set(seeds.values())) == len(seeds) == 63 * len(range(0, 9000, 7)) + 1
    assert run_seed + 7 not in seeds.values() and all(0 < v < 2 ** 63 // 100003 for v in seeds.values())
