"""Conversational preference data through the policy's chat template (issue 18, item 2).

Rendering, counting and refusals are unit tests on a tiny tokenizer; one slow test runs the tiny
model end to end on a local conversational JSONL file with model.chat_template=zephyr."""
import json
import random

import pytest

from conftest import launch
from jobs.config import resolve_config
from pipeline.data import preferences
from pipeline.models.chat import ZEPHYR, encode

GOOD = ["It was wonderful and moving.", "It is great fun.", "It felt warm and beautiful.", "A delight."]
BAD = ["It was awful and boring.", "A terrible mess.", "It felt dull and sad.", "A waste."]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_chat_prefs(path, n=60):
    """n rows in TRL's conversational implicit-prompt form (the user turn repeated in chosen and rejected)."""
    rng = random.Random(0)
    rows = [{"chosen": [user(f"What did you think of film {i}?"), assistant(rng.choice(GOOD))],
             "rejected": [user(f"What did you think of film {i}?"), assistant(rng.choice(BAD))]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(GOOD + BAD + ["What did you think of film"] * 5, vocab_size=300,
                            special_tokens=["</s>", "<|user|>", "<|assistant|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = ZEPHYR
    return tokenizer


def test_conversational_rows_are_rendered_with_the_chat_template(chat_tokenizer, tmp_path):
    from datasets import Dataset

    cfg = resolve_config("tiny", sets=["pairs.source=dataset", f"pairs.dataset={tmp_path}"])
    rows = Dataset.from_list([
        {"chosen": [user("How was it?"), assistant("Great.")], "rejected": [user("How was it?"), assistant("Bad.")]},
        {"chosen": [user("Same?"), assistant("Yes.")], "rejected": [user("Same?"), assistant("Yes.")]},
        {"chosen": [user("Empty?"), assistant(" ")], "rejected": [user("Empty?"), assistant("No.")]}])
    out = preferences.convert(cfg, rows, chat_tokenizer)
    assert out.conversational and out.total == 3
    assert out.dropped == {"empty": 1, "identical": 1, "too_long": 0}
    assert out.rows == [{"prompt": "<|user|>\nHow was it?</s><|assistant|>\n", "chosen": "Great.</s>",
                         "rejected": "Bad.</s>", "prompt_turns": [user("How was it?")],
                         "messages": [user("How was it?"), assistant("Great.")]}]
    # without a tokenizer (the launch check) the turns stay message lists, counted the same way
    unrendered = preferences.convert(cfg, rows)
    assert unrendered.rows == [{"prompt": [user("How was it?")], "chosen": [assistant("Great.")],
                                "rejected": [assistant("Bad.")]}] and unrendered.dropped == out.dropped


def test_explicit_prompts_as_messages_or_as_a_string(chat_tokenizer, tmp_path):
    from datasets import Dataset

    cfg = resolve_config("tiny", sets=["pairs.source=dataset", f"pairs.dataset={tmp_path}"])
    as_messages = Dataset.from_list([{"prompt": [user("Hi?")], "chosen": [assistant("Yes.")],
                                      "rejected": [assistant("No.")]}])
    # UltraFeedback-binarized style: a prompt string, and chosen/rejected holding the user turn again
    as_string = Dataset.from_list([{"prompt": "Hi?", "chosen": [user("Hi?"), assistant("Yes.")],
                                    "rejected": [user("Hi?"), assistant("No.")]}])
    answers_only = Dataset.from_list([{"prompt": "Hi?", "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}])
    expected = {"prompt": "<|user|>\nHi?</s><|assistant|>\n", "chosen": "Yes.</s>", "rejected": "No.</s>"}
    for rows in (as_messages, as_string, answers_only):
        [row] = preferences.convert(cfg, rows, chat_tokenizer).rows
        assert {k: row[k] for k in expected} == expected
    mixed = Dataset.from_list([{"chosen": [user("Hi?"), assistant("Yes.")], "rejected": "No."}])
    with pytest.raises(ValueError, match=r"pairs.dataset: .* row 0: one of chosen and rejected is a message list"):
        preferences.convert(cfg, mixed, chat_tokenizer)


def test_a_templates_bos_is_not_added_twice():
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello there"] * 10, vocab_size=280, special_tokens=["<s>", "</s>"])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    assert tokenizer("<s>hello")["input_ids"][:2] == [0, 0]  # what a plain call does to a rendered prompt
    assert encode(tokenizer, "<s>hello") == tokenizer("<s>hello")["input_ids"][1:]
    assert encode(tokenizer, "hello") == tokenizer("hello")["input_ids"]  # a plain text keeps its BOS


def test_bad_chat_settings_are_refused_before_any_job(tmp_path):
    data = write_chat_prefs(tmp_path / "chat.jsonl", n=30)
    run_dir = tmp_path / "run"
    base = ["run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
            "pairs.source=dataset", "--set", f"pairs.dataset={data}", "--set", "eval.num_prompts=5"]
    proc = launch(*base, check=False, timeout=300)
    assert proc.returncode != 0 and not run_dir.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: model.chat_template: pairs.dataset=") and "has no chat template; set model.chat_template" in proc.stderr
    proc = launch(*base, "--set", "model.chat_template=llama9", check=False, timeout=300)
    assert proc.returncode != 0 and not run_dir.exists()
    assert "model.chat_template: 'llama9' is neither a named template (zephyr) nor an existing Jinja file" in proc.stderr


def write_chat_sft(path, n=80):
    """UltraChat-style SFT rows: a `messages` conversation each (two of them empty)."""
    rng = random.Random(1)
    rows = [{"messages": [user(f"Tell me about film {i}."), assistant(rng.choice(GOOD + BAD))]} for i in range(n)]
    rows += [{"messages": []}, {"messages": [user("?"), assistant(" ")]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_sft_datasets_are_refused_before_any_job(tmp_path):
    data = write_chat_prefs(tmp_path / "chat.jsonl", n=30)
    (tmp_path / "plain.jsonl").write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
    run_dir = tmp_path / "run"
    base = ["run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
            "pairs.source=dataset", "--set", f"pairs.dataset={data}", "--set", "eval.num_prompts=5",
            "--set", "model.chat_template=zephyr"]
    for sets, message in (
            (["sft.dataset=" + str(tmp_path / "plain.jsonl")],
             "sft.dataset: .* split 'train' has neither a `messages` nor a `text` column; its columns: question, answer"),
            (["sft.dataset=" + str(write_chat_sft(tmp_path / "sft.jsonl")), "sft.split=train_sft"],
             r"sft.split: sft.dataset=.* has no split 'train_sft'; its splits: train"),
            (["sft.dataset=" + str(tmp_path / "sft.jsonl"), "sft.enabled=false"],
             "sft.dataset: is set but sft.enabled=false")):
        proc = launch(*base, *(a for s in sets for a in ("--set", s)), check=False, timeout=300)
        assert proc.returncode != 0 and not run_dir.exists(), proc.stderr
        import re

        assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_a_conversational_dataset_runs_end_to_end_through_the_chat_template(tmp_path):
    """Chat data through the template, SFT on its own conversations (sft.dataset), no reward model."""
    from pipeline.rundir.layout import read_json, read_jsonl

    data = write_chat_prefs(tmp_path / "chat.jsonl")
    sft_data = write_chat_sft(tmp_path / "sft.jsonl")
    run_dir = tmp_path / "run"
    launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
           "pairs.source=dataset", "--set", f"pairs.dataset={data}", "--set", "eval.num_prompts=13",
           "--set", "dpo.betas=[0.1]", "--set", "model.chat_template=zephyr", "--set", "reward.kind=none",
           "--set", f"sft.dataset={sft_data}", "--set", "num_threads=1")
    sft_done = read_json(run_dir / "sft" / "DONE.json")
    assert (sft_done["inputs"]["dataset"], sft_done["inputs"]["train_examples"]) == (str(sft_data), 80)
    eos = "<|endoftext|>"  # the tiny tokenizer's
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    assert len(pairs) == 50 and all(p["prompt"].startswith("<|user|>\nWhat did you think of film ")
                                    and p["prompt"].endswith(f"?{eos}<|assistant|>\n") for p in pairs)
    assert all(p[r].endswith(eos) and p[r].count(eos) == 1 for p in pairs for r in ("chosen", "rejected"))
    eval_rows = read_jsonl(run_dir / "data" / "eval_prompts.jsonl")
    eval_prompts = [r["prompt"] for r in eval_rows]
    assert len(eval_prompts) == 13 and all(p.startswith("<|user|>\n") and p.endswith("<|assistant|>\n")
                                           for p in eval_prompts)
    # each keeps its conversation: what a reward model scores, through its own template
    assert all(r["prompt"] == f"<|user|>\n{r['turns'][0]['content']}{eos}<|assistant|>\n" for r in eval_rows)
    assert not {p["prompt"] for p in pairs} & set(eval_prompts)  # held-out prompts are not trained on
    assert read_json(run_dir / "pairs" / "DONE.json")["metrics"]["conversational"] is True
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft" / "final")  # the template travels with the model
    assert tokenizer.chat_template == ZEPHYR
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") != tokenizer.unk_token_id
    assert len(tokenizer("<|assistant|>")["input_ids"]) == 1  # a whole token, not bytes
    # no reward model: the y-axis is held-out preference accuracy; the reference against itself ties (0.5)
    eval_pairs = read_jsonl(run_dir / "data" / "eval_pairs.jsonl")
    assert len(eval_pairs) == 10 and {p["prompt"] for p in eval_pairs} <= set(eval_prompts)
    rows = list(csvrows(run_dir / "eval" / "frontier.csv"))
    assert [r["policy"] for r in rows] == ["sft"] + ["dpo"] * (len(rows) - 1) and len(rows) >= 2
    assert float(rows[0]["reward"]) == 0.5 and float(rows[-1]["reward"]) >= 0.8  # good vs bad answers: learnt
    assert read_json(run_dir / "eval" / "policies" / "sft.json")["accuracy_pairs"] == 10
    assert "held-out preference accuracy over 10 pairs" in (run_dir / "eval" / "report.md").read_text()
    examples = read_json(run_dir / "eval" / "policies" / "sft.json")["examples"]
    fixed = resolve_config("tiny").eval.fixed_prompts
    assert [e["prompt"] for e in examples] == [f"<|user|>\n{p}{eos}<|assistant|>\n" for p in fixed]
    assert all(e["reward"] is None for e in examples)


def csvrows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_preference_accuracy_counts_the_implicit_reward_margin(chat_tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.evaluation.accuracy import pair_samples, preference_accuracy
    from pipeline.evaluation.sampling import completion_logprobs

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=len(chat_tokenizer), n_positions=64, n_embd=32, n_layer=1,
                                     n_head=2)).eval()
    policy = GPT2LMHeadModel(ref.config).eval()  # another random model: margins of both signs
    pairs = [{"prompt": f"<|user|>\nQ{i}?</s><|assistant|>\n", "chosen": GOOD[i % 4] + "</s>",
              "rejected": BAD[(i + 1) % 4] + "</s>"} for i in range(12)]
    same = preference_accuracy(ref, ref, chat_tokenizer, pairs, batch_size=5)
    assert (same["accuracy"], same["ties"], same["pairs"], same["accuracy_stderr"]) == (0.5, 12, 12, 0.0)
    got = preference_accuracy(policy, ref, chat_tokenizer, pairs, batch_size=5)
    pad = chat_tokenizer.pad_token_id
    samples = pair_samples(chat_tokenizer, pairs)
    ratio = (completion_logprobs(policy, samples, pad)["logp"] - completion_logprobs(ref, samples, pad)["logp"])
    margins = ratio[0::2] - ratio[1::2]
    assert got["accuracy"] == pytest.approx(float((margins > 0).double().mean()))
    assert got["mean_margin"] == pytest.approx(float(margins.mean()), abs=1e-6) and 0 < got["accuracy"] < 1


@pytest.mark.parametrize("sets, message", [
    ([], "reward.kind: none needs pairs.source=dataset"),
    (["pairs.source=dataset", "pairs.dataset={data}", "sweep.methods=[dpo,best_of_n]"],
     r"reward.kind: none: the method\(s\) \['best_of_n'\] need a reward"),
])
def test_no_reward_model_is_refused_where_one_is_needed(tmp_path, sets, message):
    data = write_chat_prefs(tmp_path / "chat.jsonl", n=30)
    with pytest.raises(ValueError, match=message):
        resolve_config("tiny", sets=["reward.kind=none", *(s.format(data=data) for s in sets)])
