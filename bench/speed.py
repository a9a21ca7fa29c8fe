#!/usr/bin/env python3
"""Speed benchmark (not a test, not part of CI): each workload of the pipeline timed twice in ONE run on
the same machine, once with library defaults ("baseline") and once with this project's own stage
settings ("project", plus a variant or two), so the ratios are same-machine.

  dpo     DPO steps/s and MFU, 8 pairs per step: TRL DPOTrainer with TRL defaults vs the gpt2-large preset
          through the stage code (length-grouped batches, precomputed reference, fp32 master weights +
          autocast), and the preset with torch.compile (--compile-modes)
  sft     SFT tokens/s and MFU on an IMDb-like length distribution: TRL SFTTrainer defaults vs the preset
          (packed rows), the preset with padded batches, and with torch.compile
  gen     sampling for the pairs stage: new tokens/s, plain HF generate vs pipeline.sampling.sample_completions
          (static cache, batch 500) and the same with the dynamic cache; projected for 1,000 prompts x 4 x 128
  reward  classifier scoring, sequences/s for 128 x 160 tokens (transformers pipeline defaults vs
          pipeline.reward.ClassifierReward)
  eval    one policy's evaluation (pipeline.stages.eval.evaluate_policy: sampling + reward + KL), 100 prompts x 4

Models are built from their configs with random weights (GPT-2 Large, RoBERTa-large shaped classifier),
tokenizers are word-level ones built here (one word = one token, so sequence lengths are exact): no hub,
no internet. The project rows use the `gpt2-large` preset with distributed.zero_stage=0 (one process, no
DeepSpeed) and wandb off.

  python bench/speed.py --out /tmp/speed.json                    # one GPU (a few minutes)
  OMP_NUM_THREADS=1 python bench/speed.py --tiny --out /tmp/speed_tiny.json   # CPU smoke run (under a minute)
  python bench/speed.py --only dpo,sft --peak-tflops 989 --out /tmp/speed.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKLOADS = ("dpo", "sft", "gen", "reward", "eval")
EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------------------------
# Sizes: everything --tiny changes
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    # policy: GPT-2 built from config
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab: int
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


FULL = Sizes(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab=50257,
             dpo_prompt_tokens=8, dpo_completion_min=48, dpo_completion_max=192, dpo_warmup_steps=3, dpo_steps=15,
             sft_median=230, sft_mean=300, sft_max_length=1024, sft_warmup_steps=2, sft_steps=10,
             gen_sequences=1000, gen_new_tokens=128, gen_batch=None, gen_batch_baseline=256,
             clf_layers=24, clf_hidden=1024, clf_heads=16, clf_intermediate=4096, reward_sequences=128,
             reward_tokens=160, eval_prompts=100, eval_new_tokens=128, eval_batch=None)

TINY = Sizes(n_layer=2, n_embd=128, n_head=4, n_positions=256, vocab=1024,
             dpo_prompt_tokens=4, dpo_completion_min=12, dpo_completion_max=48, dpo_warmup_steps=1, dpo_steps=3,
             sft_median=40, sft_mean=52, sft_max_length=128, sft_warmup_steps=1, sft_steps=3,
             gen_sequences=16, gen_new_tokens=16, gen_batch=8, gen_batch_baseline=8,
             clf_layers=2, clf_hidden=64, clf_heads=2, clf_intermediate=128, reward_sequences=32,
             reward_tokens=40, eval_prompts=4, eval_new_tokens=16, eval_batch=8)

# What the full-size numbers are projected onto (the gpt2-large preset and IMDb's train split).
IMDB_TRAIN_REVIEWS = 25_000


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: device sync, memory, timing
# ----------------------------------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


_resident_bytes = 0  # GPU memory allocated when the current variant started (e.g. the bench's base model)


def reset_peak(device) -> None:
    """Start a variant's memory measurement: peak_gib() reports what it adds on top of what is resident now."""
    global _resident_bytes
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _resident_bytes = torch.cuda.memory_allocated(device)


def peak_gib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - _resident_bytes) / 2**30, 2)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def timed_method(cls, name: str, record: list[float], device):
    """Temporarily wrap `cls.name` so each call's wall time is appended to `record`."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        sync(device)
        record.append(time.perf_counter() - start)
        return result

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


def timed(fn, device):
    """(result, seconds) of fn(), synchronised on both ends."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# Models, tokenizers, data (all synthetic, all seeded)
# ----------------------------------------------------------------------------------------------------------------

def word(i: int) -> str:
    return f"w{i}"


