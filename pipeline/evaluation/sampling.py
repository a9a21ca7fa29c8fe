"""Batched sampling and sequence log-probabilities (for rewards and KL to the reference)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.chat import encode


@dataclass
class Sample:
    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS when the model stopped by itself
    # log q(completion | prompt) under the distribution the sampler drew from (see sample_completions);
    # None for samples saved before it was recorded
    sampler_logp: float | None = None

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _left_pad(sequences: list[list[int]], pad_id: int, device, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(width, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _sampling_chain(temperature: float, top_k: int, top_p: float, recorder):
    """The warpers `generate` would append for these settings, in its order, then `recorder`.

    `generate` appends its warpers after the caller's processors, so a recorder passed alone would see
    the logits before temperature and truncation; this chain is passed instead, with generate's own
    temperature/top_k/top_p set to off. Same operations in the same order: the same tokens are drawn.
    Assumes the model's generation_config adds no warper of its own after these (min_p, typical_p,
    epsilon/eta cutoff, top_h, watermarking, renormalize_logits: unset, as for GPT-2)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    chain.append(recorder)
    return chain


class _DrawnTokenLogprobs:
    """Last logits processor of the sampling chain: the log-probability of every token drawn, under
    the distribution it was drawn from (generate samples from softmax of the scores this returns).

    A step's token is only known at the next call (the last column of `input_ids`), so only the
    latest step's log-softmax is kept: one (batch, vocab) float32 tensor, not every step's scores
    (`output_scores` would hold batch x steps x vocab). Values stay on the device until the batch ends."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []  # (batch,) per drawn token, in order
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.latest is not None:
            self.steps.append(self.latest.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def drawn(self, generated: torch.Tensor) -> torch.Tensor:
        """(batch, steps) float64 CPU log-probs of `generated` (generate's new columns). Steps past the
        end are dropped (generate may run one step more and undo it)."""
        steps = self.steps[:generated.shape[1]]
        if len(steps) == generated.shape[1] - 1:  # the last token: no call came after it
            steps = steps + [self.latest.gather(-1, generated[:, -1:]).squeeze(-1)]
        if len(steps) != generated.shape[1]:
            raise RuntimeError(f"sampler log-probs: {len(self.steps)} steps recorded for {generated.shape[1]} tokens")
        return torch.stack(steps, dim=1).double().cpu()


@torch.inference_mode()
def sample_completions(model, tokenizer, prompts: list[str], *, num_samples: int, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64,
                       seed: int = 0, kv_cache: str = "dynamic", prompt_width: int = 0,
                       progress=None, restored: dict[int, list[Sample]] | None = None,
                       on_batch=None) -> list[list[Sample]]:
    """`num_samples` completions for each prompt (plain ancestral sampling by default).

    Returns one list per prompt. Seeded per batch, so a shard's output does not depend on which
    other shards ran in the same process.

    kv_cache="static": a preallocated cache, and every batch has the same shape (prompts
    left-padded to at least `prompt_width` tokens, the last batch filled up with repeats of its
    last row, whose outputs are dropped), so on a GPU transformers compiles the decode step once
    and replays it as a CUDA graph. The tokens drawn are the same as with the dynamic cache for
    the same batch (tests/test_fast_paths.py). `prompt_width` is ignored with the dynamic cache.

    Each Sample carries `sampler_logp`: sum over its completion tokens (through the first EOS, the
    tokens `completion_logprobs` scores) of log q(y_t | x, y_<t), q being what the sampler drew from:
    softmax of generate's float32 copy of the logits the model computed with its KV cache, in its
    dtype, after temperature (and top-k/top-p truncation, when on: q is then the truncated
    distribution, and sampler_logp - log pi(y) measures the truncation as well as the numerics).

    Resumable: `restored` holds batches sampled before (by batch index), used instead of sampling
    them again; `on_batch(index, samples)` is called after each new batch (to save it, and to stop
    there: it may raise). Seeded per batch, so a resumed call draws exactly the same tokens.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    static = kv_cache == "static"
    flat = [(p, k) for p in range(len(prompts)) for k in range(num_samples)]
    encoded = [encode(tokenizer, prompt) for prompt in prompts]  # a chat template's BOS not doubled
    width = max([prompt_width] + [len(ids) for ids in encoded]) if static else 0  # 0: the batch's longest
    results: list[list[Sample]] = [[] for _ in prompts]
    for batch_index, start in enumerate(range(0, len(flat), batch_size)):
        batch = flat[start:start + batch_size]
        if restored and batch_index in restored:
            for (p, _), sample in zip(batch, restored[batch_index]):
                results[p].append(sample)
            if progress is not None:
                progress.update(len(batch))
            continue
        rows = [encoded[p] for p, _ in batch]
        if static:
            rows += [rows[-1]] * (batch_size - len(rows))
        ids, mask = _left_pad(rows, tokenizer.pad_token_id, device, width=width)
        torch.manual_seed(seed * 100003 + batch_index)
        recorder = _DrawnTokenLogprobs()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                             temperature=1.0, top_k=0, top_p=1.0,  # applied by the chain, before the recorder
                             logits_processor=_sampling_chain(temperature, top_k, top_p, recorder),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             cache_implementation="static" if static else None)
        drawn = recorder.drawn(out[:, ids.shape[1]:])
        generated = out[:len(batch), ids.shape[1]:].tolist()
        new = []
        for row, ((p, _), tokens) in enumerate(zip(batch, generated)):
            if eos in tokens:  # what follows the first EOS is padding: neither kept nor scored
                tokens = tokens[:tokens.index(eos) + 1]
            text = tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
            new.append(Sample(prompts[p], text, encoded[p], tokens, float(drawn[row, :len(tokens)].sum())))
            results[p].append(new[-1])
        if progress is not None:
            progress.update(len(batch))
        if on_batch is not None:
            on_batch(batch_index, new)
    return results


