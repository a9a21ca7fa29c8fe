"""Review data: load one split's texts, and cut the pair/eval prompts from held-out reviews.

`data.dataset` is one of: 'tiny' (the generated corpus of pipeline.data.corpus, no files); a local
.parquet/.jsonl/.csv file or directory; or a hub dataset id such as stanfordnlp/imdb. Inside a
job a hub id is read from the snapshot `launch.py prefetch` downloaded (pipeline.data.hub.resolve),
never from the network; outside jobs `datasets` fetches it itself.
"""
from __future__ import annotations

import random
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.corpus import make_corpus
from pipeline.data.sources import load_local_files, load_snapshot_split, split_files


def load_reviews(cfg: DataConfig, split: str, seed: int) -> list[str]:
    """Texts of one split. `cfg.dataset` is 'tiny', a local file/directory, or a hub id."""
    if cfg.dataset == "tiny":
        offset = {"train": 0, "test": 1}.get(split, 2)  # disjoint streams per split
        return [row["text"] for row in make_corpus(cfg.tiny_reviews, seed * 1000 + offset, cfg.tiny_max_sentences)]
    import datasets

    path = Path(cfg.dataset).expanduser()
    if path.exists():
        dataset = load_local_files(split_files(path, split))
    else:
        from pipeline.data.hub import resolve

        source = resolve(cfg.dataset, "dataset")
        if source == cfg.dataset:  # not in a job: datasets downloads it
            dataset = datasets.load_dataset(cfg.dataset, split=split)
        else:
            dataset = load_snapshot_split(source, cfg.dataset, split, "data.dataset",
                                          "data.train_split / data.prompt_split")
    if cfg.text_field not in dataset.column_names:
        raise ValueError(f"data.text_field: column {cfg.text_field!r} not in {dataset.column_names}")
    return [t for t in dataset[cfg.text_field] if t and t.strip()]


def clean_review(text: str) -> str:
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())


def cut_prompt(text: str, tokenizer, n_tokens: int) -> str | None:
    """The longest whole-word prefix of `text` with at most `n_tokens` tokens (>= 1 word).

    Ending on a word boundary matters: completions then start with a space and TRL's
    re-tokenisation of prompt + completion keeps the boundary token.
    """
    words = clean_review(text).split(" ")
    prompt = None
    for i in range(1, len(words) + 1):
        candidate = " ".join(words[:i])
        if len(tokenizer(candidate)["input_ids"]) > n_tokens:
            break
        prompt = candidate
    return prompt


def make_prompts(texts: list[str], tokenizer, cfg: DataConfig, n_pairs: int, n_eval: int,
                 fixed_eval: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Disjoint pair and eval prompts from held-out reviews; eval prompts start with `fixed_eval`."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    seen = set(fixed_eval)
    pair_prompts: list[str] = []
    eval_prompts: list[str] = list(fixed_eval)
    for index in order:
        if len(pair_prompts) >= n_pairs and len(eval_prompts) >= n_eval:
            break
        prompt = cut_prompt(texts[index], tokenizer, rng.randint(cfg.prompt_min_tokens, cfg.prompt_max_tokens))
        if not prompt or prompt in seen:
            continue
        seen.add(prompt)
        if len(pair_prompts) < n_pairs:
            pair_prompts.append(prompt)
        elif len(eval_prompts) < n_eval:
            eval_prompts.append(prompt)
    if len(pair_prompts) < n_pairs or len(eval_prompts) < n_eval:
        raise ValueError(f"data: only {len(pair_prompts)} pair / {len(eval_prompts)} eval distinct prompts could be "
                         f"cut from {len(texts)} reviews; lower pairs.num_prompts/eval.num_prompts, raise "
                         "data.prompt_max_tokens or use a larger corpus")
    return pair_prompts, eval_prompts
