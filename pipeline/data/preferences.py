"""Preference data from a dataset (pairs.source=dataset): open a split, map its columns, convert its
rows to TRL's standard explicit-prompt form ({prompt, chosen, rejected} strings) and count the rows
that cannot be trained on.

Formats accepted (TRL's): standard rows (strings) or conversational rows (message lists), each with an
explicit prompt column or an implicit prompt (chosen and rejected share it as a prefix or as leading
turns: TRL's `extract_prompt` cuts it off). Conversational rows are rendered with the policy's chat
template (see pipeline.models.chat) wherever they are trained on or sampled from. `check_before_submit` runs at launch, after prefetch, so a bad
dataset is refused before any job exists; the pairs stage converts again and also drops (and counts)
the rows longer than dpo.max_length tokens, once the policy's tokenizer exists.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.source_config import PAIR_ROLES

FIELD = "pairs.dataset"
DROP_REASONS = ("empty", "identical", "too_long")


@dataclass
class Converted:
    rows: list[dict]                       # usable {prompt, chosen, rejected} strings
    dropped: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in DROP_REASONS})
    total: int = 0                         # rows read
    implicit_prompt: bool = False
    conversational: bool = False           # message lists (rendered with the chat template, see convert)


def open_split(cfg: PipelineConfig, split: str, split_fields: str, snapshot: str | None = None):
    """One split of pairs.dataset as a `datasets.Dataset` (see sources.open_dataset_split)."""
    from pipeline.data import sources

    return sources.open_dataset_split(cfg.pairs.dataset, FIELD, split, split_fields, snapshot)


def column_names(cfg: PipelineConfig) -> dict[str, str]:
    """The dataset column each role is read from (pairs.columns, else the role's own name)."""
    return {role: cfg.pairs.columns.get(role, role) for role in PAIR_ROLES}


def check_columns(cfg: PipelineConfig, found: list[str]) -> bool:
    """Refuses missing columns, naming the ones found and the fix; returns whether the prompt is explicit."""
    names = column_names(cfg)
    missing = [f"{role} (column {names[role]!r})" for role in ("chosen", "rejected") if names[role] not in found]
    explicit = names["prompt"] in found
    if "prompt" in cfg.pairs.columns and not explicit:
        missing.insert(0, f"prompt (column {names['prompt']!r})")
    if missing:
        raise ValueError(f"pairs.columns: {FIELD}={cfg.pairs.dataset} lacks {', '.join(missing)}; its columns: "
                         f"{', '.join(found)}. Map them, e.g. --set pairs.columns.prompt=question "
                         "--set pairs.columns.chosen=response_j --set pairs.columns.rejected=response_k (leave "
                         "the prompt out when chosen and rejected start with it)")
    return explicit


def _row_error(cfg: PipelineConfig, index: int, problem: str) -> ValueError:
    return ValueError(f"{FIELD}: {cfg.pairs.dataset} row {index}: {problem}; every row must be in one of TRL's "
                      "preference formats: prompt/chosen/rejected strings, or message lists "
                      "([{role, content}, ...]) for chosen and rejected (and the prompt, if given)")


def _conversational_parts(prompt, chosen, rejected):
    """Prompt turns and the chosen/rejected turns after them. An explicit message-list prompt is taken as
    it is; else the turns chosen and rejected share are the prompt (TRL's extract_prompt), and a plain
    prompt string becomes the user turn when they share none (chosen/rejected hold the answers only)."""
    from trl.data_utils import extract_prompt

    from pipeline.models.chat import is_messages

    if is_messages(prompt):
        return prompt, chosen, rejected
    parts = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not parts["prompt"] and isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}], chosen, rejected
    return parts["prompt"], parts["chosen"], parts["rejected"]


