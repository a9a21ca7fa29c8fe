"""Model and tokenizer loading; the tiny GPT-2 + locally trained BPE for offline runs."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig, PipelineConfig
from pipeline.rundir.layout import atomic_replace_dir

EOS = "<|endoftext|>"


def setup_process(cfg: PipelineConfig) -> None:
    """Per-process determinism and CPU threading, before any model work."""
    threads = cfg.num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0)  # a job's CPU share (jobs/)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    # one line per process in its log: where a site binds tasks to CPUs, this is what it gave the rank
    cpus = sorted(os.sched_getaffinity(0))
    print(f"process: rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')} on "
          f"{os.uname().nodename}: {len(cpus)} CPU(s) {_cpu_ranges(cpus)}, torch threads {torch.get_num_threads()}",
          flush=True)
    seed_everything(cfg.seed)


def _cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (how taskset and SLURM write CPU lists)."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        start = cpu if start is None else start
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(f"{start}-{cpu}" if cpu != start else str(cpu))
            start = None
    return ",".join(parts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: PipelineConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no GPU; use --set device=cpu or run on a GPU node")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        from pipeline.runtime.distributed import cuda_device_index

        # one process per GPU, whether the task sees all of the node's GPUs or only its own
        return torch.device("cuda", cuda_device_index(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()))
    return torch.device("cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)


def build_tiny_base(cfg: ModelConfig, texts: list[str], out_dir: Path, seed: int) -> Path:
    """Train a byte-level BPE on `texts` and save it with a freshly initialised GPT-2 to `out_dir`.

    Saved with `save_pretrained`, so later stages load it exactly like a hub model.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    from pipeline.models.chat import TEMPLATE_SPECIAL_TOKENS, apply_template_setting

    # a named chat template's role tags stay whole tokens (none without a template: tiny is unchanged)
    special = [EOS, *TEMPLATE_SPECIAL_TOKENS.get(cfg.chat_template, [])]
    bpe.train_from_iterator(texts, vocab_size=cfg.vocab_size, min_frequency=2, special_tokens=special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        pad_token=EOS, padding_side="left", model_max_length=cfg.n_positions)
    apply_template_setting(tokenizer, cfg.chat_template)
    torch.manual_seed(seed)
    rows = max(len(tokenizer), cfg.embedding_rows or 0)
    config = GPT2Config(vocab_size=rows, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_replace_dir(tmp, out_dir)
    return out_dir


def load_tokenizer(path_or_name: str | Path, chat_template: str | None = None):
    """Left padding (generation) and a pad token (GPT-2 has none; EOS serves); `chat_template` is
    model.chat_template (a name or file; null keeps the tokenizer's own).

    A hub id is opened from its prefetched snapshot inside jobs (pipeline.data.hub.resolve)."""
    from transformers import AutoTokenizer

    from pipeline.data.hub import resolve
    from pipeline.models.chat import apply_template_setting

    tokenizer = AutoTokenizer.from_pretrained(resolve(path_or_name, "model"), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return apply_template_setting(tokenizer, chat_template)


# Weights a trained model is held in. bf16/fp16 are compute dtypes (the Trainer autocasts): Adam
# updates at lr 2e-5 are below bf16's resolution (2^-8 relative) for most GPT-2 weights, so bf16
# weights would silently not train.
MASTER_WEIGHTS = torch.float32


def load_model(path_or_name: str | Path, device: torch.device, dtype: torch.dtype, train: bool = False):
    """`dtype` is the compute dtype; a model loaded for training keeps float32 weights. A hub id is
    opened from its prefetched snapshot inside jobs (pipeline.data.hub.resolve)."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.hub import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve(path_or_name, "model"),
                                                 dtype=MASTER_WEIGHTS if train else dtype)
    model.to(device)
    model.train(train)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def load_weights_into(model, path: str | Path) -> None:
    """Copy the weights saved in `path` (a save_pretrained / Trainer checkpoint directory) into `model`.

    In place, so evaluating many checkpoints of one architecture reuses one model: no second copy
    is allocated, and a compiled decode step (static-cache sampling) stays valid.
    """
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors; expected a directory written by save_pretrained")
    device = next(model.parameters()).device
    state: dict = {}
    for file in files:
        state.update(load_file(str(file), device=str(device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in state}
    untied = [name for name in missing if model.get_parameter(name).data_ptr() not in loaded]  # tied: fine
    if unexpected or untied:
        raise ValueError(f"{path}: weights do not fit the model (missing {untied}, unexpected {unexpected[:5]})")
