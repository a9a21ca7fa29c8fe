"""The LoRA (peft) sections of the training stages, `sft.lora` and `dpo.lora`: off by default.

The `lora` fields of `SFTConfig` and `DPOConfig` (pipeline.config, which re-exports them); the adapters
themselves are built and loaded in `pipeline.models.adapters`.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass

from pipeline.configlib import check as _check
from pipeline.configlib import doc


@dataclass
class LoraConfig:
    """LoRA (peft) for a training stage: train low-rank adapters instead of every weight."""
    enabled: bool = doc("Train a LoRA adapter (peft) instead of every weight: checkpoints hold the adapter and its "
                        "optimizer state (MB instead of GB).", False)
    r: int = doc("Rank of the low-rank update.", 16)
    alpha: float = doc("LoRA scaling numerator: the update is scaled by alpha / r.", 32.0)
    dropout: float = doc("Dropout on the adapter's input while training, in [0, 1).", 0.0)
    target_modules: list[str] = doc("Module names to adapt (peft's target_modules: a module whose name is one of "
                                    "these or ends with '.<name>'), e.g. [c_attn, c_proj] for GPT-2, [q_proj, v_proj] "
                                    "for Llama-style models; [all-linear] = every linear layer but the output head. "
                                    "Checked against the model before anything is submitted.",
                                    factory=lambda: ["all-linear"])
    _where: InitVar[str] = "lora"

    def __post_init__(self, _where: str = "lora"):
        _check(self.r >= 1, f"{_where}.r", f"{self.r} must be >= 1, e.g. 16")
        _check(self.alpha > 0, f"{_where}.alpha", f"{self.alpha} must be > 0, e.g. 2 x r")
        _check(0 <= self.dropout < 1, f"{_where}.dropout", f"{self.dropout} must be in [0, 1), e.g. 0.05")
        _check(len(self.target_modules) >= 1 and all(self.target_modules), f"{_where}.target_modules",
               "must list at least one module name, e.g. [c_attn, c_proj] or [all-linear]")
        _check("all-linear" not in self.target_modules or len(self.target_modules) == 1, f"{_where}.target_modules",
               "all-linear already means every linear layer; give it alone or list module names instead")
        _check(len(set(self.target_modules)) == len(self.target_modules), f"{_where}.target_modules",
               "contains duplicates")


@dataclass
class DPOLoraConfig(LoraConfig):
    merge_final: bool = doc("With LoRA: write the adapter merged into the base weights to final/ (a whole model) "
                            "instead of the adapter alone; the checkpoints hold adapters either way.", False)
