"""Held-out preference accuracy: without a reward model (reward.kind=none), how often a policy's
implicit reward prefers the chosen response of a held-out pair.

DPO's implicit reward of a response y is beta * (log pi(y|x) - log pi_ref(y|x)); the pair counts as
right when the chosen response's exceeds the rejected one's. beta > 0 does not change the sign, so
the accuracy is that of the log-ratio margin. A tie (margin exactly 0: the reference against itself)
counts one half, so the SFT row reads 0.5, chance. Prompts and responses are tokenized apart, as
TRL's DPO does; a prompt rendered by a chat template keeps its own BOS only once (see models.chat).
"""
from __future__ import annotations

import math


def pair_samples(tokenizer, pairs: list[dict]) -> list:
    """Each pair as two Samples (chosen, then rejected) whose completion is the response."""
    from pipeline.evaluation.sampling import Sample
    from pipeline.models.chat import encode

    samples = []
    for pair in pairs:
        prompt_ids = encode(tokenizer, pair["prompt"])
        for role in ("chosen", "rejected"):
            ids = tokenizer(pair[role], add_special_tokens=False)["input_ids"]
            samples.append(Sample(pair["prompt"], pair[role], prompt_ids, ids))
    return samples


def preference_accuracy(model, ref_model, tokenizer, pairs: list[dict], batch_size: int) -> dict:
    """Accuracy over `pairs` (ties one half) with its binomial standard error, and the mean margin."""
    from pipeline.evaluation.sampling import completion_logprobs

    if not pairs:
        raise ValueError("eval: no held-out preference pairs to measure accuracy on (RUN/data/eval_pairs.jsonl)")
    lp = completion_logprobs(model, pair_samples(tokenizer, pairs), tokenizer.pad_token_id, batch_size=batch_size,
                             ref_model=ref_model)
    ratio = lp["logp"] - lp["ref_logp"]  # chosen, rejected, chosen, rejected, ...
    margins = ratio[0::2] - ratio[1::2]
    right = (margins > 0).double() + 0.5 * (margins == 0).double()
    accuracy = float(right.mean())
    n = len(pairs)
    return {"accuracy": accuracy, "accuracy_stderr": math.sqrt(max(float(right.var(unbiased=False)), 0.0) / n),
            "pairs": n, "mean_margin": float(margins.mean()), "ties": int((margins == 0).sum())}