def sample_resumable(model, tokenizer, prompts: list[str], partial_dir, label: str, **kwargs) -> list[list[Sample]]:
    """`sample_completions` saved batch by batch into `partial_dir`: a stop request (pipeline.runtime.interrupt)
    raises StageInterrupted right after the current batch is saved, and rerunning continues with the
    next batch, drawing exactly the tokens an uninterrupted call draws. The caller removes
    `partial_dir` once it has written its result. Batches saved before `sampler_logp` was recorded
    load with sampler_logp=None."""
    from pathlib import Path

    from pipeline.runtime import interrupt
    from pipeline.rundir.layout import atomic_write_jsonl, read_jsonl

    partial_dir = Path(partial_dir)
    restored = {}
    for path in sorted(partial_dir.glob("batch-*.jsonl")):
        restored[int(path.stem.split("-")[1])] = [
            Sample(row["prompt"], row["completion"], row["prompt_ids"], row["completion_ids"], row.get("sampler_logp"))
            for row in read_jsonl(path)]

    if restored:  # in the job's log: the work an earlier attempt (stopped by a time limit, preempted) kept
        print(f"{label}: {len(restored)} sampling batch(es) restored from {partial_dir}", flush=True)

    def save(index: int, samples: list[Sample]) -> None:
        atomic_write_jsonl(partial_dir / f"batch-{index:05d}.jsonl",
                           [{"prompt": s.prompt, "completion": s.completion, "prompt_ids": s.prompt_ids,
                             "completion_ids": s.completion_ids, "sampler_logp": s.sampler_logp} for s in samples])
        interrupt.check(None, f"{label}: sampling batch {index} saved; {len(restored)} restored")

    return sample_completions(model, tokenizer, prompts, restored=restored, on_batch=save, **kwargs)


