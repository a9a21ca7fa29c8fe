"""Builders for the fixture hub's repositories: tiny stand-ins for gpt2, siebert's sentiment
classifier and stanfordnlp/imdb, laid out like the real repositories and saved the way the real
ones are (save_pretrained, parquet shards under plain_text/). A few seconds on one CPU thread.
"""
from __future__ import annotations

import random
from pathlib import Path

MODEL_ID = "openai-community/gpt2-tiny-test"
CLASSIFIER_ID = "siebert/sentiment-tiny-test"
DATASET_ID = "stanfordnlp/imdb-tiny-test"
# the tiny-chat preset's repositories (jobs/presets.py names the same ids)
CHAT_MODEL_ID = "slurm-dpo/tiny-chat-gpt2"
CHAT_PREFS_ID = "slurm-dpo/tiny-chat-prefs"
CHAT_REWARD_ID = "slurm-dpo/tiny-chat-reward"
SPLIT_ROWS = {"train": 240, "test": 200, "unsupervised": 60}
CLASSIFIER_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}

# Mirrors the real stanfordnlp/imdb dataset card: one config whose splits are the parquet shards.
IMDB_README = """---
language:
- en
license: other
task_categories:
- text-classification
dataset_info:
  config_name: plain_text
  features:
  - name: text
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': neg
          '1': pos
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
  - split: unsupervised
    path: plain_text/unsupervised-*
  default: true
---

# IMDb (tiny test copy)

Generated reviews in the layout of stanfordnlp/imdb, for offline tests.
"""

GITATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n" \
                "*.parquet filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"


def imdb_like_reviews(n: int, seed: int) -> list[dict]:
    """`make_corpus` reviews with IMDb's `<br /><br />` paragraph breaks between some sentences."""
    from pipeline.data.corpus import make_corpus

    rng = random.Random(seed)
    rows = []
    for row in make_corpus(n, seed, max_sentences=5):
        sentences = row["text"].split(". ")
        text = sentences[0]
        for sentence in sentences[1:]:
            text += (".<br /><br />" if rng.random() < 0.4 else ". ") + sentence
        rows.append({"text": text, "label": row["label"]})
    rows[0]["text"] += "<br /><br />A final paragraph."  # at least one review always has the tag
    return rows


def build_imdb_dataset(out_dir: Path, rows: dict[str, int] = SPLIT_ROWS) -> Path:
    """plain_text/{split}-00000-of-00001.parquet with `text` and `label` (unsupervised: -1), plus the card."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    (out_dir / "plain_text").mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(rows.items()):
        reviews = imdb_like_reviews(n, seed=100 + i)
        labels = [-1] * n if split == "unsupervised" else [r["label"] for r in reviews]
        table = pa.table({"text": pa.array([r["text"] for r in reviews], pa.string()),
                          "label": pa.array(labels, pa.int64())})
        pq.write_table(table, out_dir / "plain_text" / f"{split}-00000-of-00001.parquet")
    (out_dir / "README.md").write_text(IMDB_README)
    (out_dir / ".gitattributes").write_text(GITATTRIBUTES)
    return out_dir


def build_tiny_gpt2(out_dir: Path, texts: list[str]) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE trained on `texts` (the project's own tiny builder),
    plus the extra formats real hub repos carry, which prefetch must skip."""
    from pipeline.config import ModelConfig
    from pipeline.models.policy import build_tiny_base

    cfg = ModelConfig(name="tiny", n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=400)
    out_dir = build_tiny_base(cfg, texts, Path(out_dir), seed=0)
    (out_dir / "pytorch_model.bin").write_bytes(b"not a checkpoint: prefetch must skip *.bin next to safetensors")
    (out_dir / "tf_model.h5").write_bytes(b"not a checkpoint")
    (out_dir / "onnx").mkdir()
    (out_dir / "onnx" / "model.onnx").write_bytes(b"not a model")
    (out_dir / "onnx" / "config.json").write_text("{}")
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# gpt2 (tiny test copy)\n")
    (out_dir / ".gitattributes").write_text(GITATTRIBUTES)
    return out_dir


