"""The preference-tuning methods a sweep arm can use: one declaration per method.

A method is what `sweep.methods` names and what an arm's key starts with. A trained method
(`trains=True`) is trained by the dpo stage, one array task per arm: a loss of TRL's DPOTrainer (one
`DPOConfig.loss_type`) from the pairs (`trainer="pairwise"`), or online RL on the reward itself
(`trainer="online"`: TRL's RLOOTrainer from the pair prompts); its strength is TRL's `beta` (what it
scales differs per loss, see `about`), or it has none (`has_strength=False`: Preferred-FT, whose loss
does not use beta). A method that does not train (`trains=False`: Best-of-N) is only evaluated, by the
eval stage from the SFT model; its strength is whatever `about` says (N). Adding a method is one
`Method(...)` line below; a method needing more of TRL's options says so in `trl_options` (and what it
needs of the config in `check`).

Import-light on purpose (no torch, no TRL): the config and the registry read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _no_options(cfg: Any) -> dict:
    return {}


def _no_check(cfg: Any) -> tuple[str, str] | None:
    return None


def _positive(strength: float) -> str | None:
    return None if strength > 0 else f"{strength} must be > 0 (TRL's beta)"


@dataclass(frozen=True)
class Method:
    name: str                 # in sweep.methods, sweep.strengths and arm keys ('_' becomes '-' in tags)
    label: str                # in plots and the report
    loss_type: str | None     # TRL DPOConfig.loss_type (None: not trained)
    about: str                # one line: what it optimises and what its strength means
    symbol: str = "β"         # the strength's name in plots and the report
    trl_options: Callable[[Any], dict] = _no_options  # further DPOConfig arguments, from the run config
    check: Callable[[Any], tuple[str, str] | None] = _no_check  # (field, fix) when the run config cannot run it
    trainer: str = "pairwise"  # pairwise: TRL DPOTrainer on the pairs; online: TRL RLOOTrainer on the reward
    trains: bool = True       # a dpo array task per arm; False: evaluated from the SFT model by the eval stage
    has_strength: bool = True  # False: one arm per seed, no strength in keys, tags, plots or sweep.strengths
    integer_strength: bool = False  # strengths are whole numbers (kept as int in keys, tags and the frontier)
    check_strength: Callable[[float], str | None] = _positive  # why a strength is invalid (None: valid)
    default_strengths: tuple | None = None  # strengths when sweep.strengths names none (None: dpo.betas)
    strength_tag: str = "beta"  # the word before the strength in tags ('' = none): 'ipo-beta-0.5', 'best-of-n-4'

    @property
    def tag(self) -> str:
        return self.name.replace("_", "-")


def _robust_options(cfg: Any) -> dict:
    return {"label_smoothing": cfg.dpo.label_smoothing}


def _robust_check(cfg: Any) -> tuple[str, str] | None:
    if not 0 < cfg.dpo.label_smoothing < 0.5:
        return ("dpo.label_smoothing", f"is {cfg.dpo.label_smoothing}; the robust method needs the assumed "
                                       "label-flip rate in (0, 0.5), e.g. 0.1 (at 0 it is plain DPO)")
    return None


def _online_check(cfg: Any) -> tuple[str, str] | None:
    if cfg.dpo.batch_size % cfg.online.num_generations:
        return ("dpo.batch_size", f"is {cfg.dpo.batch_size}; the online method samples online.num_generations="
                                  f"{cfg.online.num_generations} completions per prompt into each batch, so the batch "
                                  "size must be a multiple of it")
    return None


def _best_of_n_strength(strength: float) -> str | None:
    if strength != int(strength) or strength < 2:
        return f"{strength} is not a valid N: Best-of-N keeps the best of N samples, an integer >= 2 (e.g. [4, 16])"
    return None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dpo", "DPO", "sigmoid",
           "DPO (Rafailov et al. 2023), TRL's sigmoid loss; the strength beta scales the implicit KL penalty"),
    Method("ipo", "IPO", "ipo",
           "IPO (Azar et al. 2023): squared loss towards a log-ratio margin of 1/(2 tau), per completion token in "
           "TRL; the strength is tau (larger = closer to the reference)", symbol="τ"),
    Method("robust", "rDPO", "robust",
           "robust DPO (Chowdhury et al. 2024), the conservative DPO loss unbiased for preference labels flipped "
           "with probability dpo.label_smoothing; the strength is beta as for DPO",
           trl_options=_robust_options, check=_robust_check),
    Method("hinge", "hinge", "hinge",
           "hinge loss (SLiC, Zhao et al. 2023) on the beta-scaled log-ratio margin; 1/beta is the margin asked "
           "for, in nats per sequence"),
    Method("preferred_ft", "Preferred-FT", "sft",
           "Preferred-FT (the DPO paper's baseline): supervised fine-tuning on the chosen completions only, TRL's "
           "'sft' loss (mean token NLL of the chosen completion; the rejected one is ignored); no strength. "
           "It trains with the dpo section's optimiser settings (dpo.learning_rate, steps, batch), like every "
           "pairwise arm; its logged rewards/* still scale TRL's implicit reward by dpo.beta, which its loss "
           "does not use (compare its loss and logps/chosen, not its rewards/margins)",
           has_strength=False),
    Method("rloo", "RLOO (true reward)", "",
           "online RL with the ground-truth reward (the DPO paper's PPO-GT analogue): TRL's RLOO samples "
           "online.num_generations completions per pair prompt from the policy, scores them with the run's reward "
           "and maximises reward - beta * KL(policy || SFT) per sequence; the strength is beta",
           check=_online_check, trainer="online"),
    Method("best_of_n", "Best-of-N", None,
           "Best-of-N from the SFT model, no training: per prompt draw N SFT samples and keep the one with the "
           "highest reward; the strength is N (an integer >= 2); KL is measured and also given by its analytic "
           "bound log N - (N-1)/N", symbol="N", trains=False, integer_strength=True,
           check_strength=_best_of_n_strength, default_strengths=(4, 16), strength_tag=""),
)}
DEFAULT_METHOD = "dpo"  # its arms keep the beta-only keys and tags of runs made before the sweep had methods
