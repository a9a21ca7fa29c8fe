"""The eval's KL estimator against the exact sequence KL, enumerated on a tiny model."""
import itertools
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.evaluation.sampling import Sample, completion_logprobs, sample_completions, sequence_kl

VOCAB, EOS, MAX_NEW = 4, 3, 3
PROMPT = [0, 1]


class CharTokenizer:
    """Token i <-> character 'abcE'[i]; enough of the tokenizer API for the sampler."""
    eos_token_id = pad_token_id = EOS

    def __call__(self, text):
        return {"input_ids": ["abcE".index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcE"[i] for i in ids if not (skip_special_tokens and i == EOS))


def tiny_lm(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharpen the random init so the two models differ clearly
        model.lm_head.weight.mul_(8.0)
    return model


def all_completions() -> list[list[int]]:
    """Every completion the sampler can return: EOS-terminated ones and the length-capped ones."""
    out = []
    for length in range(MAX_NEW + 1):
        for body in itertools.product(range(EOS), repeat=length):
            out.append(list(body) + [EOS] if length < MAX_NEW else list(body))
    return out


@torch.no_grad()
def exact_logprob(model, completion: list[int]) -> float:
    """log p(completion | prompt), one unpadded sequence at a time (independent of the batched code)."""
    ids = torch.tensor([PROMPT + completion])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logprobs[len(PROMPT) - 1 + t, tok]) for t, tok in enumerate(completion))


def test_completion_space_is_a_distribution():
    policy = tiny_lm(1)
    total = sum(math.exp(exact_logprob(policy, c)) for c in all_completions())
    assert total == pytest.approx(1.0, abs=1e-6)  # float32 logits


def test_batched_left_padded_logprobs_match_unpadded():
    policy = tiny_lm(1)
    samples = [Sample("", "", PROMPT[-n:], c) for n, c in [(2, [0, 1, 2]), (1, [2, EOS]), (2, [EOS]), (1, [1, 1])]]
    batched = completion_logprobs(policy, samples, EOS)["logp"]
    for sample, value in zip(samples, batched):
        with torch.no_grad():
            ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
            lp = torch.log_softmax(policy(ids).logits[0].double(), -1)
        expected = sum(float(lp[len(sample.prompt_ids) - 1 + t, tok]) for t, tok in enumerate(sample.completion_ids))
        assert float(value) == pytest.approx(expected, abs=1e-5)


def test_monte_carlo_kl_matches_exact_kl():
    policy, reference = tiny_lm(1), tiny_lm(2)
    exact = 0.0
    for completion in all_completions():
        lp, lq = exact_logprob(policy, completion), exact_logprob(reference, completion)
        exact += math.exp(lp) * (lp - lq)
    assert exact > 0.05  # the two models really differ

    groups = sample_completions(policy, CharTokenizer(), ["ab"], num_samples=6000, max_new_tokens=MAX_NEW,
                                batch_size=1000, seed=0)
    samples = groups[0]
    assert all(len(s.completion_ids) <= MAX_NEW for s in samples)
    lp = completion_logprobs(policy, samples, EOS, ref_model=reference, batch_size=1000)
    diff = lp["logp"] - lp["ref_logp"]
    stderr = float(diff.std()) / math.sqrt(len(diff))
    estimate = sequence_kl(lp["logp"], lp["ref_logp"])
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)
    tokenwise = float(lp["kl_tokenwise"].mean())
    tokenwise_err = float(lp["kl_tokenwise"].std()) / math.sqrt(len(diff))
    assert abs(tokenwise - exact) < 4 * tokenwise_err + 1e-9, (tokenwise, exact)
    assert tokenwise_err < stderr  # the per-step form has lower variance


def test_kl_of_a_model_to_itself_is_zero():
    policy = tiny_lm(1)
    samples = sample_completions(policy, CharTokenizer(), ["ab"], num_samples=200, max_new_tokens=MAX_NEW, seed=1)[0]
    lp = completion_logprobs(policy, samples, EOS, ref_model=policy)
    assert sequence_kl(lp["logp"], lp["ref_logp"]) == pytest.approx(0.0, abs=1e-9)
    assert float(lp["kl_tokenwise"].abs().max()) < 1e-6
