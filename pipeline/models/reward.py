"""Sentiment reward: texts -> P(positive) in [0, 1].

`classifier` is the seed's siebert/sentiment-roberta-large-english through a transformers
pipeline (inside jobs read from the prefetched snapshot, see pipeline.data.hub.resolve); `vader` is the
offline lexicon model (its compound score in [-1, 1] mapped to [0, 1]).
"""
from __future__ import annotations

from typing import Protocol

from pipeline.config import RewardConfig


class RewardModel(Protocol):
    def __call__(self, texts: list[str]) -> list[float]: ...


class VaderReward:
    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [(self._analyzer.polarity_scores(text)["compound"] + 1.0) / 2.0 for text in texts]


class ClassifierReward:
    def __init__(self, cfg: RewardConfig, device):
        import torch
        from transformers import pipeline

        from pipeline.data.hub import resolve

        self._cfg = cfg
        dtype = torch.bfloat16 if getattr(device, "type", "cpu") == "cuda" else torch.float32
        self._pipe = pipeline("text-classification", model=resolve(cfg.model, "model"), device=device, dtype=dtype,
                              top_k=None, truncation=True, max_length=cfg.max_length)
        labels = set(self._pipe.model.config.id2label.values())
        if cfg.positive_label not in labels:
            raise ValueError(f"reward.positive_label: {cfg.positive_label!r} is not a label of {cfg.model} "
                             f"(labels: {sorted(labels)})")

    def __call__(self, texts: list[str]) -> list[float]:
        outputs = self._pipe(list(texts), batch_size=self._cfg.batch_size)
        return [next(s["score"] for s in scores if s["label"] == self._cfg.positive_label) for scores in outputs]


def make_reward(cfg: RewardConfig, device=None) -> RewardModel:
    if cfg.kind == "vader":
        return VaderReward()
    return ClassifierReward(cfg, device)


def score_in_batches(reward: RewardModel, texts: list[str], batch_size: int, progress=None) -> list[float]:
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        scores.extend(reward(texts[start:start + batch_size]))
        if progress is not None:
            progress.update(min(batch_size, len(texts) - start))
    if not all(0.0 <= s <= 1.0 for s in scores):
        raise RuntimeError("reward model returned values outside [0, 1]")
    return scores
