"""SFT on its own dataset (`sft.dataset`, e.g. UltraChat-style conversations before DPO on preference data).

A split holds a `messages` column (conversations: TRL's SFTTrainer renders them with the policy's chat
template and tokenizes them without adding the special tokens twice) or a `text` column. Checked before
anything is submitted (at prefetch): the split exists, one of the columns is there, and rows are left
after dropping empty ones (counted).
"""
from __future__ import annotations

from pipeline.config import PipelineConfig

FIELD = "sft.dataset"


def open_split(cfg: PipelineConfig, snapshot: str | None = None):
    from pipeline.data import sources

    return sources.open_dataset_split(cfg.sft.dataset, FIELD, cfg.sft.split, "sft.split", snapshot)


def examples(cfg: PipelineConfig, dataset) -> tuple[dict[str, list], int]:
    """The SFT columns ({"messages": [...]} or {"text": [...]}) and how many empty rows were dropped."""
    from pipeline.models.chat import is_messages

    columns = list(dataset.column_names)
    if "messages" in columns:
        rows = [m for m in dataset["messages"]]
        bad = next((i for i, m in enumerate(rows) if m and not is_messages(m)), None)
        if bad is not None:
            raise ValueError(f"{FIELD}: {cfg.sft.dataset} row {bad}: `messages` is not a list of {{role, content}} "
                             "messages")
        # nothing to learn from a conversation without an answer
        kept = [m for m in rows if m and any(t["role"] == "assistant" and str(t.get("content") or "").strip()
                                             for t in m)]
        return {"messages": kept}, len(rows) - len(kept)
    if "text" in columns:
        rows = dataset["text"]
        kept = [t for t in rows if isinstance(t, str) and t.strip()]
        return {"text": kept}, len(rows) - len(kept)
    raise ValueError(f"{FIELD}: {cfg.sft.dataset} split {cfg.sft.split!r} has neither a `messages` nor a `text` "
                     f"column; its columns: {', '.join(columns)}. Give conversations as `messages` "
                     "([{role, content}, ...]) or plain text as `text`")


def check_before_submit(cfg: PipelineConfig, snapshot: str | None = None) -> dict:
    """At launch: the split, its column and at least one usable row. Returns the counts."""
    columns, empty = examples(cfg, open_split(cfg, snapshot))
    (kind, rows), = columns.items()
    if not rows:
        raise ValueError(f"{FIELD}: {cfg.sft.dataset} split {cfg.sft.split!r} has no usable rows ({empty} empty); "
                         "give a dataset with text or conversations to train on")
    return {"rows": len(rows) + empty, "usable": len(rows), "empty": empty, "conversational": kind == "messages"}


def texts_for_a_tokenizer(cfg: PipelineConfig) -> list[str]:
    """What the tiny model's tokenizer also learns from: the dataset's text or message contents."""
    columns, _ = examples(cfg, open_split(cfg))
    (kind, rows), = columns.items()
    return rows if kind == "text" else [m["content"] for conversation in rows for m in conversation]