def _padded_batch(samples: list[Sample], pad_id: int, device):
    """Left-padded prompt+completion ids, attention mask, explicit positions and a completion mask."""
    sequences = [s.prompt_ids + s.completion_ids for s in samples]
    ids, mask = _left_pad(sequences, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    completion_mask = torch.zeros_like(mask)
    width = ids.shape[1]
    for row, s in enumerate(samples):
        if s.completion_ids:
            completion_mask[row, width - len(s.completion_ids):] = 1
    return ids, mask, positions, completion_mask


def _final_hidden_states(model, ids, mask, positions) -> torch.Tensor:
    """The last hidden states, i.e. the input of the output embeddings (lm_head), without the logits.

    Calls the model's body (`model.base_model`: GPT-2's `transformer`, Llama's `model`, ...) so the
    full-vocabulary logits are never formed in the model's dtype; a model with no separate body runs
    whole and its last hidden state is taken."""
    body = model.base_model
    if body is not model:
        return body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    outputs = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                    output_hidden_states=True)
    return outputs.hidden_states[-1]


def _float32_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embeddings' weight and bias upcast to float32 (one copy per call of completion_logprobs)."""
    for field in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, field, None):  # logits would not be lm_head(hidden) alone
            raise NotImplementedError(f"completion_logprobs: models with config.{field} are not supported")
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.float(), None if bias is None else bias.float()


@torch.inference_mode()
def completion_logprobs(model, samples: list[Sample], pad_id: int, *, temperature: float = 1.0,
                        batch_size: int = 64, ref_model=None) -> dict[str, torch.Tensor]:
    """Per-sample sums over completion tokens, on the CPU, float64.

    Returns `logp` = sum_t log pi(y_t | x, y_<t). With `ref_model`, also `ref_logp` and
    `kl_tokenwise` = sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) (the exact per-step KL along
    the sampled trajectory: same expectation as logp - ref_logp, lower variance).

    The models' bodies run in their own dtype, but the output projection and the log-softmax run
    in float32: bf16 logits of GPT-2's magnitude (|logit| ~ 50-100) are rounded to steps of 0.25-0.5,
    per-token errors that sum over a completion and do not cancel between two different models.
    Only completion positions go through the head; per batch, only the gathered values are kept.
    """
    device = next(model.parameters()).device
    heads = {"policy": _float32_head(model)}
    if ref_model is not None:
        heads["ref"] = heads["policy"] if ref_model is model else _float32_head(ref_model)
    out: dict[str, list[torch.Tensor]] = {"logp": [], "ref_logp": [], "kl_tokenwise": []}
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        ids, mask, positions, completion_mask = _padded_batch(batch, pad_id, device)
        # sequences are left-padded, so every completion lies in the last `span` columns; position j
        # predicts token j + 1 (a completion token in column 0, with no prompt, has no prediction)
        span = min(max(len(s.completion_ids) for s in batch), ids.shape[1] - 1)
        if span == 0:  # no completion token has a prediction
            zeros = torch.zeros(len(batch), dtype=torch.float64)
            for key in ("logp", "ref_logp", "kl_tokenwise") if ref_model is not None else ("logp",):
                out[key].append(zeros)
            continue
        target = ids[:, -span:]
        weight = completion_mask[:, -span:].to(torch.float64)

        def token_logprobs(m, head):
            hidden = _final_hidden_states(m, ids, mask, positions)[:, -span - 1:-1].float()
            logits = torch.nn.functional.linear(hidden, *head)
            return torch.log_softmax(logits / temperature, dim=-1)

        logprobs = token_logprobs(model, heads["policy"])
        picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
        out["logp"].append((picked * weight).sum(-1).cpu())
        if ref_model is not None:
            # the reference against itself (the SFT row of a preference-accuracy eval): one forward pass
            ref_logprobs = logprobs if ref_model is model else token_logprobs(ref_model, heads["ref"])
            ref_picked = ref_logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
            out["ref_logp"].append((ref_picked * weight).sum(-1).cpu())
            step_kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1).double()
            out["kl_tokenwise"].append((step_kl * weight).sum(-1).cpu())
    return {key: torch.cat(values) for key, values in out.items() if values}


def sequence_kl(policy_logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Monte-Carlo KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)] from samples of pi."""
    return float((policy_logp - ref_logp).mean())
