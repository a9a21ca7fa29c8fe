"""The run's reward: (prompt, completion) pairs -> one number each.

`classifier` is a text classifier through a transformers pipeline (the seed's
siebert/sentiment-roberta-large-english): the probability of `reward.positive_label`, in [0, 1].
`reward_model` is a sequence-classification model with one output (a trained reward model): its
score, unbounded, of prompt + response, rendered through the reward model's own chat template
(user turn, assistant turn) when its tokenizer has one. `vader` is the offline lexicon model (its
compound score in [-1, 1] mapped to [0, 1]). Inside jobs the models are read from the prefetched
snapshot (see pipeline.data.hub.resolve). `check_reward_model` refuses a wrong model before any job.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import RewardConfig


class TextReward:
    """A reward of the text prompt + completion (classifier, vader); `__call__` scores whole texts."""
    bounded = True  # scores lie in [0, 1]

    def __call__(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, prompts: list[str], completions: list[str], turns: list[list[dict]] | None = None) -> list[float]:
        if turns is not None:  # chat data: the conversation's text, not the policy's rendering of it
            return self([plain_text(t, c) for t, c in zip(turns, completions)])
        return self([p + c for p, c in zip(prompts, completions)])


class VaderReward(TextReward):
    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [(self._analyzer.polarity_scores(text)["compound"] + 1.0) / 2.0 for text in texts]


def _dtype(device):
    import torch

    return torch.bfloat16 if getattr(device, "type", device) == "cuda" else torch.float32


class ClassifierReward(TextReward):
    def __init__(self, cfg: RewardConfig, device):
        from transformers import pipeline

        from pipeline.data.hub import resolve

        self._cfg = cfg
        self._pipe = pipeline("text-classification", model=resolve(cfg.model, "model"), device=device,
                              dtype=_dtype(device), top_k=None, truncation=True, max_length=cfg.max_length)
        labels = set(self._pipe.model.config.id2label.values())
        if cfg.positive_label not in labels:
            raise ValueError(f"reward.positive_label: {cfg.positive_label!r} is not a label of {cfg.model} "
                             f"(labels: {sorted(labels)})")

    def __call__(self, texts: list[str]) -> list[float]:
        outputs = self._pipe(list(texts), batch_size=self._cfg.batch_size)
        return [next(s["score"] for s in scores if s["label"] == self._cfg.positive_label) for scores in outputs]


class ScalarReward:
    """A one-output sequence-classification model: its logit is the reward (unbounded)."""
    bounded = False

    def __init__(self, cfg: RewardConfig, device):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.data.hub import resolve

        path = resolve(cfg.model, "model")
        self._max_length = cfg.max_length
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_dtype(self._device))
        check_one_output(self._model.config, cfg.model)
        if self._tokenizer.pad_token is None:  # GPT-style reward models: pad with EOS, as TRL's reward trainer does
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model.to(self._device).eval()

    def _render(self, turns: list[dict], completion: str) -> str:
        messages = [*turns, {"role": "assistant", "content": completion}]
        return self._tokenizer.apply_chat_template(messages, tokenize=False)

    def _scores(self, texts: list[str], templated: bool) -> list[float]:
        import torch

        # a rendered template already holds its special tokens: the tokenizer must not add them again
        batch = self._tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self._max_length, add_special_tokens=not templated).to(self._device)
        with torch.no_grad():
            return self._model(**batch).logits[:, 0].float().tolist()

    def __call__(self, texts: list[str]) -> list[float]:
        return self._scores(list(texts), templated=False)

    def score(self, prompts: list[str], completions: list[str], turns: list[list[dict]] | None = None) -> list[float]:
        """`turns`: for chat data, each prompt's messages (the policy's rendering of them is not reused)."""
        if self._tokenizer.chat_template:
            turns = turns if turns is not None else [[{"role": "user", "content": p}] for p in prompts]
            return self._scores([self._render(t, c) for t, c in zip(turns, completions)], templated=True)
        if turns is not None:
            return self._scores([plain_text(t, c) for t, c in zip(turns, completions)], templated=False)
        return self._scores([p + c for p, c in zip(prompts, completions)], templated=False)


def plain_text(turns: list[dict], completion: str) -> str:
    """A conversation scored without a chat template: its turns' texts and the completion, a line each."""
    return "\n".join([*(m["content"] for m in turns), completion])


def make_reward(cfg: RewardConfig, device=None):
    """The run's reward; None for reward.kind=none (eval then measures held-out preference accuracy)."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "vader":
        return VaderReward()
    if cfg.kind == "reward_model":
        return ScalarReward(cfg, device)
    return ClassifierReward(cfg, device)


def check_one_output(model_config, name: str) -> None:
    if model_config.num_labels != 1:
        raise ValueError(f"reward.model: {name} has {model_config.num_labels} outputs "
                         f"({', '.join(map(str, model_config.id2label.values()))}); reward.kind=reward_model needs a "
                         "sequence-classification model with one output (num_labels=1, a trained reward model). "
                         "For a classifier use reward.kind=classifier with reward.positive_label")


def check_reward_model(cfg, prefetched: dict) -> None:
    """Before anything is submitted (after the prefetch): a `reward_model` has one output and a
    `classifier` has `positive_label`. The config is read from the local directory or the prefetched
    snapshot (`prefetched`: what `hub.prefetch` returned)."""
    reward = cfg.reward
    if reward.kind in ("vader", "none"):
        return
    from transformers import AutoConfig

    entry = prefetched.get("reward.model")
    model_config = AutoConfig.from_pretrained(entry["path"] if entry else str(Path(reward.model).expanduser()))
    if reward.kind == "reward_model":
        check_one_output(model_config, reward.model)
    elif reward.positive_label not in set(model_config.id2label.values()):
        raise ValueError(f"reward.positive_label: {reward.positive_label!r} is not a label of {reward.model} "
                         f"(labels: {', '.join(sorted(model_config.id2label.values()))}); set one of them")


def axis_label(cfg: RewardConfig) -> str:
    """What the frontier's y-axis shows: the reward and its unit."""
    if cfg.kind == "none":
        return "held-out preference accuracy (implicit reward margin > 0)"
    if cfg.kind == "vader":
        return "mean reward: VADER sentiment, (compound + 1) / 2 in [0, 1]"
    name = Path(cfg.model).name if Path(cfg.model).expanduser().is_dir() else cfg.model
    if cfg.kind == "reward_model":
        return f"mean reward: {name} score (logit, unbounded)"
    return f"mean reward: P({cfg.positive_label}) under {name}"


def score_in_batches(reward, prompts: list[str], completions: list[str], batch_size: int,
                     progress=None, turns: list[list[dict]] | None = None) -> list[float]:
    """Scores in batches; `turns` (chat data): each prompt's messages, scored instead of its rendering."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        window = slice(start, start + batch_size)
        scores.extend(reward.score(prompts[window], completions[window],
                                   turns[window] if turns is not None else None))
        if progress is not None:
            progress.update(min(batch_size, len(prompts) - start))
    if reward.bounded and not all(0.0 <= s <= 1.0 for s in scores):
        raise RuntimeError("reward model returned values outside [0, 1]")
    if not all(s == s and abs(s) != float("inf") for s in scores):
        raise RuntimeError("reward model returned a NaN or infinite score")
    return scores
