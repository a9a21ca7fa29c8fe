"""LoRA adapters (peft): the peft config of a stage, the check of its target modules against the model,
loading a trained policy that is base + adapter, and merging.

Training passes `peft_config(...)` to TRL's trainers, which wrap the model: the DPO reference is then
the same model with the adapter disabled (no second copy), and the Trainer saves and resumes the
adapter (with its optimizer state) like any checkpoint. A directory holding `adapter_config.json`
is an adapter; `load_policy` / `load_policy_weights_into` turn it back into whole weights (merged)
for sampling and scoring.

Offline: peft's save looks the base model up on the hub only when `base_model_name_or_path` has no
local config.json and HF_HUB_OFFLINE is unset (peft#1452). Here the base is always a local directory
(a run's base/SFT model, a local model, or a prefetched snapshot, see `pipeline.data.hub.resolve`)
and jobs run with HF_HUB_OFFLINE=1, so no save asks the hub (tests/test_lora.py checks both).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _targets(lora: LoraConfig):
    return ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else list(lora.target_modules)


def peft_config(lora: LoraConfig):
    """peft's LoraConfig for a causal LM from the stage's `lora` section (None when LoRA is off)."""
    if not lora.enabled:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=_targets(lora), bias="none")


def check_target_modules(lora: LoraConfig, model_config, field: str) -> None:
    """Refuse target modules the model lacks (or that peft cannot adapt), naming the field, the modules
    that were not found and some the model has. `model_config` is a transformers config: the model is
    built on the meta device (no memory, no weights read), so this runs before anything is submitted."""
    if not lora.enabled or lora.target_modules == [ALL_LINEAR]:
        return
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    names = {name: module for name, module in model.named_modules() if name}
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in names.items() if isinstance(module, adaptable)})
    missing = []
    for target in lora.target_modules:
        hits = [m for name, m in names.items() if name == target or name.endswith("." + target)]
        if not any(isinstance(m, adaptable) for m in hits):
            missing.append(target)
    if missing:
        raise ValueError(f"{field}: the model ({model_config.model_type}) has no linear/embedding module named "
                         f"{', '.join(missing)}; its adaptable modules: {', '.join(leaves)} (or use [all-linear])")


def merge_adapter(model, adapter_dir: str | Path):
    """Add the adapter saved in `adapter_dir` to `model`'s weights, in place; returns the plain model."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return wrapped.merge_and_unload()


def load_policy(path: str | Path, base: str | Path, device, dtype):
    """A trained policy for sampling and scoring: whole weights in `path`, or the adapter in `path` merged
    into the model in `base` (what it was trained from)."""
    from pipeline.models.policy import load_model

    if not is_adapter(path):
        return load_model(path, device, dtype)
    return merge_adapter(load_model(base, device, dtype), path)


def load_policy_weights_into(model, path: str | Path, base: str | Path) -> None:
    """`load_weights_into` for a policy that may be an adapter: the base weights, then the adapter merged
    in place (one model for every checkpoint of an arm)."""
    from pipeline.models.policy import load_weights_into

    if not is_adapter(path):
        load_weights_into(model, path)
        return
    load_weights_into(model, base)
    merge_adapter(model, path)


def save_merged(trainer, out_dir: Path) -> None:
    """The trainer's PeftModel merged into its base and saved as a whole model to `out_dir` (the Trainer
    saves the adapter alone). In place: call it only once training is over."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.merge_and_unload().save_pretrained(str(out_dir))


def check_lora_targets(cfg, prefetched: dict) -> None:
    """Before anything is submitted (after the prefetch): the LoRA target modules of SFT and DPO exist in
    the policy model. Its config is read from the local directory, the prefetched snapshot
    (`prefetched`: what `hub.prefetch` returned) or, for 'tiny', built from the model section."""
    sections = [(lora, field) for lora, field in ((cfg.sft.lora, "sft.lora.target_modules"),
                                                  (cfg.dpo.lora, "dpo.lora.target_modules")) if lora.enabled]
    if not sections:
        return
    from transformers import AutoConfig, GPT2Config

    m = cfg.model
    if m.name == "tiny":  # the same architecture build_tiny_base makes (its vocabulary does not matter here)
        model_config = GPT2Config(vocab_size=m.embedding_rows or m.vocab_size, n_positions=m.n_positions,
                                  n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, bos_token_id=None,
                                  eos_token_id=None)
    else:
        entry = prefetched.get("model.name")
        model_config = AutoConfig.from_pretrained(entry["path"] if entry else str(Path(m.name).expanduser()))
    for lora, field in sections:
        check_target_modules(lora, model_config, field)