def policy_tokenizer(sizes: Sizes):
    """Word-level tokenizer: `vocab - 1` words w0.. plus EOS as the last id (like GPT-2's 50256).

    One whitespace-separated word is one token, so every synthetic length below is exact.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(sizes.vocab - 1)}
    vocab[EOS] = sizes.vocab - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   padding_side="left", model_max_length=sizes.n_positions)


def build_policy(sizes: Sizes, device, seed: int = 0):
    """GPT-2 (Large unless --tiny) from its config, random init, float32, built directly on `device`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = sizes.vocab - 1
    config = GPT2Config(vocab_size=sizes.vocab, n_positions=sizes.n_positions, n_embd=sizes.n_embd,
                        n_layer=sizes.n_layer, n_head=sizes.n_head, bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=eos)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = eos
    return model.eval()


def model_copy(model, dtype, train: bool):
    """An independent copy of `model` in `dtype` (the base stays untouched for the next variant)."""
    clone = copy.deepcopy(model).to(dtype)
    clone.train(train)
    return clone


def random_words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(word(rng.randrange(vocab - 1)) for _ in range(n))


def dpo_pairs(sizes: Sizes, n: int, seed: int = 0) -> list[dict]:
    """Prompt of fixed length, chosen/rejected of uniform length; completions start with a space so that
    tokenize(prompt + completion) = tokenize(prompt) + tokenize(completion) (TRL splits them that way)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = random_words(rng, sizes.dpo_prompt_tokens, sizes.vocab)
        chosen, rejected = (" " + random_words(rng, rng.randint(sizes.dpo_completion_min, sizes.dpo_completion_max),
                                               sizes.vocab) for _ in range(2))
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
    return [random_words(rng, length - 1, sizes.vocab) for length in lognormal_lengths(sizes, n, seed)]  # + EOS


def prompts(sizes: Sizes, n: int, cfg, seed: int = 0) -> list[str]:
    """Review prompts of data.prompt_min_tokens..prompt_max_tokens words (2..8 in the preset)."""
    rng = random.Random(seed + 2)
    return [random_words(rng, rng.randint(cfg.data.prompt_min_tokens, cfg.data.prompt_max_tokens), sizes.vocab)
            for _ in range(n)]


def build_classifier_dir(sizes: Sizes, device, root: Path) -> Path:
    """A RoBERTa-shaped 2-label classifier (random init) + word-level tokenizer saved like a hub model,
    so that `pipeline.reward.ClassifierReward` and a transformers pipeline load it by directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    path = root / "classifier"
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({word(i): len(specials) + i for i in range(sizes.vocab - 1)})
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                            special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(specials + [EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=512)
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


def project_config(sizes: Sizes):
    """The gpt2-large preset as the pipeline resolves it, on one process (no ZeRO), wandb off.

    Only lengths / batch sizes that --tiny must shrink are changed; everything else is the preset's.
    """
    from pipeline.config import PipelineConfig, preset_overrides
    from pipeline.configlib import deep_merge, from_dict

    layers = deep_merge(preset_overrides("gpt2-large"),
                        {"distributed": {"zero_stage": 0}, "wandb": {"enabled": False}})
    layers = deep_merge(layers, {"sft": {"max_length": sizes.sft_max_length},
                                 "pairs": {"max_new_tokens": sizes.gen_new_tokens},
                                 "eval": {"max_new_tokens": sizes.eval_new_tokens}})
    if sizes.gen_batch:
        layers = deep_merge(layers, {"pairs": {"batch_size": sizes.gen_batch}})
    if sizes.eval_batch:
        layers = deep_merge(layers, {"eval": {"batch_size": sizes.eval_batch}, "reward": {"batch_size": sizes.eval_batch}})
    return from_dict(PipelineConfig, layers, where="config")


# ----------------------------------------------------------------------------------------------------------------
# Trainer timing: per-step wall time from a callback, real tokens per step from the data collator
# ----------------------------------------------------------------------------------------------------------------

def step_timer_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall clock at train begin and after every optimizer step; the only synchronisation added."""

        def __init__(self, device):
            self.device = device
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync(self.device)
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            sync(self.device)
            self.stamps.append(time.perf_counter())

    return StepTimer


class CountingCollator:
    """Wraps the trainer's collator and records the real (non-padding) tokens of every batch it builds.

    Batches are collated in the order they are consumed (the loader may prefetch one ahead), so the
    k-th entry belongs to optimizer step k (gradient_accumulation_steps = 1).
    """

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []
        self.padded: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            real = int(mask.sum())
        elif "position_ids" in batch and "labels" in batch:
            # packed rows (no mask): the targets plus each review's first token (position 0 followed by 1);
            # right padding also has position 0 but is followed by another 0
            pos = batch["position_ids"]
            starts = (pos[:, :-1] == 0) & (pos[:, 1:] == 1)
            real = int((batch["labels"] != -100).sum()) + int(starts.sum())
        else:
            real = int(ids.numel())
        self.tokens.append(real)
        self.padded.append(int(ids.numel()))
        return batch


def run_trainer(make_trainer, warmup: int, steps: int, device) -> dict:
    """Build a trainer (timed as setup), train warmup + steps optimizer steps, time the last `steps`."""
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    trainer = make_trainer()
    sync(device)
    setup_s = time.perf_counter() - start
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-log dict prints; the table below is the output
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = step_timer_class()(device)
    trainer.add_callback(timer)
    trainer.train()
    step_times = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    if len(step_times) < warmup + steps:
        raise RuntimeError(f"only {len(step_times)} steps ran, expected {warmup + steps} (dataset too small?)")
    measured = step_times[warmup:warmup + steps]
    tokens = counter.tokens[warmup:warmup + steps]
    padded = counter.padded[warmup:warmup + steps]
    result = {"setup_s": round(setup_s, 3), "warmup_steps": warmup, "steps": steps,
              "step_times_s": [round(t, 4) for t in step_times], "measured_s": sum(measured),
              "tokens": sum(tokens), "padded_tokens": sum(padded), "peak_gib": peak_gib(device)}
    del trainer, counter, timer
    free_memory(device)
    return result


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------------------------------------------
# Workloads. Each returns a list of rows: {"workload", "variant", "settings", "value", "unit", "mfu", ...}
# ----------------------------------------------------------------------------------------------------------------

class Context:
    """What the workloads share: sizes, device, dtypes, config, lazily built models."""

    def __init__(self, args, sizes: Sizes, device, workdir: Path):
        import torch

        from pipeline.models import resolve_dtype

        self.args = args
        self.sizes = sizes
        self.device = device
        self.workdir = workdir
        self.cfg = project_config(sizes)
        self.on_gpu = device.type == "cuda"
        self.project_dtype = resolve_dtype(self.cfg.model, device)   # bf16 on a bf16 GPU, else float32
        self.baseline_dtype = torch.float32                          # what from_pretrained("gpt2-large") gives
        self.peak_tflops = args.peak_tflops if self.on_gpu else None
        self.tokenizer = policy_tokenizer(sizes)
        self._base = None
        self._classifier_dir = None

    @property
    def base(self):
        if self._base is None:
            self._base = build_policy(self.sizes, self.device)
        return self._base

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


def compiling(train_cfg, ctx: Context) -> bool:
    return any(mode != "off" for mode in [train_cfg.compile, *ctx.args.compile_modes])


def bench_dpo(ctx: Context) -> list[dict]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline.batching import dpo_trainer_class
    from pipeline.models import MASTER_WEIGHTS
    from pipeline.training import trainer_kwargs

    s, cfg, device = ctx.sizes, ctx.cfg, ctx.device
    # compiled variants compile (and record CUDA graphs) for each new batch shape during the warm-up
    warmup = s.dpo_warmup_steps + (ctx.args.compile_warmup_steps if compiling(cfg.dpo, ctx) else 0)
    steps = s.dpo_steps
    batch = cfg.dpo.batch_size
    total_steps = warmup + steps
    rows_data = dpo_pairs(s, total_steps * batch)  # exactly the steps run: precompute covers just these
    n_params = ctx.n_params
    out_dir = ctx.workdir / "dpo"

    def baseline():
        policy = model_copy(ctx.base, ctx.baseline_dtype, train=True)
        ref = model_copy(ctx.base, ctx.baseline_dtype, train=False)  # a live reference (TRL's default)
        args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=total_steps,
                         save_strategy="no", report_to=[], disable_tqdm=True, seed=cfg.seed,
                         bf16=ctx.on_gpu,  # TRL's default is bf16=True; on the CPU it is turned off
                         use_cpu=not ctx.on_gpu)
        return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows_data),
                          processing_class=ctx.tokenizer)

    def project(compile_mode: str):
        def make():
            # as pipeline/stages/dpo.py: float32 master weights + autocast, the preset's dpo settings
            dpo = dataclasses.replace(cfg.dpo, compile=compile_mode)
            policy = model_copy(ctx.base, MASTER_WEIGHTS, train=True)
            ref = None if dpo.precompute_ref_log_probs else model_copy(ctx.base, MASTER_WEIGHTS, train=False)
            kwargs = trainer_kwargs(cfg, dpo, out_dir, device, ctx.project_dtype, report_to=[])
            kwargs.update(max_steps=total_steps, save_strategy="no")
            args = DPOConfig(**kwargs, beta=dpo.betas[0], loss_type=[dpo.loss_type],
                             precompute_ref_log_probs=dpo.precompute_ref_log_probs)
            return dpo_trainer_class()(model=policy, ref_model=ref, args=args,
                                       train_dataset=Dataset.from_list(rows_data), processing_class=ctx.tokenizer)
        return make

    base_dt = ctx.dtype_name(ctx.baseline_dtype)
    amp = f"+{ctx.dtype_name(ctx.project_dtype)} autocast" if ctx.on_gpu else ""
    d = cfg.dpo
    preset = (f"preset: float32 weights{amp}, grad ckpt {'ON' if d.gradient_checkpointing else 'OFF'}, "
              f"{'precomputed' if d.precompute_ref_log_probs else 'live'} ref, group_by_length={d.group_by_length}, "
              f"pad_to_multiple_of={d.pad_to_multiple_of}")
    variants = [("baseline", f"TRL defaults: {base_dt} weights{amp}, grad ckpt ON, live ref", baseline, True),
                ("project", preset + f", compile={d.compile}", project(d.compile), not d.precompute_ref_log_probs)]
    variants += [(f"project+compile={mode}", f"as project, dpo.compile={mode}", project(mode),
                  not d.precompute_ref_log_probs) for mode in ctx.args.compile_modes if mode != d.compile]
    rows, baseline_rate = [], None
    projected_steps = math.ceil(cfg.pairs.num_prompts * math.comb(cfg.pairs.completions_per_prompt, 2) / batch)
    for name, settings, make, live_ref in variants:
        row = {"workload": "dpo", "variant": name, "settings": settings, "unit": "steps/s"}
        precompute_s: list[float] = []
        try:
            with timed_method(DPOTrainer, "_precompute_ref_logps", precompute_s, device):
                r = run_trainer(make, warmup, steps, device)
            rate = steps / r["measured_s"]
            flops = (6 + (2 if live_ref else 0)) * n_params * r["tokens"]  # policy fwd+bwd (+ reference fwd)
            row.update(value=rate, mfu=mfu(flops, r["measured_s"], ctx.peak_tflops),
                       tokens_per_step=r["tokens"] / steps, padded_tokens_per_step=r["padded_tokens"] / steps,
                       projected_s=projected_steps / rate, projected_what=f"{projected_steps} steps (one beta)", **r)
            if precompute_s:
                # the reference pass covered the total_steps batches of the dataset; charge the measured share
                share = sum(precompute_s) * steps / total_steps
                amortized = steps / (r["measured_s"] + share)
                row.update(precompute_s=round(sum(precompute_s), 3), amortized_steps_per_s=amortized,
                           amortized_mfu=mfu(8 * n_params * r["tokens"], r["measured_s"] + share, ctx.peak_tflops),
                           projected_s=projected_steps / amortized,
                           note="value excludes the reference pass; amortized_* include it (one beta; the "
                                "pipeline caches it on disk and shares it between betas)")
            if name == "baseline":
                baseline_rate = rate
            row["vs_baseline"] = rate / baseline_rate if baseline_rate else None
        except Exception as exc:  # keep going: one failed variant must not lose the whole GPU run
            row.update(value=None, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            free_memory(device)
        rows.append(row)
        if "amortized_steps_per_s" in row:
            rows.append({"workload": "dpo", "variant": f"{name} (amortized)",
                         "settings": "incl. the reference log-prob pass", "unit": "steps/s",
                         "value": row["amortized_steps_per_s"], "mfu": row["amortized_mfu"],
                         "vs_baseline": row["amortized_steps_per_s"] / baseline_rate if baseline_rate else None,
                         "projected_s": row["projected_s"], "projected_what": row["projected_what"]})
    return rows


def bench_sft(ctx: Context) -> list[dict]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.batching import sft_trainer_class
    from pipeline.models import MASTER_WEIGHTS
    from pipeline.training import trainer_kwargs

    s, cfg, device = ctx.sizes, ctx.cfg, ctx.device
    warmup = s.sft_warmup_steps + (ctx.args.compile_warmup_steps if compiling(cfg.sft, ctx) else 0)
    steps = s.sft_steps
    batch = cfg.sft.batch_size
    total_steps = warmup + steps
    # enough text for packing too: packed rows hold max_length tokens each
    expected_len = min(s.sft_mean, s.sft_max_length)
    n_texts = max(total_steps * batch, math.ceil(1.3 * total_steps * batch * s.sft_max_length / expected_len))
    texts = sft_texts(s, n_texts)
    mean_len = sum(lognormal_lengths(s, n_texts)) / n_texts
    n_params = ctx.n_params
    out_dir = ctx.workdir / "sft"

    def baseline():
        model = model_copy(ctx.base, ctx.baseline_dtype, train=True)
        args = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=total_steps,
                         max_length=s.sft_max_length, save_strategy="no", report_to=[], disable_tqdm=True,
                         seed=cfg.seed, bf16=ctx.on_gpu, use_cpu=not ctx.on_gpu)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                          processing_class=ctx.tokenizer)

    def project(packing: bool, compile_mode: str):
        def make():
            # as pipeline/stages/sft.py: float32 master weights + autocast, the preset's sft settings
            sft = dataclasses.replace(cfg.sft, packing=packing, compile=compile_mode)
            model = model_copy(ctx.base, MASTER_WEIGHTS, train=True)
            kwargs = trainer_kwargs(cfg, sft, out_dir, device, ctx.project_dtype, report_to=[])
            kwargs.update(max_steps=total_steps, save_strategy="no")
            args = SFTConfig(**kwargs, dataset_text_field="text", packing=sft.packing, packing_strategy="bfd")
            return sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                       processing_class=ctx.tokenizer)
        return make

    base_dt = ctx.dtype_name(ctx.baseline_dtype)
    amp = f"+{ctx.dtype_name(ctx.project_dtype)} autocast" if ctx.on_gpu else ""
    f = cfg.sft
    preset = f"preset: float32 weights{amp}, grad ckpt {'ON' if f.gradient_checkpointing else 'OFF'}"
    variants = [
        ("baseline", f"TRL defaults: {base_dt} weights{amp}, grad ckpt ON, padded batches", baseline),
        ("project", preset + f", packing={f.packing} (rows of max_length, per-row block-diagonal mask), "
                             f"compile={f.compile}", project(f.packing, f.compile)),
    ]
    if f.packing:
        variants.append(("project, padded", "as project, packing=False (padded batches)", project(False, f.compile)))
    variants += [(f"project+compile={mode}", f"as project, sft.compile={mode}", project(f.packing, mode))
                 for mode in ctx.args.compile_modes if mode != f.compile]
    projected_tokens = IMDB_TRAIN_REVIEWS * mean_len
    rows, baseline_rate = [], None
    for name, settings, make in variants:
        row = {"workload": "sft", "variant": name, "settings": settings, "unit": "tokens/s"}
        try:
            r = run_trainer(make, warmup, steps, device)
            rate = r["tokens"] / r["measured_s"]
            row.update(value=rate, mfu=mfu(6 * n_params * r["tokens"], r["measured_s"], ctx.peak_tflops),
                       steps_per_s=steps / r["measured_s"], tokens_per_step=r["tokens"] / steps,
                       padded_tokens_per_step=r["padded_tokens"] / steps, projected_s=projected_tokens / rate,
                       projected_what=f"1 epoch of {IMDB_TRAIN_REVIEWS} reviews (~{projected_tokens / 1e6:.1f}M tokens)",
                       **r)
            if name == "baseline":
                baseline_rate = rate
            row["vs_baseline"] = rate / baseline_rate if baseline_rate else None
        except Exception as exc:
            row.update(value=None, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            free_memory(device)
        rows.append(row)
    return rows


def _generated_lengths(new_tokens, eos: int) -> list[int]:
    lengths = []
    for row in new_tokens.tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return lengths


def bench_gen(ctx: Context) -> list[dict]:
    import torch

    from pipeline.sampling import sample_completions

    s, cfg, device, tok = ctx.sizes, ctx.cfg, ctx.device, ctx.tokenizer
    k = cfg.pairs.completions_per_prompt
    prompt_list = prompts(s, max(1, s.gen_sequences // k), cfg)
    baseline_batch = s.gen_batch_baseline
    baseline_flat = [p for p in prompt_list[:max(1, baseline_batch // k)] for _ in range(k)]
    batch = cfg.pairs.batch_size
    target_sequences = cfg.pairs.num_prompts * k
    sampling = dict(temperature=cfg.pairs.temperature, top_k=cfg.pairs.top_k, top_p=cfg.pairs.top_p)

    def hf_generate(model, max_new_tokens: int, sequences: list[str]) -> tuple[int, int]:
        """Plain `model.generate` (dynamic KV cache), left-padded batches; (tokens generated, sequences)."""
        total = 0
        for start in range(0, len(sequences), baseline_batch):
            enc = tok(sequences[start:start + baseline_batch], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
            total += sum(_generated_lengths(out[:, enc["input_ids"].shape[1]:], tok.eos_token_id))
        return total, len(sequences)

    def project(kv_cache: str):
        def run(model, max_new_tokens: int, prompt_subset: list[str]) -> tuple[int, int]:
            # as pipeline/stages/pairs.py
            groups = sample_completions(model, tok, prompt_subset, num_samples=k, max_new_tokens=max_new_tokens,
                                        batch_size=batch, seed=cfg.seed, kv_cache=kv_cache,
                                        prompt_width=cfg.data.prompt_max_tokens, **sampling)
            return sum(len(x.completion_ids) for g in groups for x in g), sum(len(g) for g in groups)
        return run

    base_dt, proj_dt = ctx.dtype_name(ctx.baseline_dtype), ctx.dtype_name(ctx.project_dtype)
    other = "dynamic" if cfg.pairs.kv_cache == "static" else "static"
    # warm-up: one full batch at the full length (a static cache's shape includes the new tokens, and on
    # a GPU its decode step is compiled and graph-captured for exactly that shape)
    warm_prompts = prompt_list[:max(1, batch // k)]
    variants = [
        ("baseline", f"HF generate, dynamic cache, {base_dt}, batch {baseline_batch}", ctx.baseline_dtype,
         lambda m, n: hf_generate(m, n, baseline_flat), lambda m: hf_generate(m, 4, baseline_flat[:baseline_batch])),
        ("project", f"sample_completions, {cfg.pairs.kv_cache} cache, {proj_dt}, batch {batch} (preset)",
         ctx.project_dtype, lambda m, n: project(cfg.pairs.kv_cache)(m, n, prompt_list),
         lambda m: project(cfg.pairs.kv_cache)(m, s.gen_new_tokens, warm_prompts)),
        (f"project, {other} cache", f"as project, pairs.kv_cache={other}", ctx.project_dtype,
         lambda m, n: project(other)(m, n, prompt_list),
         lambda m: project(other)(m, s.gen_new_tokens, warm_prompts)),
    ]
    rows, baseline_rate = [], None
    for name, settings, dtype, run, warm in variants:
        row = {"workload": "gen", "variant": name, "settings": settings, "unit": "new tokens/s"}
        try:
            reset_peak(device)
            model = model_copy(ctx.base, dtype, train=False)
            warm(model)
            (generated, sequences), seconds = timed(lambda: run(model, s.gen_new_tokens), device)
            rate = generated / seconds
            row.update(value=rate, mfu=None, sequences=sequences, new_tokens_per_sequence=s.gen_new_tokens,
                       generated_tokens=generated, seconds=seconds, sequences_per_s=sequences / seconds,
                       projected_s=seconds / sequences * target_sequences * cfg.pairs.max_new_tokens / s.gen_new_tokens,
                       projected_what=f"{target_sequences} x {cfg.pairs.max_new_tokens} new tokens "
                                      f"(pairs stage, all shards, one GPU)", peak_gib=peak_gib(device))
            if name == "baseline":
                baseline_rate = rate
            row["vs_baseline"] = rate / baseline_rate if baseline_rate else None
            model = None  # freed before the next variant's copy
        except Exception as exc:
            row.update(value=None, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        free_memory(device)
        rows.append(row)
    return rows


def reward_texts(s: Sizes, n: int) -> list[str]:
    rng = random.Random(3)
    return [random_words(rng, s.reward_tokens - 2, s.vocab) for _ in range(n)]  # + <s> and </s>


def bench_reward(ctx: Context) -> list[dict]:
    from transformers import AutoTokenizer, pipeline

    from pipeline.reward import ClassifierReward, score_in_batches

    s, cfg, device = ctx.sizes, ctx.cfg, ctx.device
    path = ctx.classifier_dir
    texts = reward_texts(s, s.reward_sequences)
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(path)(texts)["input_ids"]]
    reward_cfg = dataclasses.replace(cfg.reward, kind="classifier", model=str(path))
    target = cfg.pairs.num_prompts * cfg.pairs.completions_per_prompt

    def baseline():
        # transformers pipeline defaults: the saved dtype (float32), batch_size 1
        pipe = pipeline("text-classification", model=str(path), device=device, top_k=None, truncation=True)
        return (lambda batch: pipe(batch)), pipe.model.dtype

    def project():
        reward = ClassifierReward(reward_cfg, device)  # bfloat16 on a GPU
        return (lambda batch: score_in_batches(reward, batch, reward_cfg.batch_size)), reward._pipe.model.dtype

    variants = [("baseline", "transformers pipeline defaults: {dtype}, batch_size 1", baseline),
                ("project", f"ClassifierReward + score_in_batches: {{dtype}}, batch {reward_cfg.batch_size}, "
                            f"max_length {reward_cfg.max_length}", project)]
    rows, baseline_rate = [], None
    for name, settings, make in variants:
        row = {"workload": "reward", "variant": name, "settings": settings.format(dtype="?"), "unit": "seq/s"}
        try:
            reset_peak(device)
            score, dtype = make()
            row["settings"] = settings.format(dtype=ctx.dtype_name(dtype))
            score(texts[:min(len(texts), reward_cfg.batch_size)])  # warm-up
            _, seconds = timed(lambda: score(texts), device)
            rate = len(texts) / seconds
            row.update(value=rate, mfu=None, sequences=len(texts), tokens_per_sequence=sum(lengths) / len(lengths),
                       seconds=seconds, projected_s=target / rate,
                       projected_what=f"{target} texts (pairs stage)", peak_gib=peak_gib(device))
            if name == "baseline":
                baseline_rate = rate
            row["vs_baseline"] = rate / baseline_rate if baseline_rate else None
            score = None
        except Exception as exc:
            row.update(value=None, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        free_memory(device)
        rows.append(row)
    return rows


@contextlib.contextmanager
def timed_functions(module, names: list[str], record: dict[str, float]):
    """Temporarily replace module-level functions with versions that add their wall time to `record`
    (evaluate_policy imports them from pipeline.sampling at call time, so this sees its own calls)."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)  # returns CPU data: the device work is finished
            finally:
                record[name] = record.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def bench_eval(ctx: Context) -> list[dict]:
    import pipeline.sampling as sampling
    from pipeline.reward import ClassifierReward
    from pipeline.stages.eval import Policy, evaluate_policy

    s, device = ctx.sizes, ctx.device
    reward_cfg = dataclasses.replace(ctx.cfg.reward, kind="classifier", model=str(ctx.classifier_dir))
    cfg = dataclasses.replace(ctx.cfg, reward=reward_cfg)
    prompt_list = prompts(s, s.eval_prompts, cfg, seed=5)
    n_samples = len(prompt_list) * cfg.eval.samples_per_prompt
    full_samples = cfg.eval.num_prompts * cfg.eval.samples_per_prompt
    steps = math.ceil(cfg.pairs.num_prompts * math.comb(cfg.pairs.completions_per_prompt, 2) / cfg.dpo.batch_size)
    n_policies = 1 + len(cfg.dpo.betas) * (len(range(cfg.dpo.save_steps, steps, cfg.dpo.save_steps)) + 1)
    row = {"workload": "eval", "variant": "project", "unit": "samples/s",
           "settings": f"evaluate_policy: {ctx.dtype_name(ctx.project_dtype)}, {len(prompt_list)} prompts x "
                       f"{cfg.eval.samples_per_prompt} x {cfg.eval.max_new_tokens} tokens, batch {cfg.eval.batch_size}"}
    try:
        reset_peak(device)
        policy = model_copy(ctx.base, ctx.project_dtype, train=False)
        ref = model_copy(ctx.base, ctx.project_dtype, train=False)
        reward = ClassifierReward(cfg.reward, device)
        timed_reward = {}

        def reward_fn(texts):
            start = time.perf_counter()
            try:
                return reward(texts)
            finally:
                timed_reward["reward"] = timed_reward.get("reward", 0.0) + time.perf_counter() - start

        target = Policy(id="bench", kind="dpo", beta=cfg.dpo.betas[0], step=0, path=ctx.workdir)
        # warm-up at the measured shapes (static cache: compiled / graph-captured per shape on a GPU)
        evaluate_policy(cfg, target, policy, ref, ctx.tokenizer, reward,
                        prompt_list[:max(1, cfg.eval.batch_size // cfg.eval.samples_per_prompt)])
        parts: dict[str, float] = {}
        with timed_functions(sampling, ["sample_completions", "completion_logprobs"], parts):
            result, seconds = timed(lambda: evaluate_policy(cfg, target, policy, ref, ctx.tokenizer, reward_fn,
                                                            prompt_list), device)
        per_policy = seconds / n_samples * full_samples
        row.update(value=n_samples / seconds, mfu=None, vs_baseline=None, samples=n_samples, seconds=seconds,
                   sampling_s=parts.get("sample_completions"), kl_s=parts.get("completion_logprobs"),
                   reward_s=timed_reward.get("reward"), mean_completion_tokens=result["mean_completion_tokens"],
                   projected_s=per_policy, projected_what=f"one policy, {full_samples} samples "
                                                          f"(x{n_policies} policies = {per_policy * n_policies:.0f} s)",
                   policies_in_sweep=n_policies, peak_gib=peak_gib(device))
        policy = ref = reward = None
    except Exception as exc:
        row.update(value=None, error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    free_memory(device)
    return [row]


BENCHES = {"dpo": bench_dpo, "sft": bench_sft, "gen": bench_gen, "reward": bench_reward, "eval": bench_eval}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def fmt_seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} s" if value < 3600 else f"{value / 3600:.2f} h"


def print_table(rows: list[dict]) -> None:
    header = ["workload", "variant", "value", "unit", "MFU", "vs base", "peak GiB", "projected", "settings"]
    lines = []
    for r in rows:
        value = "ERROR" if r.get("error") else fmt(r.get("value"), ".4g")
        lines.append([r["workload"], r["variant"], value, r["unit"],
                      "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                      "-" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}x",
                      fmt(r.get("peak_gib"), ".1f"), fmt_seconds(r.get("projected_s")), r.get("settings", "")])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    print()
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    print()
    for r in rows:
        if r.get("projected_what"):
            print(f"  projected [{r['workload']} / {r['variant']}]: {r['projected_what']}")
        if r.get("error"):
            print(f"  ERROR [{r['workload']} / {r['variant']}]: {r['error']}")
        if r.get("note"):
            print(f"  note [{r['workload']} / {r['variant']}]: {r['note']}")
        if r["workload"] == "eval" and r.get("value") is not None:
            print(f"  eval breakdown: sampling {fmt(r['sampling_s'])} s, reward {fmt(r['reward_s'])} s, "
                  f"KL log-probs {fmt(r['kl_s'])} s for {r['samples']} samples")
    print()


def environment(device, args, sizes: Sizes) -> dict:
    import torch
    import transformers
    import trl

    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha, "torch_threads": torch.get_num_threads(), "tiny": args.tiny,
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "mfu_formula": "DPO: (6 N T_policy + 2 N T_ref) / (step_time * peak); SFT: 6 N T / (time * peak); "
                       "N = parameters (tied embedding once), T = real (non-padding) tokens; attention FLOPs "
                       "and gradient-checkpointing recompute not counted",
        "sizes": dataclasses.asdict(sizes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small model, few steps: a CPU smoke run")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every workload)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak dense bf16 TFLOP/s for MFU (H100/H200 SXM: 989; H100 PCIe: 756)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dpo-steps", type=int, help="measured DPO steps (after warm-up)")
    parser.add_argument("--sft-steps", type=int, help="measured SFT steps (after warm-up)")
    parser.add_argument("--compile-modes", default="reduce-overhead",
                        help="extra DPO/SFT variants with this torch.compile mode (comma-separated; '' for none)")
    parser.add_argument("--compile-warmup-steps", type=int, default=6,
                        help="extra warm-up steps (every DPO/SFT variant) when a compiled variant runs")
    args = parser.parse_args()
    from pipeline.config import COMPILE_MODES

    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    if set(args.compile_modes) - set(COMPILE_MODES):
        parser.error(f"--compile-modes: choose from {', '.join(COMPILE_MODES)}")
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(only) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sizes = TINY if args.tiny else FULL
    if args.dpo_steps:
        sizes = dataclasses.replace(sizes, dpo_steps=args.dpo_steps)
    if args.sft_steps:
        sizes = dataclasses.replace(sizes, sft_steps=args.sft_steps)

    report = {"environment": environment(device, args, sizes), "rows": []}
    print(f"device: {report['environment']['device']}  torch {torch.__version__}  "
          f"transformers {report['environment']['transformers']}  trl {report['environment']['trl']}"
          f"  workloads: {','.join(only)}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speed-bench-") as tmp:
        ctx = Context(args, sizes, device, Path(tmp))
        report["environment"]["n_params_policy"] = ctx.n_params if {"dpo", "sft", "gen", "eval"} & set(only) else None
        for name in WORKLOADS:
            if name not in only:
                continue
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                rows = BENCHES[name](ctx)
            except Exception as exc:  # set-up failures (model build, imports): record and go on
                traceback.print_exc()
                rows = [{"workload": name, "variant": "-", "unit": "-", "value": None,
                         "error": f"{type(exc).__name__}: {exc}"}]
            for row in rows:
                row["workload_wall_s"] = round(time.perf_counter() - t0, 1)
            report["rows"].extend(rows)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    report["environment"]["total_wall_s"] = round(time.perf_counter() - started, 1)
    print_table(report["rows"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    print(f"total wall time {report['environment']['total_wall_s']} s")
    return 1 if any(r.get("error") for r in report["rows"]) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