def fit(model, steps: int, batch_loss) -> None:
    """A few AdamW steps on `batch_loss()` (a fresh batch each call); leaves the model in eval mode."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch_loss().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_classifier(out_dir: Path, rows: list[dict], steps: int = 60, seed: int = 0) -> Path:
    """A tiny RobertaForSequenceClassification (NEGATIVE/POSITIVE) with a RoBERTa BPE tokenizer,
    trained for a few steps on `rows` so that positive reviews score higher than negative ones."""
    import tempfile

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in rows]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        # transformers 5 takes the vocab/merges files as `vocab`/`merges` (vocab_file is silently ignored)
        tokenizer = RobertaTokenizerFast(vocab=f"{tmp}/vocab.json", merges=f"{tmp}/merges.txt", model_max_length=512)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           id2label=dict(CLASSIFIER_LABELS), label2id={v: k for k, v in CLASSIFIER_LABELS.items()})
    model = RobertaForSequenceClassification(config)
    rng = random.Random(seed)

    def batch_loss():
        batch = rng.sample(rows, 32)
        enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        return model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss

    fit(model, steps, batch_loss)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text("---\nlanguage: en\n---\n# sentiment classifier (tiny test copy)\n")
    (out_dir / ".gitattributes").write_text(GITATTRIBUTES)
    return out_dir


def split_card(title: str, splits=("train_prefs", "test_prefs")) -> str:
    """A dataset card naming one parquet file pattern per split (how UltraFeedback-binarized declares its splits)."""
    files = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in splits)
    return f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n# {title}\n"


CHAT_PREFS_CARD = split_card("chat preference pairs (tiny test copy, UltraFeedback-binarized layout)")

CHAT_GOOD = ["It was wonderful and moving.", "I loved it, a great film.", "A warm and beautiful story.",
             "Brilliant acting, a delight.", "Funny and clever, I enjoyed it."]
CHAT_BAD = ["It was awful and boring.", "I hated it, a terrible film.", "A dull and sad mess.",
            "Painful acting, a waste.", "Slow and stupid, I regret it."]
CHAT_SUBJECTS = ["the ending", "the music", "the lead actor", "the story", "the film", "the sequel", "the cast"]


def chat_preference_rows(n: int, seed: int) -> list[dict]:
    """UltraFeedback-binarized-shaped rows: a prompt string, chosen/rejected conversations repeating it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = f"What did you think of {rng.choice(CHAT_SUBJECTS)} of film {seed * 1000 + i}?"
        turn = {"role": "user", "content": question}
        rows.append({"prompt": question,
                     "chosen": [turn, {"role": "assistant", "content": rng.choice(CHAT_GOOD)}],
                     "rejected": [turn, {"role": "assistant", "content": rng.choice(CHAT_BAD)}],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def build_chat_prefs(out_dir: Path, splits: dict[str, int] = {"train_prefs": 120, "test_prefs": 24}) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    for index, (split, n) in enumerate(splits.items()):
        pq.write_table(pa.Table.from_pylist(chat_preference_rows(n, seed=index + 1)),
                       out_dir / "data" / f"{split}-00000-of-00001.parquet")
    (out_dir / "README.md").write_text(CHAT_PREFS_CARD)
    (out_dir / ".gitattributes").write_text(GITATTRIBUTES)
    return out_dir


def build_tiny_chat_model(out_dir: Path) -> Path:
    """A 2-layer GPT-2 whose tokenizer has a chat template (the zephyr layout, its tags whole tokens)."""
    from pipeline.config import ModelConfig
    from pipeline.models.policy import build_tiny_base

    texts = [m["content"] for r in chat_preference_rows(200, seed=9) for m in r["chosen"] + r["rejected"]]
    cfg = ModelConfig(name="tiny", chat_template="zephyr", n_layer=2, n_embd=64, n_head=2, n_positions=128,
                      vocab_size=400)
    out_dir = build_tiny_base(cfg, texts, Path(out_dir), seed=0)
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# tiny chat model (test copy)\n")
    (out_dir / ".gitattributes").write_text(GITATTRIBUTES)
    return out_dir


def build_tiny_reward_model(out_dir: Path, steps: int = 80, seed: int = 0) -> Path:
    """A one-output GPT-2 reward model with its own chat template (the zephyr layout), fitted for a few
    Bradley-Terry steps so that the chosen answers of chat_preference_rows score above the rejected."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from pipeline.models.chat import ZEPHYR

    out_dir = Path(out_dir)
    rows = chat_preference_rows(200, seed=11)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([m["content"] for r in rows for m in r["chosen"] + r["rejected"]], vocab_size=400,
                            min_frequency=2, special_tokens=["</s>", "<pad>", "<|user|>", "<|assistant|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>",
                                        model_max_length=256)
    tokenizer.chat_template = ZEPHYR
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1,
                                                     n_head=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                                                     bos_token_id=tokenizer.eos_token_id,
                                                     eos_token_id=tokenizer.eos_token_id))
    rng = random.Random(seed)

    def batch_loss():  # Bradley-Terry: chosen above rejected
        batch = rng.sample(rows, 16)
        texts = [tokenizer.apply_chat_template(r[role], tokenize=False) for role in ("chosen", "rejected") for r in batch]
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        scores = model(**enc).logits[:, 0]
        return -torch.nn.functional.logsigmoid(scores[:16] - scores[16:]).mean()

    fit(model, steps, batch_loss)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# tiny reward model (test copy)\n")
    (out_dir / ".gitattributes").write_text(GITATTRIBUTES)
    return out_dir


def build_all(root: Path):
    """Every fixture repository under `root`; returns hub_fixture.HubRepos."""
    from hub_fixture import HubRepos

    root = Path(root)
    dataset = build_imdb_dataset(root / "dataset")
    corpus = imdb_like_reviews(400, seed=7)
    model = build_tiny_gpt2(root / "gpt2", [r["text"] for r in corpus])
    classifier = build_tiny_classifier(root / "classifier", corpus)
    chat = {("model", CHAT_MODEL_ID): build_tiny_chat_model(root / "chat-gpt2"),
            ("dataset", CHAT_PREFS_ID): build_chat_prefs(root / "chat-prefs"),
            ("model", CHAT_REWARD_ID): build_tiny_reward_model(root / "chat-reward")}
    return HubRepos(model_id=MODEL_ID, classifier_id=CLASSIFIER_ID, dataset_id=DATASET_ID,
                    dirs={("model", MODEL_ID): model, ("model", CLASSIFIER_ID): classifier,
                          ("dataset", DATASET_ID): dataset, **chat})
