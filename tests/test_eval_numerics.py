"""Eval numerics (issue #13): KL log-probs in float32 with bf16 models, the SFT noise floor, standard errors.

The KL test measures, on a tiny GPT-2 whose logits have GPT-2's magnitude, how far the bf16 KL
estimates are from the float32 one, for the eval's path (float32 lm_head and log-softmax) and for
the previous one (bf16 logits, upcast afterwards). The noise-floor tests measure KL(sampler || scorer)
of one model: the sampler's own log-probabilities of what it drew (KV cache, model dtype) against
the eval's scores of the same completions, in float32 (~0) and in bf16 (clearly above).
`pytest -s` prints the measured gaps and floors.
"""
import copy
import csv
import io
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.config import EvalConfig
from pipeline.rundir.layout import atomic_write_jsonl
from pipeline.evaluation.sampling import _padded_batch, completion_logprobs, sample_completions, sample_resumable, sequence_kl
from pipeline.models.reward import TextReward
from pipeline.reporting.frontier import FRONTIER_COLUMNS, frontier_csv, plot_frontier, seed_means, seed_means_csv
from pipeline.evaluation.policies import Policy, evaluate_policy, reward_stderr
from pipeline.reporting.report import report_markdown

VOCAB = 512
EOS = VOCAB - 1
PROMPTS, SAMPLES_PER_PROMPT, BATCHES, NEW_TOKENS = 64, 4, 4, 24


