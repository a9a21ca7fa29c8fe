"""speed.py's set-up: sizes (full and --tiny), the project config, models, tokenizers and synthetic data.

The policy is the pipeline's own `tiny` model at GPT-2 Large's shape (`pipeline.models.policy.build_tiny_base`,
random init, loaded with `pipeline.models.policy.load_model` / `load_tokenizer`), with a word-level tokenizer
saved over the BPE one: one whitespace-separated word is one token, so every synthetic length is exact.
No hub, no internet, no data set.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path

from bench.common import GPT2_LARGE_SHAPE


@dataclass(frozen=True)
class Sizes:
    # policy: GPT-2 built from config; embedding_rows is also the word-level tokenizer's size
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    embedding_rows: int
    # dpo: synthetic pairs (prompt tokens fixed, completion tokens uniform in [min, max])
    dpo_prompt_tokens: int
    dpo_completion_min: int
    dpo_completion_max: int
    dpo_warmup_steps: int
    dpo_steps: int
    # sft: lognormal review lengths with this median / mean, truncated at max_length (EOS included)
    sft_median: float
    sft_mean: float
    sft_max_length: int
    sft_warmup_steps: int
    sft_steps: int
    # gen: sequences sampled (prompts x 4 completions) and new tokens each
    gen_sequences: int             # sampled by the project variants (the baseline samples gen_batch_baseline)
    gen_new_tokens: int
    gen_batch: int | None          # None = the project's pairs.batch_size
    gen_batch_baseline: int
    # reward: RoBERTa-shaped classifier built from config
    clf_layers: int
    clf_hidden: int
    clf_heads: int
    clf_intermediate: int
    reward_sequences: int
    reward_tokens: int
    # eval: prompts x eval.samples_per_prompt samples, new tokens each
    eval_prompts: int
    eval_new_tokens: int
    eval_batch: int | None         # None = the project's eval.batch_size


FULL = Sizes(**GPT2_LARGE_SHAPE,
             dpo_prompt_tokens=8, dpo_completion_min=48, dpo_completion_max=192, dpo_warmup_steps=3, dpo_steps=15,
             sft_median=230, sft_mean=300, sft_max_length=1024, sft_warmup_steps=2, sft_steps=10,
             gen_sequences=1000, gen_new_tokens=128, gen_batch=None, gen_batch_baseline=256,
             clf_layers=24, clf_hidden=1024, clf_heads=16, clf_intermediate=4096, reward_sequences=128,
             reward_tokens=160, eval_prompts=100, eval_new_tokens=128, eval_batch=None)

TINY = Sizes(n_layer=2, n_embd=128, n_head=4, n_positions=256, embedding_rows=1024,
             dpo_prompt_tokens=4, dpo_completion_min=12, dpo_completion_max=48, dpo_warmup_steps=1, dpo_steps=3,
             sft_median=40, sft_mean=52, sft_max_length=128, sft_warmup_steps=1, sft_steps=3,
             gen_sequences=16, gen_new_tokens=16, gen_batch=8, gen_batch_baseline=8,
             clf_layers=2, clf_hidden=64, clf_heads=2, clf_intermediate=128, reward_sequences=32,
             reward_tokens=40, eval_prompts=4, eval_new_tokens=16, eval_batch=8)

# What the full-size numbers are projected onto (the gpt2-large preset and IMDb's train split).
IMDB_TRAIN_REVIEWS = 25_000


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers and models
# ----------------------------------------------------------------------------------------------------------------

def word(i: int) -> str:
    return f"w{i}"


def word_level_tokenizer(vocab: dict[str, int], specials: list[str], unk: str, post_processor=None, **kwargs):
    """A fast tokenizer over whitespace-separated words of `vocab` (one word = one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post_processor is not None:
        tok.post_processor = post_processor
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **kwargs)


def build_policy(sizes: Sizes, device, root: Path):
    """(model, tokenizer): the pipeline's tiny GPT-2 at `sizes`' shape (GPT-2 Large unless --tiny), random
    init, float32 on `device`, and a word-level tokenizer of `embedding_rows - 1` words w0.. plus EOS (the
    id the model was built with), saved in place of the BPE and loaded the way the stages load it."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models.policy import EOS, build_tiny_base, load_model, load_tokenizer

    shape = ModelConfig(name="tiny", n_layer=sizes.n_layer, n_embd=sizes.n_embd, n_head=sizes.n_head,
                        n_positions=sizes.n_positions, vocab_size=300, embedding_rows=sizes.embedding_rows)
    path = build_tiny_base(shape, [" ".join(word(i) for i in range(2000))], root / "policy", seed=0)
    model = load_model(path, device, torch.float32)
    eos = model.config.eos_token_id
    ids = [i for i in range(sizes.embedding_rows) if i != eos]
    vocab = {word(k): i for k, i in enumerate(ids)}
    vocab[EOS] = eos
    word_level_tokenizer(vocab, [EOS], EOS, bos_token=EOS, eos_token=EOS, pad_token=EOS, padding_side="left",
                         model_max_length=sizes.n_positions).save_pretrained(path)
    return model, load_tokenizer(path)


def model_copy(model, dtype, train: bool):
    """An independent copy of `model` in `dtype` (the base stays untouched for the next variant)."""
    clone = copy.deepcopy(model).to(dtype)
    clone.train(train)
    return clone


def build_classifier_dir(sizes: Sizes, device, root: Path) -> Path:
    """A RoBERTa-shaped 2-label classifier (random init) + word-level tokenizer saved like a hub model,
    so that `pipeline.models.reward.ClassifierReward` and a transformers pipeline load it by directory."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from pipeline.models.policy import EOS

    path = root / "classifier"
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({word(i): len(specials) + i for i in range(sizes.embedding_rows - 1)})
    vocab[EOS] = len(vocab)
    tokenizer = word_level_tokenizer(
        vocab, specials + [EOS], "<unk>",
        TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                           special_tokens=[("<s>", 0), ("</s>", 2)]),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=sizes.clf_hidden, num_hidden_layers=sizes.clf_layers,
                           num_attention_heads=sizes.clf_heads, intermediate_size=sizes.clf_intermediate,
                           max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                           label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(1)
    with torch.device(device):
        model = RobertaForSequenceClassification(config)
    model.save_pretrained(path)  # float32, like the seed's siebert checkpoint
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data (all seeded)
# ----------------------------------------------------------------------------------------------------------------

