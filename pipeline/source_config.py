"""Where a run's training data comes from: the config sections of preference pairs read from a dataset
(`pairs.source`, `pairs.dataset`, `pairs.columns`, `pairs.train_split`) and of SFT's switch
(`sft.enabled`). Mixed into `PairsConfig` and `SFTConfig` (pipeline.config), which re-exports them.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.configlib import check as _check
from pipeline.configlib import doc


@dataclass
class SFTSourceConfig:
    """Whether SFT runs (and on what): kept apart from the trainer fields."""
    enabled: bool = doc("Run supervised fine-tuning. false: DPO starts from model.name, which is then also the "
                        "reference (of DPO and of eval); the sft stage only prepares the prompts (and the tiny "
                        "base model). With pairs.source=dataset SFT trains on prompt + chosen of the preference "
                        "training split, else on data.dataset's reviews.", True)
    dataset: str | None = doc("SFT on its own data (the handbook's Zephyr flow: UltraChat, then DPO): a hub dataset "
                              "id or a local .jsonl/.json/.parquet/.csv file or directory with a `messages` column "
                              "(conversations, rendered by the chat template) or a `text` column. null: the "
                              "reviews, or prompt + chosen of the preference data (pairs.source=dataset).", None)
    split: str = doc("sft.dataset: the split SFT trains on (UltraChat 200k: train_sft).", "train")

    def _check_sft_source(self):
        if self.dataset is not None:
            from pipeline.data.sources import check_local_exists

            _check(self.enabled, "sft.dataset", "is set but sft.enabled=false: drop sft.dataset or enable SFT")
            check_local_exists(self.dataset, "sft.dataset", "HuggingFaceH4/ultrachat_200k")
            _check(bool(self.split), "sft.split", "must name a split of sft.dataset, e.g. train_sft")



PAIR_SOURCES = ("sampled", "dataset")
PAIR_ROLES = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceSourceConfig:
    """Where preference pairs come from: sampled and ranked (the default), or read from a dataset."""
    source: str = doc("sampled: sample completions from the SFT model and rank them with the reward (every pair); "
                      "dataset: read prompt/chosen/rejected pairs from pairs.dataset (the pairs stage converts "
                      "and validates them instead of sampling).", "sampled")
    dataset: str | None = doc("pairs.source=dataset: a hub dataset id or a local .jsonl/.json/.parquet/.csv file or "
                              "directory of preference data in TRL's standard format: prompt, chosen, rejected "
                              "strings (explicit prompt), or chosen and rejected only, sharing the prompt as a "
                              "prefix (implicit prompt).", None)
    columns: dict[str, str] = doc("Column names for other layouts, e.g. {prompt: question, chosen: response_j, "
                                  "rejected: response_k} or --set pairs.columns.prompt=question; a role not listed "
                                  "is read from the column of its own name.", factory=dict)
    train_split: str = doc("pairs.source=dataset: the split the training pairs (and SFT's texts) come from; a "
                           "single local file is the split 'train', files of a directory are named by split "
                           "(train.jsonl, test-00000.parquet).", "train")

    def _check_source(self):
        _check(self.source in PAIR_SOURCES, "pairs.source", f"{self.source!r} is not one of {', '.join(PAIR_SOURCES)}")
        if self.source == "dataset":
            _check(bool(self.dataset), "pairs.dataset", "pairs.source=dataset needs a preference dataset: a hub id or "
                                                        "a local .jsonl/.json/.parquet/.csv file or directory")
        for role, column in self.columns.items():
            _check(role in PAIR_ROLES, f"pairs.columns.{role}", f"is not a role; map {', '.join(PAIR_ROLES)} to "
                                                                  "column names, e.g. pairs.columns.prompt=question")
            _check(bool(column), f"pairs.columns.{role}", "must name a column of pairs.dataset")
        _check(bool(self.train_split), "pairs.train_split", "must name a split, e.g. train")
