"""Chat templates for conversational data (message lists): which template a policy tokenizer uses, and
token counts that do not double the template's special tokens.

`model.chat_template` names a built-in template or a Jinja file; unset, the tokenizer's own template is
used (an instruct model's). Conversational preference rows are rendered once, by TRL's
`apply_chat_template` (pipeline.data.preferences), so SFT, DPO, pair sampling and eval all see the
same text: the prompt with the generation prompt added, each response as the template continues it.
"""
from __future__ import annotations

from pathlib import Path

# The Zephyr layout: a role tag line per turn, each turn ended by the tokenizer's EOS. No newline after
# the EOS: a rendered response then ends on EOS, and TRL's DPO adds no second one.
ZEPHYR = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NAMED_TEMPLATES = {"zephyr": ZEPHYR}
# tokens the tiny model's tokenizer keeps whole when it is built with a named template
TEMPLATE_SPECIAL_TOKENS = {"zephyr": ["<|system|>", "<|user|>", "<|assistant|>"]}


def check_template_setting(value: str | None) -> None:
    if value is None or value in NAMED_TEMPLATES:
        return
    if not Path(value).expanduser().is_file():
        raise ValueError(f"model.chat_template: {value!r} is neither a named template ({', '.join(NAMED_TEMPLATES)}) "
                         "nor an existing Jinja file; give one of the names or the path of a template file")


def template_text(value: str) -> str:
    """The Jinja source of `model.chat_template` (a name or a file)."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    return Path(value).expanduser().read_text()


def apply_template_setting(tokenizer, value: str | None):
    """`tokenizer` with `model.chat_template` set on it (unchanged when the setting is null)."""
    if value is not None:
        tokenizer.chat_template = template_text(value)
    return tokenizer


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as a model sees it: a text rendered by a chat template already starts with the
    BOS token where the model wants one, so the tokenizer's own BOS is not added a second time."""
    ids = tokenizer(text)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value) \
        and bool(value)


def user_turn(tokenizer, prompt: str) -> str:
    """A plain prompt (e.g. eval.fixed_prompts) as the first user turn of a chat, generation prompt added."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def check_chat_template(cfg, prefetched: dict, source: str) -> None:
    """Before anything is submitted, for conversational data: the policy tokenizer has a chat template
    (model.chat_template, else its own). Read from the local directory or the prefetched snapshot;
    `source` names the conversational data (e.g. "pairs.dataset=org/prefs") in the message."""
    m = cfg.model
    if m.chat_template is not None:
        return
    fix = ("set model.chat_template to a named template (" + ", ".join(NAMED_TEMPLATES) + ") or a Jinja file, "
           "e.g. --set model.chat_template=zephyr")
    if m.name == "tiny":
        raise ValueError(f"model.chat_template: {source} is conversational (message lists) "
                         f"and the tiny model's tokenizer has no chat template; {fix}")
    from transformers import AutoTokenizer

    entry = prefetched.get("model.name")
    tokenizer = AutoTokenizer.from_pretrained(entry["path"] if entry else str(Path(m.name).expanduser()))
    if not tokenizer.chat_template:
        raise ValueError(f"model.chat_template: {source} is conversational (message lists) "
                         f"and the tokenizer of {m.name} has no chat template; {fix}")
