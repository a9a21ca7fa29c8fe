"""Batched sampling and sequence log-probabilities (for rewards and KL to the reference)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS when the model stopped by itself

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

    Resumable: `restored` holds batches sampled before (by batch index), used instead of sampling
    them again; `on_batch(index, samples)` is called after each new batch (to save it, and to stop
    there: it may raise). Seeded per batch, so a resumed call draws exactly the same tokens.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    static = kv_cache == "static"
    flat = [(p, k) for p in range(len(prompts)) for k in range(num_samples)]
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
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
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, cache_implementation="static" if static else None)
        generated = out[:len(batch), ids.shape[1]:].tolist()
        new = []
        for (p, _), tokens in zip(batch, generated):
            if eos in tokens:
                tokens = tokens[:tokens.index(eos) + 1]
            text = tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
            new.append(Sample(prompts[p], text, encoded[p], tokens))
            results[p].append(new[-1])
        if progress is not None:
            progress.update(len(batch))
        if on_batch is not None:
            on_batch(batch_index, new)
    return results


def sample_resumable(model, tokenizer, prompts: list[str], partial_dir, label: str, **kwargs) -> list[list[Sample]]:
    """`sample_completions` saved batch by batch into `partial_dir`: a stop request (pipeline.interrupt)
    raises StageInterrupted right after the current batch is saved, and rerunning continues with the
    next batch, drawing exactly the tokens an uninterrupted call draws. The caller removes
    `partial_dir` once it has written its result."""
    from pathlib import Path

    from pipeline import interrupt
    from pipeline.layout import atomic_write_jsonl, read_jsonl

    partial_dir = Path(partial_dir)
    restored = {}
    for path in sorted(partial_dir.glob("batch-*.jsonl")):
        restored[int(path.stem.split("-")[1])] = [
            Sample(row["prompt"], row["completion"], row["prompt_ids"], row["completion_ids"]) for row in read_jsonl(path)]

    def save(index: int, samples: list[Sample]) -> None:
        atomic_write_jsonl(partial_dir / f"batch-{index:05d}.jsonl",
                           [{"prompt": s.prompt, "completion": s.completion, "prompt_ids": s.prompt_ids,
                             "completion_ids": s.completion_ids} for s in samples])
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


@torch.inference_mode()
def completion_logprobs(model, samples: list[Sample], pad_id: int, *, temperature: float = 1.0,
                        batch_size: int = 64, ref_model=None) -> dict[str, torch.Tensor]:
    """Per-sample sums over completion tokens, on the CPU, float64.

    Returns `logp` = sum_t log pi(y_t | x, y_<t). With `ref_model`, also `ref_logp` and
    `kl_tokenwise` = sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) (the exact per-step KL along
    the sampled trajectory: same expectation as logp - ref_logp, lower variance).
    """
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"logp": [], "ref_logp": [], "kl_tokenwise": []}
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        ids, mask, positions, completion_mask = _padded_batch(batch, pad_id, device)
        target = ids[:, 1:]
        weight = completion_mask[:, 1:].to(torch.float64)

        def token_logprobs(m):
            logits = m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
            return torch.log_softmax(logits / temperature, dim=-1)

        logprobs = token_logprobs(model)
        picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
        out["logp"].append((picked * weight).sum(-1).cpu())
        if ref_model is not None:
            ref_logprobs = token_logprobs(ref_model)
            ref_picked = ref_logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
            out["ref_logp"].append((ref_picked * weight).sum(-1).cpu())
            step_kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1).double()
            out["kl_tokenwise"].append((step_kl * weight).sum(-1).cpu())
    return {key: torch.cat(values) for key, values in out.items() if values}


def sequence_kl(policy_logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Monte-Carlo KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)] from samples of pi."""
    return float((policy_logp - ref_logp).mean())