def _render(prompt: list, chosen: list, rejected: list, tokenizer) -> dict:
    """One conversational pair as the policy's chat template renders it (TRL's apply_chat_template: the
    prompt with the generation prompt, each response as the template continues it); whitespace after a
    response's final EOS is cut, so that TRL's DPO does not add a second EOS."""
    from trl.data_utils import apply_chat_template

    text = apply_chat_template({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer)
    eos = tokenizer.eos_token or ""
    for role in ("chosen", "rejected"):
        if eos and text[role].rstrip().endswith(eos):
            text[role] = text[role].rstrip()
    return {"prompt": text["prompt"], "chosen": text["chosen"], "rejected": text["rejected"],
            "prompt_turns": prompt, "messages": prompt + chosen}


def _has_content(turns) -> bool:
    return isinstance(turns, list) and any(str(m.get("content") or "").strip() for m in turns)


def convert(cfg: PipelineConfig, dataset, tokenizer=None) -> Converted:
    """Rows of one split in the standard explicit-prompt form; empty and identical pairs counted, not kept.

    Conversational rows (message lists) are rendered with `tokenizer`'s chat template into strings (a
    row then also keeps `messages`, prompt + chosen turns, for SFT); without a tokenizer (the launch
    check, the tiny tokenizer's texts) they stay message lists."""
    from pipeline.models.chat import is_messages

    explicit = check_columns(cfg, list(dataset.column_names))
    names = column_names(cfg)
    out = Converted(rows=[], total=len(dataset), implicit_prompt=not explicit)
    for index, row in enumerate(dataset):
        chosen, rejected = row[names["chosen"]], row[names["rejected"]]
        prompt = row[names["prompt"]] if explicit else None
        conversational = is_messages(chosen) or is_messages(rejected)
        if conversational and not (is_messages(chosen) and is_messages(rejected)):
            raise _row_error(cfg, index, "one of chosen and rejected is a message list and the other is not")
        if not conversational and any(isinstance(v, (list, dict)) for v in (prompt, chosen, rejected)):
            raise _row_error(cfg, index, "a value is a list or mapping but not a message list")
        out.conversational = out.conversational or conversational
        if conversational:
            if chosen == rejected:
                out.dropped["identical"] += 1
                continue
            prompt, chosen, rejected = _conversational_parts(prompt, chosen, rejected)
            if not (prompt and _has_content(chosen) and _has_content(rejected)):
                out.dropped["empty"] += 1
                continue
            if chosen == rejected:
                out.dropped["identical"] += 1
                continue
            out.rows.append(_render(prompt, chosen, rejected, tokenizer) if tokenizer is not None
                            else {"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        if not (isinstance(chosen, str) and chosen.strip() and isinstance(rejected, str) and rejected.strip()):
            out.dropped["empty"] += 1
            continue
        if chosen == rejected:
            out.dropped["identical"] += 1
            continue
        if not explicit:
            from trl.data_utils import extract_prompt

            parts = extract_prompt({"chosen": chosen, "rejected": rejected})
            prompt, chosen, rejected = parts["prompt"], parts["chosen"], parts["rejected"]
        if not (isinstance(prompt, str) and prompt.strip() and chosen.strip() and rejected.strip()):
            out.dropped["empty"] += 1
            continue
        if chosen == rejected:
            out.dropped["identical"] += 1
            continue
        out.rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def prompt_key(prompt) -> str:
    """A prompt as a set or dict key: the string itself, or a message list as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def fixed_prompts(cfg: PipelineConfig, train: Converted, tokenizer=None) -> list:
    """eval.fixed_prompts as the eval prompts hold them: for chat data rendered with a tokenizer, each one
    the first user turn of a chat (generation prompt added)."""
    if train.conversational and tokenizer is not None:
        from pipeline.models.chat import user_turn

        return [user_turn(tokenizer, p) for p in cfg.eval.fixed_prompts]
    return list(cfg.eval.fixed_prompts)


def prompt_turns(train: Converted, eval_rows: Converted | None) -> dict[str, list]:
    """Chat data rendered with a tokenizer: each rendered prompt's messages."""
    rows = train.rows + (eval_rows.rows if eval_rows is not None else [])
    return {r["prompt"]: r["prompt_turns"] for r in rows if "prompt_turns" in r}


def held_out_prompts(cfg: PipelineConfig, train: Converted, eval_rows: Converted | None, tokenizer=None) -> list:
    """The eval prompts (after eval.fixed_prompts): from eval.prompt_split's rows when given, else held out of
    the training rows; distinct, in an order set by the run's seed, none of them a fixed prompt. With a
    tokenizer, prompts too long to sample eval.max_new_tokens after them within the trained length are skipped."""
    from pipeline.models.chat import encode

    source = eval_rows.rows if eval_rows is not None else train.rows
    fixed = {prompt_key(p) for p in fixed_prompts(cfg, train, tokenizer)}
    distinct = {prompt_key(r["prompt"]): r["prompt"] for r in source if prompt_key(r["prompt"]) not in fixed}
    prompts = list(distinct.values())
    random.Random(cfg.seed).shuffle(prompts)
    if tokenizer is not None:
        limit = max(cfg.data.prompt_max_tokens, cfg.dpo.max_length - cfg.eval.max_new_tokens)
        prompts = [p for p in prompts if len(encode(tokenizer, p)) <= limit]
    return prompts[:cfg.eval.num_prompts - len(cfg.eval.fixed_prompts)]


def load(cfg: PipelineConfig, snapshot: str | None = None, tokenizer=None) -> tuple[Converted, Converted | None]:
    """The converted training split and, with eval.prompt_split, the converted eval split (chat data
    rendered with `tokenizer` when one is given)."""
    train = convert(cfg, open_split(cfg, cfg.pairs.train_split, "pairs.train_split", snapshot), tokenizer)
    eval_rows = None
    if cfg.eval.prompt_split is not None:
        eval_rows = convert(cfg, open_split(cfg, cfg.eval.prompt_split, "eval.prompt_split", snapshot), tokenizer)
    return train, eval_rows


def training_rows(train: Converted, eval_prompts: list) -> list[dict]:
    """The training rows whose prompt is not an eval prompt (held-out prompts are never trained on)."""
    held = {prompt_key(p) for p in eval_prompts}
    return [r for r in train.rows if prompt_key(r["prompt"]) not in held]


def drop_too_long(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Rows whose prompt + chosen or prompt + rejected fit in `max_length` tokens, and how many did not."""
    from pipeline.models.chat import encode

    kept = []
    for row in rows:
        longest = max(len(encode(tokenizer, row["prompt"] + row[role])) for role in ("chosen", "rejected"))
        if longest <= max_length:
            kept.append(row)
    return kept, len(rows) - len(kept)


def check_before_submit(cfg: PipelineConfig, snapshot: str | None = None) -> dict:
    """At launch (after prefetch): the splits exist, the columns are there, the format is supported and
    rows are left to train on and to hold out. Returns the counts (rows, usable, dropped per reason)."""
    train, eval_rows = load(cfg, snapshot)
    held = held_out_prompts(cfg, train, eval_rows)
    usable = training_rows(train, held)
    if not usable:
        raise ValueError(f"{FIELD}: {cfg.pairs.dataset} split {cfg.pairs.train_split!r} has no usable rows: "
                         f"{train.total} read, dropped {train.dropped['empty']} empty and {train.dropped['identical']} "
                         f"with identical chosen/rejected" + (f", {len(train.rows)} held out for eval" if train.rows
                                                              else "") + "; give a dataset with distinct chosen and "
                         "rejected responses (or lower eval.num_prompts)")
    wanted = cfg.eval.num_prompts - len(cfg.eval.fixed_prompts)
    if len(held) < wanted:
        where = f"split {cfg.eval.prompt_split!r}" if eval_rows is not None else f"split {cfg.pairs.train_split!r}"
        raise ValueError(f"eval.num_prompts: {FIELD} {where} has {len(held)} distinct prompts to hold out, fewer "
                         f"than the {wanted} asked (eval.num_prompts={cfg.eval.num_prompts} less "
                         f"{len(cfg.eval.fixed_prompts)} fixed); lower eval.num_prompts")
    return {"rows": train.total, "usable": len(usable), "held_out_prompts": len(held),
            "conversational": train.conversational or bool(eval_rows and eval_rows.conversational), **train.dropped}