class CodepointTokenizer:
    """Token i <-> one CJK character; enough of the tokenizer API for the sampler."""
    eos_token_id = pad_token_id = EOS
    first = 0x4E00

    def __call__(self, text):
        return {"input_ids": [ord(c) - self.first for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(self.first + i) for i in ids if not (skip_special_tokens and i == EOS))


def gpt2_scale_reference() -> GPT2LMHeadModel:
    """A 2-layer GPT-2 whose logits look like GPT-2's: about -60 to -110, a few nats of spread.

    GPT-2's final hidden state has a large constant-like direction that puts every logit near -80;
    here ln_f's bias on one dimension and a shared lm_head column do the same. That common offset
    cancels in the softmax, but in bf16 (8 significant bits) the logits are rounded to steps of
    0.25-0.5 first, the error the float32 head avoids."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False,
                        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 10.0
        model.lm_head.weight.normal_(0.0, 0.3)  # the spread between tokens: std ~2.4 nats
        model.lm_head.weight[:, 0] = -8.0  # the common offset: 10 * -8 = -80
    return model


def nearby_policy(reference: GPT2LMHeadModel, noise: float) -> GPT2LMHeadModel:
    """The reference with its transformer weights jittered: a small but nonzero true KL."""
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in policy.transformer.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * noise)
    return policy


@torch.no_grad()
def bf16_logits_logprobs(model, ref_model, samples) -> dict[str, torch.Tensor]:
    """The previous completion_logprobs: logits from the model in its own dtype, upcast afterwards."""
    ids, mask, positions, completion_mask = _padded_batch(samples, EOS, "cpu")
    target, weight = ids[:, 1:], completion_mask[:, 1:].double()

    def token_logprobs(m):
        logits = m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    logprobs, ref_logprobs = token_logprobs(model), token_logprobs(ref_model)
    picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
    ref_picked = ref_logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
    step_kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1).double()
    return {"logp": (picked * weight).sum(-1), "ref_logp": (ref_picked * weight).sum(-1),
            "kl_tokenwise": (step_kl * weight).sum(-1)}


def rms(values: torch.Tensor) -> float:
    return float(values.pow(2).mean().sqrt())


def test_float32_head_keeps_bf16_kl_close_to_the_float32_kl():
    reference = gpt2_scale_reference()
    policy = nearby_policy(reference, noise=3e-4)
    tokenizer = CodepointTokenizer()
    torch.manual_seed(2)
    prompts = [tokenizer.decode(torch.randint(0, EOS, (8,)).tolist()) for _ in range(PROMPTS)]
    samples = [s for group in sample_completions(policy, tokenizer, prompts, num_samples=SAMPLES_PER_PROMPT,
                                                 max_new_tokens=NEW_TOKENS, batch_size=128, seed=0)
               for s in group]
    with torch.no_grad():
        logits = policy(torch.tensor([samples[0].prompt_ids + samples[0].completion_ids])).logits
    assert logits.max() < -40 and logits.min() > -150  # GPT-2's range, where bf16 steps are 0.25-0.5

    truth = completion_logprobs(policy, samples, EOS, ref_model=reference, batch_size=128)
    policy_bf16, reference_bf16 = copy.deepcopy(policy).bfloat16(), copy.deepcopy(reference).bfloat16()
    float32_head = completion_logprobs(policy_bf16, samples, EOS, ref_model=reference_bf16, batch_size=128)
    bf16_logits = bf16_logits_logprobs(policy_bf16, reference_bf16, samples)

    true_ratio = truth["logp"] - truth["ref_logp"]
    n = len(samples)
    kl, kl_stderr = sequence_kl(truth["logp"], truth["ref_logp"]), float(true_ratio.std()) / math.sqrt(n)
    print(f"\ntrue KL (float32 models, {n} completions of <= {NEW_TOKENS} tokens): {kl:.4f} ± {kl_stderr:.4f} "
          f"nats/sequence, tokenwise {float(truth['kl_tokenwise'].mean()):.4f}")
    errors = {}
    for name, lp in (("bf16 + float32 head", float32_head), ("bf16 logits", bf16_logits)):
        ratio_error = (lp["logp"] - lp["ref_logp"]) - true_ratio
        batch_gaps = ratio_error.view(BATCHES, -1).mean(-1)  # each batch's KL estimate minus the true one
        errors[name] = {"sequence": rms(ratio_error), "batch_kl": rms(batch_gaps),
                        "pooled_kl": abs(float(ratio_error.mean())),
                        "tokenwise_kl": abs(float((lp["kl_tokenwise"] - truth["kl_tokenwise"]).mean()))}
        print(f"{name:>20}: KL {sequence_kl(lp['logp'], lp['ref_logp']):.4f} (gap {errors[name]['pooled_kl']:.4f}); "
              f"per-batch KL gaps (batches of {n // BATCHES}) {[round(float(g), 4) for g in batch_gaps]}, "
              f"rms {errors[name]['batch_kl']:.4f}; per-sequence log-ratio error rms {errors[name]['sequence']:.4f}; "
              f"tokenwise KL gap {errors[name]['tokenwise_kl']:.4f}; "
              f"policy log-prob error mean {float((lp['logp'] - truth['logp']).mean()):+.4f}")
    new, old = errors["bf16 + float32 head"], errors["bf16 logits"]
    assert new["sequence"] * 4 < old["sequence"], errors  # every sequence's log pi/pi_ref
    assert new["batch_kl"] * 2 < old["batch_kl"], errors  # the KL estimates themselves
    assert new["tokenwise_kl"] * 4 < old["tokenwise_kl"], errors  # bf16 logits bias the per-step KL upwards
    assert new["batch_kl"] < kl_stderr * math.sqrt(BATCHES) / 2, errors  # well inside a batch's sampling error


def test_float32_head_equals_the_models_logits_for_a_float32_model():
    reference = gpt2_scale_reference()
    policy = nearby_policy(reference, noise=3e-4)
    tokenizer = CodepointTokenizer()
    samples = sample_completions(policy, tokenizer, [tokenizer.decode([5, 6, 7]), tokenizer.decode([9])],
                                 num_samples=3, max_new_tokens=6, seed=3)
    samples = [s for group in samples for s in group]
    head = completion_logprobs(policy, samples, EOS, ref_model=reference)
    logits = bf16_logits_logprobs(policy, reference, samples)  # float32 models: the plain logits path
    for key in ("logp", "ref_logp", "kl_tokenwise"):
        assert torch.allclose(head[key], logits[key], atol=1e-3), key


def eos_prone(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """EOS about 10x likelier than a typical token: completions end at different steps, so the
    sampler runs on past them (padding) and the recorded log-probs must stop where the scorer stops."""
    with torch.no_grad():
        model.lm_head.weight[EOS, 0] = -7.7  # logit +3 above the common offset
    return model


def noise_floor(model, prompts: list[str], **kwargs) -> tuple[float, float, torch.Tensor, list]:
    """KL(sampler || scorer) of one model: mean and standard error of sampler_logp - completion_logprobs."""
    samples = [s for group in sample_completions(model, CodepointTokenizer(), prompts, num_samples=SAMPLES_PER_PROMPT,
                                                 max_new_tokens=NEW_TOKENS, batch_size=128, seed=0, **kwargs)
               for s in group]
    scored = completion_logprobs(model, samples, EOS, batch_size=128)["logp"]
    diff = torch.tensor([s.sampler_logp for s in samples], dtype=torch.float64) - scored
    return float(diff.mean()), float(diff.std()) / math.sqrt(len(diff)), diff, samples


def random_prompts(count: int) -> list[str]:
    generator = torch.Generator().manual_seed(2)
    return [CodepointTokenizer().decode(torch.randint(0, EOS, (int(torch.randint(2, 9, (), generator=generator)),),
                                                      generator=generator).tolist()) for _ in range(count)]


def test_float32_sampler_logprobs_equal_the_scorers():
    """(a) float32, dynamic cache: what the sampler drew from is what the eval scores, per sequence."""
    model = eos_prone(gpt2_scale_reference())
    floor, stderr, diff, samples = noise_floor(model, random_prompts(PROMPTS))
    lengths = [len(s.completion_ids) for s in samples]
    assert 0.2 * len(samples) < sum(s.completion_ids[-1] == EOS for s in samples) < 0.8 * len(samples)
    assert min(lengths) < NEW_TOKENS // 2 and max(lengths) == NEW_TOKENS  # padding after EOS inside a batch
    print(f"\nnoise floor, float32 (dynamic cache): {floor:.3g} ± {stderr:.3g} nats/sequence; "
          f"max |sampler - scorer| {float(diff.abs().max()):.3g} per sequence")
    assert float(diff.abs().max()) < 1e-4, diff
    assert abs(floor) < 1e-5


def test_bf16_noise_floor_is_measurably_above_the_float32_floor():
    """(b) the same model in bf16: bf16 logits and KV-cache decoding vs the float32-head scorer."""
    model = eos_prone(gpt2_scale_reference())
    prompts = random_prompts(2 * PROMPTS)
    float32_floor, float32_stderr, _, _ = noise_floor(model, prompts)
    bf16 = copy.deepcopy(model).bfloat16()
    bf16_floor, bf16_stderr, bf16_diff, _ = noise_floor(bf16, prompts)
    static_floor, static_stderr, _, _ = noise_floor(bf16, prompts, kv_cache="static", prompt_width=8)
    print(f"\nnoise floor KL(sampler || scorer), {len(bf16_diff)} completions of <= {NEW_TOKENS} tokens: "
          f"float32 {float32_floor:.3g} ± {float32_stderr:.3g}; bf16 {bf16_floor:.3g} ± {bf16_stderr:.3g} "
          f"(static cache {static_floor:.3g} ± {static_stderr:.3g}) nats/sequence; bf16 per-sequence "
          f"|sampler - scorer| rms {rms(bf16_diff):.3g}")
    assert bf16_floor > 3 * bf16_stderr and static_floor > 3 * static_stderr
    assert bf16_floor > 1000 * max(abs(float32_floor), float32_stderr)


def eval_config(samples_per_prompt: int = 4):
    """The fields evaluate_policy and report_markdown read."""
    return SimpleNamespace(name="numerics", seed=0, model=SimpleNamespace(name="tiny-gpt2"),
                           data=SimpleNamespace(prompt_max_tokens=8),
                           reward=SimpleNamespace(kind="stub", batch_size=16),
                           eval=EvalConfig(num_prompts=2, samples_per_prompt=samples_per_prompt, max_new_tokens=6,
                                           batch_size=8, logprob_batch_size=8, fixed_prompts=[]))


class LengthReward(TextReward):
    def __call__(self, texts):
        return [min(len(t), 20) / 20 for t in texts]


length_reward = LengthReward()


def test_sft_row_kl_is_the_sampler_vs_scorer_floor(tmp_path, monkeypatch):
    """The SFT row's KL is sampler_logp - scored log pi_sft, not the SFT model scored against itself
    (0 by construction); a DPO row keeps policy vs reference and also stores its sampler mismatch."""
    import pipeline.evaluation.sampling as sampling

    reference = gpt2_scale_reference()
    tokenizer = CodepointTokenizer()
    prompts = [tokenizer.decode([5, 6, 7]), tokenizer.decode([9, 10])]
    cfg = eval_config()
    scored, drawn = [], []

    def recording_logprobs(model, samples, pad_id, **kwargs):
        result = completion_logprobs(model, samples, pad_id, **kwargs)
        scored.append((model, kwargs["ref_model"], result["logp"]))
        drawn.append(torch.tensor([s.sampler_logp for s in samples], dtype=torch.float64))
        return result

    monkeypatch.setattr(sampling, "completion_logprobs", recording_logprobs)  # evaluate_policy looks it up per call
    sft = evaluate_policy(cfg, Policy("sft", "sft", None, 0, tmp_path), reference, reference, tokenizer,
                          length_reward, prompts, tmp_path / "sft.partial")
    assert [(model, ref) for model, ref, _ in scored] == [(reference, None)]  # the reference is scored once
    diff = drawn[0] - scored[0][2]
    assert sft["kl"] == pytest.approx(float(diff.mean()), abs=1e-12) == sft["sampler_mismatch"]
    assert sft["kl_stderr"] == pytest.approx(float(diff.std()) / math.sqrt(8), abs=1e-12)
    assert 0 < sft["kl_stderr"] < 1e-4 and abs(sft["kl"]) < 1e-4  # float32: sampler and scorer agree
    assert sft["kl_tokenwise"] is None
    assert sft["n"] == 8 and sft["reward_stderr"] == pytest.approx(sft["reward_std"] / math.sqrt(8 - 1))
    print(f"\nSFT noise floor (float32): KL {sft['kl']:.3g} ± {sft['kl_stderr']:.3g}")
    policy = nearby_policy(reference, noise=3e-2)
    dpo = evaluate_policy(cfg, Policy("dpo", "dpo", 0.1, 5, tmp_path), policy, reference, tokenizer,
                          length_reward, prompts, tmp_path / "dpo.partial")
    assert scored[1][:2] == (policy, reference)
    assert dpo["kl"] > 10 * max(abs(sft["kl"]), 1e-6) and dpo["kl_tokenwise"] > 0
    assert dpo["sampler_mismatch"] == pytest.approx(float((drawn[1] - scored[1][2]).mean()), abs=1e-12)
    assert abs(dpo["sampler_mismatch"]) < 1e-4 and dpo["sampler_mismatch_stderr"] > 0


def test_samples_saved_without_sampler_logp_load_and_leave_the_floor_unmeasured(tmp_path):
    """(c) a partial batch written before sampler_logp existed loads (None); a row sampled from it
    has kl = NaN for SFT (sampler_mismatch = NaN for DPO), shown as "n/a" / "not measured"."""
    reference = gpt2_scale_reference()
    tokenizer = CodepointTokenizer()
    prompts = [tokenizer.decode([5, 6, 7]), tokenizer.decode([9, 10])]
    cfg = eval_config()
    policy = nearby_policy(reference, noise=3e-2)
    for name, model in (("sft", reference), ("dpo", policy)):  # eval's batch 0, in the old format: no sampler_logp
        fresh = sample_completions(model, tokenizer, prompts, num_samples=4, max_new_tokens=6, batch_size=8,
                                   seed=cfg.seed + 7)
        atomic_write_jsonl(tmp_path / f"{name}.partial" / "batch-00000.jsonl",
                           [{"prompt": s.prompt, "completion": s.completion, "prompt_ids": s.prompt_ids,
                             "completion_ids": s.completion_ids} for group in fresh for s in group])
    restored = sample_resumable(policy, tokenizer, prompts, tmp_path / "dpo.partial", "test", num_samples=4,
                                max_new_tokens=6, batch_size=8, seed=cfg.seed + 7)
    assert [[s.completion_ids for s in g] for g in restored] == [[s.completion_ids for s in g] for g in fresh]
    assert all(s.sampler_logp is None for g in restored for s in g)
    assert all(s.sampler_logp is not None for g in fresh for s in g)

    sft = evaluate_policy(cfg, Policy("sft", "sft", None, 0, tmp_path), reference, reference, tokenizer,
                          length_reward, prompts, tmp_path / "sft.partial")
    assert math.isnan(sft["kl"]) and math.isnan(sft["kl_stderr"]) and sft["n"] == 8
    dpo = evaluate_policy(cfg, Policy("dpo", "dpo", 0.1, 5, tmp_path), policy, reference, tokenizer,
                          length_reward, prompts, tmp_path / "dpo.partial")
    assert dpo["kl"] > 0 and math.isnan(dpo["sampler_mismatch"])  # the DPO KL does not need the sampler's values
    report = report_markdown(cfg, [sft, dpo])
    assert "| sft |  | 0 | " in report and "| n/a | 8 |" in report and "not measured" in report
    assert list(csv.DictReader(io.StringIO(frontier_csv([sft, dpo]))))[0]["kl"] == "nan"
    plot_frontier([sft, dpo], tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_carries_standard_errors_also_for_results_cached_without_them(tmp_path):
    rewards = [0.2, 0.9, 0.4, 0.7]
    mean = sum(rewards) / len(rewards)
    population_std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    expected_reward_stderr = float(torch.tensor(rewards).std()) / math.sqrt(len(rewards))  # sample std / sqrt(n)
    cached_sft = {"policy": "sft", "id": "sft", "beta": None, "step": 0, "reward": mean, "reward_std": population_std,
                  "kl": 0.0, "kl_stderr": 0.0, "kl_tokenwise": 0.0, "n": 4, "examples": []}  # no reward_stderr
    dpo = {"policy": "dpo", "id": "dpo-b0.1-step5", "beta": 0.1, "step": 5, "reward": 0.8, "reward_std": 0.1,
           "reward_stderr": 0.05, "kl": 1.5, "kl_stderr": 0.25, "kl_tokenwise": 1.4, "n": 4, "examples": []}
    assert reward_stderr(cached_sft) == pytest.approx(expected_reward_stderr)

    rows = list(csv.DictReader(io.StringIO(frontier_csv([cached_sft, dpo]))))
    assert FRONTIER_COLUMNS[:6] == ["policy", "beta", "step", "reward", "kl", "n"]  # old columns first, in order
    assert FRONTIER_COLUMNS[6:8] == ["reward_stderr", "kl_stderr"]  # then the arm's method, strength, seed
    assert list(rows[0]) == FRONTIER_COLUMNS and rows[1]["method"] == "dpo" and rows[1]["strength"] == "0.1"
    assert float(rows[0]["reward_stderr"]) == pytest.approx(expected_reward_stderr, abs=1e-6)
    assert (float(rows[1]["reward_stderr"]), float(rows[1]["kl_stderr"])) == (0.05, 0.25)

    report = report_markdown(eval_config(), [cached_sft, dpo])
    assert "| dpo | 0.1 | 5 | 0.800 ± 0.050 | 1.50 ± 0.25 | 4 |" in report
    assert "noise floor" in report.lower()
    plot_frontier([cached_sft, dpo], tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_noise_floor_and_standard_errors_keep_their_digits():
    """frontier.csv and frontier_seeds.csv write six significant digits, so the SFT noise floor (~1e-7 in
    float32) and small standard errors do not read 0.000000; report.md shows such a floor in scientific notation."""
    sft = {"policy": "sft", "id": "sft", "beta": None, "step": 0, "reward": 0.512345678, "reward_std": 0.1,
           "reward_stderr": 0.0123456, "kl": 2.5374e-07, "kl_stderr": 1.2189e-07, "kl_tokenwise": 0.0, "n": 4,
           "examples": []}
    dpo = {"policy": "dpo", "id": "dpo-b0.1-step5", "beta": 0.1, "step": 5, "reward": 0.8, "reward_std": 0.1,
           "reward_stderr": 0.05, "kl": 12.3456789, "kl_stderr": 0.000031415, "kl_tokenwise": 1.4, "n": 4,
           "examples": [], "seed": 0}
    rows = list(csv.DictReader(io.StringIO(frontier_csv([sft, dpo]))))
    assert (rows[0]["reward"], rows[0]["reward_stderr"], rows[0]["kl"], rows[0]["kl_stderr"]) == (
        "0.512346", "0.0123456", "2.5374e-07", "1.2189e-07")
    assert float(rows[0]["kl"]) == 2.5374e-07  # read back exactly
    assert (rows[1]["kl"], rows[1]["kl_stderr"]) == ("12.3457", "3.1415e-05")
    means = list(csv.DictReader(io.StringIO(seed_means_csv(seed_means([sft, dpo])))))
    assert (means[0]["kl"], means[0]["kl_stderr"]) == ("12.3457", "3.1415e-05")

    report = report_markdown(eval_config(), [sft, dpo])
    assert "| sft |  | 0 | 0.512 ± 0.012 | 2.5e-07 ± 1.2e-07 | 4 |" in report
    assert "| dpo | 0.1 | 5 | 0.800 ± 0.050 | 12.35 ± 3.1e-05 | 4 |" in report
