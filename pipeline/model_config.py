"""The model and reward sections of the ML configuration (`model.*`, `reward.*`): what is trained and
what scores it. Mixed into `PipelineConfig` (pipeline.config, which re-exports them).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.configlib import check as _check
from pipeline.configlib import doc
from pipeline.models.chat import check_template_setting

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    name: str = doc("Policy model: a hub id (gpt2-large), a local directory, or 'tiny' (a small GPT-2 "
                    "built from the fields below with a tokenizer trained on the corpus).", "gpt2-large")
    chat_template: str | None = doc("Chat template for conversational data (message lists): a named one (zephyr) "
                                    "or a Jinja file; null: the tokenizer's own. Conversational data with a "
                                    "tokenizer that has none is refused at launch.", None)
    dtype: str = doc("Compute dtype: auto (bf16 on GPUs that support it, else float32), float32, bfloat16, "
                     "float16. Sampling and eval hold weights in it; SFT and DPO keep float32 weights and "
                     "autocast to it.", "auto")
    n_layer: int = doc("tiny only: transformer layers.", 2)
    n_embd: int = doc("tiny only: hidden size.", 128)
    n_head: int = doc("tiny only: attention heads.", 4)
    n_positions: int = doc("tiny only: context length.", 128)
    vocab_size: int = doc("tiny only: size of the byte-level BPE trained on the corpus.", 1300)
    embedding_rows: int | None = doc("tiny only: embedding rows (null = the tokenizer's size); 50257 gives "
                                     "GPT-2's real parameter count for benchmarks.", None)

    def __post_init__(self):
        _check(bool(self.name), "model.name", "must not be empty; use a hub id, a directory or 'tiny'")
        check_template_setting(self.chat_template)
        _check(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        for field in ("n_layer", "n_embd", "n_head", "n_positions"):
            _check(getattr(self, field) >= 1, f"model.{field}", "must be >= 1")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", f"must be divisible by model.n_head={self.n_head}")
        _check(self.vocab_size >= 300, "model.vocab_size", "must be >= 300 (256 bytes + merges + specials)")
        if self.embedding_rows is not None:
            _check(self.embedding_rows >= 300, "model.embedding_rows", "must be >= 300 or null")


REWARD_KINDS = ("classifier", "reward_model", "vader", "none")


@dataclass
class RewardConfig:
    kind: str = doc("Reward: 'classifier' (a transformers text classifier: the probability of positive_label, "
                    "in [0, 1]), 'reward_model' (a sequence-classification model with one output: its score, "
                    "unbounded, of prompt + response through the reward model's own chat template when it has "
                    "one), 'vader' (lexicon-based sentiment, offline, in [0, 1]) or 'none' (pairs.source=dataset "
                    "only: eval measures held-out preference accuracy, the implicit reward margin > 0, vs KL).",
                    "classifier")
    model: str = doc("Classifier or reward model: a hub id or a directory (kind=classifier or reward_model).",
                     "siebert/sentiment-roberta-large-english")
    positive_label: str = doc("kind=classifier: the label whose probability is the reward.", "POSITIVE")
    batch_size: int = doc("Texts per reward batch.", 64)
    max_length: int = doc("Reward model truncation length, in tokens.", 512)

    def __post_init__(self):
        _check(self.kind in REWARD_KINDS, "reward.kind", f"{self.kind!r} is not one of {', '.join(REWARD_KINDS)}")
        _check(bool(self.model), "reward.model", "must not be empty; use a hub id or a directory")
        _check(bool(self.positive_label), "reward.positive_label", "must name a label of the classifier, e.g. POSITIVE")
        _check(self.batch_size >= 1, "reward.batch_size", "must be >= 1")
        _check(self.max_length >= 8, "reward.max_length", "must be >= 8")