def random_words(rng: random.Random, n: int, sizes: Sizes) -> str:
    return " ".join(word(rng.randrange(sizes.embedding_rows - 1)) for _ in range(n))


def dpo_pairs(sizes: Sizes, n: int, seed: int = 0) -> list[dict]:
    """Prompt of fixed length, chosen/rejected of uniform length; completions start with a space so that
    tokenize(prompt + completion) = tokenize(prompt) + tokenize(completion) (TRL splits them that way)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = random_words(rng, sizes.dpo_prompt_tokens, sizes)
        chosen, rejected = (" " + random_words(rng, rng.randint(sizes.dpo_completion_min, sizes.dpo_completion_max),
                                               sizes) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def lognormal_lengths(sizes: Sizes, n: int, seed: int = 0) -> list[int]:
    """Review lengths in tokens (EOS included): lognormal with the given median and mean, cut at max_length."""
    rng = random.Random(seed)
    mu = math.log(sizes.sft_median)
    sigma = math.sqrt(2 * math.log(sizes.sft_mean / sizes.sft_median))  # mean = exp(mu + sigma^2 / 2)
    return [max(2, min(sizes.sft_max_length, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def sft_texts(sizes: Sizes, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed + 1)
    return [random_words(rng, length - 1, sizes) for length in lognormal_lengths(sizes, n, seed)]  # + EOS


def prompts(sizes: Sizes, n: int, cfg, seed: int = 0) -> list[str]:
    """Review prompts of data.prompt_min_tokens..prompt_max_tokens words (2..8 in the preset)."""
    rng = random.Random(seed + 2)
    return [random_words(rng, rng.randint(cfg.data.prompt_min_tokens, cfg.data.prompt_max_tokens), sizes)
            for _ in range(n)]


def reward_texts(sizes: Sizes, n: int) -> list[str]:
    rng = random.Random(3)
    return [random_words(rng, sizes.reward_tokens - 2, sizes) for _ in range(n)]  # + <s> and </s>


# ----------------------------------------------------------------------------------------------------------------
# The project's config and what the workloads share
# ----------------------------------------------------------------------------------------------------------------

def project_config(sizes: Sizes):
    """The gpt2-large preset as `launch.py` resolves it, on one process (no ZeRO), wandb off.

    Only lengths / batch sizes that --tiny must shrink are changed; everything else is the preset's.
    """
    from jobs.config import resolve_config

    sets = ["distributed.zero_stage=0", "wandb.enabled=false", f"sft.max_length={sizes.sft_max_length}",
            f"pairs.max_new_tokens={sizes.gen_new_tokens}", f"eval.max_new_tokens={sizes.eval_new_tokens}"]
    if sizes.gen_batch:
        sets.append(f"pairs.batch_size={sizes.gen_batch}")
    if sizes.eval_batch:
        sets += [f"eval.batch_size={sizes.eval_batch}", f"reward.batch_size={sizes.eval_batch}"]
    return resolve_config("gpt2-large", sets=sets)


class Context:
    """What the workloads share: sizes, device, dtypes, config, lazily built models."""

    def __init__(self, args, sizes: Sizes, device, workdir: Path):
        import torch

        from pipeline.models.policy import resolve_dtype

        self.args = args
        self.sizes = sizes
        self.device = device
        self.workdir = workdir
        self.cfg = project_config(sizes)
        self.on_gpu = device.type == "cuda"
        self.project_dtype = resolve_dtype(self.cfg.model, device)   # bf16 on a bf16 GPU, else float32
        self.baseline_dtype = torch.float32                          # what from_pretrained("gpt2-large") gives
        self.peak_tflops = args.peak_tflops if self.on_gpu else None
        self._policy = None
        self._classifier_dir = None

    @property
    def base(self):
        """The float32 base policy every variant is copied from (kept resident)."""
        if self._policy is None:
            self._policy = build_policy(self.sizes, self.device, self.workdir)
        return self._policy[0]

    @property
    def tokenizer(self):
        self.base  # noqa: B018 -- built together
        return self._policy[1]

    @property
    def n_params(self) -> int:
        return self.base.num_parameters()  # tied input/output embedding counted once

    @property
    def classifier_dir(self) -> Path:
        if self._classifier_dir is None:
            self._classifier_dir = build_classifier_dir(self.sizes, self.device, self.workdir)
        return self._classifier_dir

    def dtype_name(self, dtype) -> str:
        return str(dtype).removeprefix("torch.")

    def compiling(self, train_cfg) -> bool:
        """Whether any DPO/SFT variant compiles (then every variant warms up longer)."""
        return any(mode != "off" for mode in [train_cfg.compile, *self.args.compile_modes])
