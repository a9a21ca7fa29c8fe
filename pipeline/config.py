"""The ML configuration of a run: one dataclass per stage plus run-level settings.

Every field has a one-line help (shown by `launch.py config`); `__post_init__` rejects bad values
with a message naming the field and the fix. Presets (ML and SLURM settings together) live in
`jobs/presets.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.adapter_config import DPOLoraConfig, LoraConfig  # noqa: F401
from pipeline.configlib import check as _check
from pipeline.configlib import doc
from pipeline.model_config import DTYPES, REWARD_KINDS, ModelConfig, RewardConfig  # noqa: F401
from pipeline.source_config import PAIR_ROLES, PAIR_SOURCES, PreferenceSourceConfig, SFTSourceConfig  # noqa: F401
from pipeline.training.methods import METHODS

SEED_EVAL_PROMPTS = ["I love", "Worth the entertainment value of a", "its a"]
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KV_CACHES = ("dynamic", "static")
# transformers' SchedulerType values (a test keeps them in step), less reduce_lr_on_plateau: it needs
# an eval metric these stages do not compute.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy")
# transformers' OptimizerNames that need nothing beyond torch (a test keeps them in step).
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adafactor", "sgd", "adagrad", "rmsprop")
# TRL DPOTrainer's pairwise losses (`DPOConfig.loss_type`; a test builds a DPOConfig with each); the
# sweep's methods (`pipeline.training.methods`) each use one of them.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DataConfig:
    dataset: str = doc("Review corpus: a hub id (stanfordnlp/imdb), a local .parquet/.jsonl/.csv file or "
                       "directory with a text column, or 'tiny' (generated offline from data.seed).",
                       "stanfordnlp/imdb")
    text_field: str = doc("Column holding the review text.", "text")
    train_split: str = doc("Split used for SFT.", "train")
    prompt_split: str = doc("Held-out split the pair and eval prompts are cut from.", "test")
    max_train_examples: int | None = doc("Cap on SFT examples (null = the whole split).", None)
    tiny_reviews: int = doc("tiny only: reviews per split in the generated corpus.", 2000)
    tiny_max_sentences: int = doc("tiny only: most body sentences per generated review (1 to this many; "
                                  "~9 tokens each); 80 gives ~250 words on average, IMDb-like, for benchmarks.", 4)
    prompt_min_tokens: int = doc("Shortest prompt, in tokens (DPO paper: 2).", 2)
    prompt_max_tokens: int = doc("Longest prompt, in tokens (DPO paper: 8).", 8)

    def __post_init__(self):
        _check(bool(self.dataset), "data.dataset", "must not be empty; use a hub id, a local file or 'tiny'")
        _check(bool(self.text_field), "data.text_field", "must name the column holding the review text, e.g. text")
        for field in ("train_split", "prompt_split"):
            _check(bool(getattr(self, field)), f"data.{field}", "must name a split, e.g. train or test")
        _check(self.tiny_reviews >= 10, "data.tiny_reviews", "must be >= 10")
        _check(self.tiny_max_sentences >= 1, "data.tiny_max_sentences", "must be >= 1")
        _check(1 <= self.prompt_min_tokens <= self.prompt_max_tokens, "data.prompt_min_tokens",
               "must satisfy 1 <= prompt_min_tokens <= prompt_max_tokens")
        if self.max_train_examples is not None:
            _check(self.max_train_examples >= 1, "data.max_train_examples", "must be >= 1 or null")


@dataclass
class TrainConfig:
    """Fields shared by the SFT and DPO trainers."""
    epochs: float = doc("Training epochs over the stage's data.", 1.0)
    learning_rate: float = doc("Peak learning rate (seed: 2e-5).", 2e-5)
    lr_scheduler: str = doc("transformers scheduler name (linear, cosine, constant, ...).", "linear")
    warmup_ratio: float = doc("Fraction of steps used for linear warm-up (ignored when warmup_steps > 0).", 0.0)
    warmup_steps: int = doc("Optimizer steps of linear warm-up; > 0 overrides warmup_ratio (DPO paper: 150).", 0)
    optimizer: str = doc("transformers optimizer name: adamw_torch_fused (the Trainer's default, the seed's), "
                         "adamw_torch, rmsprop (DPO paper), sgd, adafactor, ...", "adamw_torch_fused")
    batch_size: int = doc("Per-device batch size (sequences for SFT, pairs for DPO).", 8)
    grad_accum: int = doc("Gradient accumulation steps.", 1)
    max_length: int = doc("Truncation length in tokens (prompt + completion for DPO).", 1024)
    save_steps: int = doc("Save a checkpoint every N optimizer steps.", 500)
    logging_steps: int = doc("Log metrics every N steps.", 10)
    gradient_checkpointing: bool = doc("Recompute activations to save memory (slower).", False)
    group_by_length: bool = doc("Opt-in speed path: form each batch from examples of similar length (random "
                                "megabatches sorted by length, then shuffled): less padding, every example still "
                                "seen once per epoch, but batches are no longer random, so the recipe changes.",
                                False)
    compile: str = doc("torch.compile the model for training: off, default, reduce-overhead (CUDA graphs), "
                       "max-autotune, max-autotune-no-cudagraphs. Set pad_to_multiple_of too, so only a few "
                       "shapes compile. Measure with bench/speed.py before turning it on.", "off")
    pad_to_multiple_of: int | None = doc("Pad batch lengths up to a multiple of this (null = to the longest "
                                         "sequence); bounds the shapes torch.compile sees.", None)
    keep_last: int = doc("Newest complete checkpoints kept whole (with optimizer state) for resuming; "
                         "older ones keep only the weights eval needs (DPO) or are deleted (SFT).", 2)

    def _check_train(self, section: str):
        _check(self.epochs > 0, f"{section}.epochs", "must be > 0")
        _check(self.learning_rate > 0, f"{section}.learning_rate", "must be > 0, e.g. 2e-5")
        _check(0 <= self.warmup_ratio < 1, f"{section}.warmup_ratio", "must be in [0, 1)")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps", "must be >= 0 (0 = use warmup_ratio)")
        _check(self.optimizer in OPTIMIZERS, f"{section}.optimizer",
               f"{self.optimizer!r} is not a transformers optimizer; choose one of {', '.join(OPTIMIZERS)}")
        _check(self.lr_scheduler in LR_SCHEDULERS, f"{section}.lr_scheduler",
               f"{self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        for field in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps", "keep_last"):
            _check(getattr(self, field) >= 1, f"{section}.{field}", "must be >= 1")
        _check(self.compile in COMPILE_MODES, f"{section}.compile",
               f"{self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.pad_to_multiple_of is not None:
            _check(self.pad_to_multiple_of >= 1, f"{section}.pad_to_multiple_of", "must be >= 1 or null")


@dataclass
class SFTConfig(TrainConfig, SFTSourceConfig):
    packing: bool = doc("Opt-in speed path: pack reviews into rows of max_length tokens (best-fit decreasing) "
                        "without padding; positions restart at each review and attention never crosses reviews. "
                        "Changes the recipe: a step then sees ~max_length tokens of reviews (IMDb at 1,024: ~28 "
                        "reviews) instead of batch_size reviews, and an epoch has fewer steps.", False)
    lora: LoraConfig = doc("LoRA for SFT; its checkpoints hold adapters, its final/ the adapter merged into the base "
                           "(a whole model: the pairs and DPO stages start from it and use it as the reference).",
                           factory=LoraConfig)

    def __post_init__(self):
        self._check_train("sft")
        self._check_sft_source()
        _check(not (self.packing and self.group_by_length), "sft.group_by_length",
               "has nothing to group when sft.packing=true (packed rows are all max_length); set one of them")


@dataclass
class PairsConfig(PreferenceSourceConfig):
    num_prompts: int = doc("Prompts sampled for preference pairs (seed: 1000).", 1000)
    completions_per_prompt: int = doc("Completions sampled per prompt; every pair of them is a "
                                      "preference pair (4 -> 6 pairs).", 4)
    max_new_tokens: int = doc("Completion length cap, in tokens.", 128)
    temperature: float = doc("Sampling temperature.", 1.0)
    top_k: int = doc("Top-k sampling (0 = off).", 0)
    top_p: float = doc("Nucleus sampling (1.0 = off).", 1.0)
    batch_size: int = doc("Sequences (prompt x completion) per generation batch.", 64)
    kv_cache: str = doc("KV cache for sampling: dynamic, or static (preallocated; prompts padded to "
                        "data.prompt_max_tokens and every batch to batch_size, so on a GPU the decode step "
                        "compiles once into a CUDA graph).", "dynamic")
    num_shards: int = doc("Prompt shards; on SLURM each shard is one array task.", 4)

    def __post_init__(self):
        self._check_source()
        _check(self.num_prompts >= 1, "pairs.num_prompts", "must be >= 1")
        _check(self.completions_per_prompt >= 2, "pairs.completions_per_prompt", "must be >= 2 to form a pair")
        _check(self.max_new_tokens >= 1, "pairs.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "pairs.temperature", "must be > 0")
        _check(self.top_k >= 0, "pairs.top_k", "must be >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "pairs.top_p", "must be in (0, 1]")
        _check(self.batch_size >= 1, "pairs.batch_size", "must be >= 1")
        _check(self.kv_cache in KV_CACHES, "pairs.kv_cache", f"{self.kv_cache!r} is not one of {', '.join(KV_CACHES)}")
        _check(1 <= self.num_shards <= self.num_prompts, "pairs.num_shards", "must be in [1, pairs.num_prompts]")


@dataclass
class DPOConfig(TrainConfig):
    # Fields that moved: an old key gets this hint instead of a bare "unknown key".
    MOVED_FIELDS: ClassVar[dict[str, str]] = {
        "loss_type": "sweep.methods (one arm per method, strength and seed), e.g. --set sweep.methods=[ipo]; "
                     f"methods: {', '.join(METHODS)} (dpo = TRL's sigmoid loss)"}

    betas: list[float] = doc("KL strengths (TRL's beta) to sweep; one independent run (one array task) per beta, "
                             "for every method of sweep.methods without its own sweep.strengths.",
                             factory=lambda: [0.05, 0.1, 1.0])
    label_smoothing: float = doc("Assumed probability that a preference label is flipped, used by the robust "
                                 "method only (TRL's label_smoothing; must be in (0, 0.5) when robust is swept; "
                                 "the Robust DPO paper suggests 0.1).", 0.1)
    save_steps: int = doc("Save a checkpoint every N optimizer steps (each is evaluated).", 100)
    max_length: int = doc("Truncation length of prompt + completion, in tokens.", 512)
    precompute_ref_log_probs: bool = doc("Compute reference log-probs once before training instead of "
                                         "keeping a live reference model.", False)
    lora: DPOLoraConfig = doc("LoRA for the DPO arms (one adapter per arm); the reference is then the SFT model "
                              "with the adapter disabled (no second copy in memory).", factory=DPOLoraConfig)

    def __post_init__(self):
        self._check_train("dpo")
        _check(len(self.betas) >= 1, "dpo.betas", "must list at least one beta, e.g. [0.1]")
        for i, beta in enumerate(self.betas):
            _check(beta > 0, f"dpo.betas[{i}]", f"beta={beta} must be > 0 (it scales the implicit KL penalty)")
        _check(len(set(self.betas)) == len(self.betas), "dpo.betas", "contains duplicates")
        _check(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5), e.g. 0.1")


@dataclass
class SweepConfig:
    """The sweep's arms: every method x its strengths x every seed. Arms of trained methods are the DPO
    stage's array tasks; Best-of-N arms are evaluated by the eval stage only."""
    methods: list[str] = doc("Methods to sweep (trained ones from the same pairs, Best-of-N from the SFT model): "
                             + "; ".join(f"{m.name} = {m.about}" for m in METHODS.values()) + ".",
                             factory=lambda: ["dpo"])
    strengths: dict[str, list[float]] = doc("Strengths per method, e.g. {ipo: [0.5, 2.0]} or --set "
                                            "sweep.strengths.ipo=[0.5] (TRL's beta; N for best_of_n, default "
                                            "[4, 16]); a trained method not listed uses dpo.betas; preferred_ft "
                                            "has none.", factory=dict)
    seeds: list[int] = doc("Training seeds (Trainer seed and data order; Best-of-N's sampling seed): every "
                           "(method, strength) runs once per seed and the frontier plot shows the mean ± standard "
                           "error over seeds. Empty = once, with the run's seed.", factory=list)

    def __post_init__(self):
        _check(len(self.methods) >= 1, "sweep.methods", f"must list at least one method, e.g. [dpo]; methods: "
                                                        f"{', '.join(METHODS)}")
        for i, method in enumerate(self.methods):
            _check(method in METHODS, f"sweep.methods[{i}]",
                   f"{method!r} is not a method; choose from {', '.join(METHODS)}")
        _check(len(set(self.methods)) == len(self.methods), "sweep.methods", "contains duplicates")
        _check(any(METHODS[m].trains for m in self.methods), "sweep.methods",
               f"{self.methods} has no trained method; the pipeline trains at least one arm "
               f"(add e.g. dpo: --set sweep.methods=[dpo,{','.join(self.methods)}])")
        for method, strengths in self.strengths.items():
            where = f"sweep.strengths.{method}"
            _check(method in self.methods, where, f"{method!r} is not in sweep.methods={self.methods}; add it there "
                                                  "or drop its strengths")
            spec = METHODS[method]
            _check(spec.has_strength, where, f"{spec.label} has no strength (one arm per seed); drop "
                                             f"sweep.strengths.{method}")
            _check(len(strengths) >= 1, where, "must list at least one strength, e.g. [0.1] (or leave the method "
                                               "out of sweep.strengths to use its default)")
            for i, strength in enumerate(strengths):
                problem = spec.check_strength(strength)
                _check(problem is None, f"{where}[{i}]", problem or "")
            _check(len(set(strengths)) == len(strengths), where, "contains duplicates")
        for i, seed in enumerate(self.seeds):
            _check(seed >= 0, f"sweep.seeds[{i}]", f"{seed} must be >= 0")
        _check(len(set(self.seeds)) == len(self.seeds), "sweep.seeds", "contains duplicates")

    def strengths_of(self, method: str, betas: list[float]) -> list:
        """The strengths swept for `method`: [None] for a method without one; its own; else the method's
        default (Best-of-N's N), else `betas` (dpo.betas)."""
        spec = METHODS[method]
        if not spec.has_strength:
            return [None]
        if method in self.strengths:
            return list(self.strengths[method])
        return list(spec.default_strengths if spec.default_strengths is not None else betas)


@dataclass
class OnlineConfig:
    """The online method (sweep.methods: rloo): what it samples while training. Its optimiser and steps
    are the dpo section's (its batch_size counts completions: batch_size / num_generations prompts)."""
    num_generations: int = doc("Completions sampled per prompt at each step; each is scored against the mean "
                               "reward of the others (RLOO's leave-one-out baseline).", 4)
    max_new_tokens: int = doc("Completion length cap while training, in tokens.", 64)
    temperature: float = doc("Sampling temperature while training.", 1.0)
    learning_rate: float | None = doc("Learning rate of online arms (null = dpo.learning_rate).", None)

    def __post_init__(self):
        _check(self.num_generations >= 2, "online.num_generations", "must be >= 2 (the baseline leaves one out)")
        _check(self.max_new_tokens >= 1, "online.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "online.temperature", "must be > 0")
        if self.learning_rate is not None:
            _check(self.learning_rate > 0, "online.learning_rate", "must be > 0 or null")


@dataclass
class EvalConfig:
    num_prompts: int = doc("Held-out eval prompts (disjoint from pair prompts); the seed's three prompts "
                           "are always included.", 100)
    samples_per_prompt: int = doc("Completions sampled per prompt for reward and KL.", 4)
    max_new_tokens: int = doc("Completion length cap, in tokens.", 128)
    temperature: float = doc("Sampling temperature (KL is measured for this sampler).", 1.0)
    batch_size: int = doc("Sequences per generation batch.", 64)
    logprob_batch_size: int = doc("Sequences per log-prob/KL batch: policy and reference log-probs over the whole "
                                  "vocabulary are held at once (GPT-2, 128 tokens: ~0.2 GB per sequence).", 64)
    kv_cache: str = doc("KV cache for sampling: dynamic, or static (preallocated; prompts padded to "
                        "data.prompt_max_tokens and every batch to batch_size, so on a GPU the decode step "
                        "compiles once into a CUDA graph).", "dynamic")
    fixed_prompts: list[str] = doc("Prompts always evaluated and shown in the report.",
                                   factory=lambda: list(SEED_EVAL_PROMPTS))
    prompt_split: str | None = doc("pairs.source=dataset: the split of pairs.dataset the held-out eval prompts "
                                   "come from (e.g. test_prefs); null = hold eval.num_prompts prompts out of "
                                   "pairs.train_split (chosen by seed; their pairs are not trained on).", None)

    def __post_init__(self):
        _check(self.num_prompts >= len(self.fixed_prompts), "eval.num_prompts",
               f"must be >= the {len(self.fixed_prompts)} fixed prompts")
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.logprob_batch_size >= 1, "eval.logprob_batch_size", "must be >= 1")
        _check(self.kv_cache in KV_CACHES, "eval.kv_cache", f"{self.kv_cache!r} is not one of {', '.join(KV_CACHES)}")


@dataclass
class WandbConfig:
    enabled: bool = doc("Log SFT and DPO training to Weights & Biases.", False)
    mode: str = doc("offline (default: compute nodes rarely have internet; `wandb sync` later) or online.",
                    "offline")
    project: str = doc("wandb project.", "slurm-dpo")
    entity: str | None = doc("wandb entity (team); null = your default.", None)

    def __post_init__(self):
        _check(self.mode in ("offline", "online", "disabled"), "wandb.mode",
               f"{self.mode!r} is not offline, online or disabled")


@dataclass
class HubConfig:
    cache_dir: str | None = doc("Hugging Face cache that `launch.py prefetch`/`run` downloads hub models and datasets "
                                "into, on a filesystem the compute nodes share; jobs read it offline. null = "
                                "$HF_HOME/hub when HF_HOME is set, else RUN/cache/huggingface.", None)


ZERO_STAGES = (0, 2, 3)
OFFLOAD = ("none", "optimizer", "optimizer+params")


@dataclass
class DistributedConfig:
    zero_stage: int = doc("DeepSpeed ZeRO stage for SFT and DPO: 0 = off (plain DDP with several GPUs), "
                          "2 = shard optimizer state and gradients, 3 = also parameters.", 0)
    offload: str = doc("ZeRO CPU offload: none, optimizer, or optimizer+params (ZeRO-3 only).", "none")

    def __post_init__(self):
        _check(self.zero_stage in ZERO_STAGES, "distributed.zero_stage",
               f"{self.zero_stage} is not one of {', '.join(map(str, ZERO_STAGES))}")
        _check(self.offload in OFFLOAD, "distributed.offload", f"{self.offload!r} is not one of {', '.join(OFFLOAD)}")
        _check(self.offload == "none" or self.zero_stage > 0, "distributed.offload",
               "CPU offload needs distributed.zero_stage=2 or 3")
        _check(self.offload != "optimizer+params" or self.zero_stage == 3, "distributed.offload",
               "parameter offload needs distributed.zero_stage=3")


@dataclass
class PipelineConfig:
    name: str = doc("Run name (used for wandb runs and job names).", "dpo")
    seed: int = doc("Seed for data order, sampling and initialisation.", 0)
    device: str = doc("auto (cuda when available), cpu or cuda.", "auto")
    num_threads: int | None = doc("torch CPU threads per process (null = under SLURM, the CPUs the task is bound to "
                                  "capped by its cpus_per_task; elsewhere OMP_NUM_THREADS or torch's default).", None)
    model: ModelConfig = doc("Policy model.", factory=ModelConfig)
    data: DataConfig = doc("Review corpus and prompts.", factory=DataConfig)
    reward: RewardConfig = doc("The reward of pair ranking (pairs.source=sampled), online methods and eval.", factory=RewardConfig)
    sft: SFTConfig = doc("Supervised fine-tuning stage.", factory=SFTConfig)
    pairs: PairsConfig = doc("Preference-pair stage.", factory=PairsConfig)
    dpo: DPOConfig = doc("DPO stage (one run per sweep arm).", factory=DPOConfig)
    sweep: SweepConfig = doc("The sweep's arms: methods x strengths x seeds (trained arms: the DPO stage).",
                             factory=SweepConfig)
    online: OnlineConfig = doc("The online method's sampling (sweep.methods: rloo).", factory=OnlineConfig)
    eval: EvalConfig = doc("Reward-vs-KL evaluation stage.", factory=EvalConfig)
    wandb: WandbConfig = doc("Experiment tracking.", factory=WandbConfig)
    hub: HubConfig = doc("Hub downloads (prefetched on the login node; jobs run offline).", factory=HubConfig)
    distributed: DistributedConfig = doc("Multi-GPU / multi-node training (SFT, DPO).", factory=DistributedConfig)

    def __post_init__(self):
        _check(self.device in ("auto", "cpu", "cuda"), "device", f"{self.device!r} is not auto, cpu or cuda")
        if self.num_threads is not None:
            _check(self.num_threads >= 1, "num_threads", "must be >= 1 or null")
        _check(self.name.replace("-", "").replace("_", "").isalnum(), "name",
               f"{self.name!r}: use letters, digits, '-' and '_' only")
        if self.dpo.lora.enabled:
            online = [m for m in self.sweep.methods if METHODS[m].trainer == "online"]
            _check(not online, "dpo.lora.enabled", f"LoRA is not wired into the online method(s) {online}; drop "
                                                   "them from sweep.methods or set dpo.lora.enabled=false")
            _check(not (self.dpo.lora.merge_final and self.distributed.zero_stage == 3), "dpo.lora.merge_final",
                   "merging needs the whole weights on one process, which ZeRO-3 shards; use distributed.zero_stage=2 "
                   "or keep the adapter (merge_final=false)")
        _check(not (self.sft.lora.enabled and self.distributed.zero_stage == 3), "sft.lora.enabled",
               "SFT's final/ is the adapter merged into the base, which ZeRO-3 shards; use distributed.zero_stage=2")
        if self.reward.kind == "none":
            _check(self.pairs.source == "dataset", "reward.kind", "none needs pairs.source=dataset: sampled pairs are "
                                                                  "ranked by the reward; set reward.kind")
            needing = [m for m in self.sweep.methods if METHODS[m].trainer == "online" or not METHODS[m].trains]
            _check(not needing, "reward.kind", f"none: the method(s) {needing} need a reward; drop them from "
                                               "sweep.methods or set reward.kind")
        if self.model.name == "tiny":  # its context length is known before anything runs
            self._check_tiny_context()
        for method in self.sweep.methods:
            problem = METHODS[method].check(self)
            if problem is not None:
                _check(False, *problem)

    def _check_tiny_context(self):
        context, prompt = self.model.n_positions, self.data.prompt_max_tokens
        needs = {"pairs.max_new_tokens": prompt + self.pairs.max_new_tokens,
                 "eval.max_new_tokens": prompt + self.eval.max_new_tokens,
                 "online.max_new_tokens": prompt + self.online.max_new_tokens,
                 "sft.max_length": self.sft.max_length, "dpo.max_length": self.dpo.max_length}
        for field, tokens in needs.items():
            _check(tokens <= context, field, f"needs {tokens} tokens (prompt included), more than the tiny model's "
                                             f"context (model.n_positions={context}); lower it or raise model.n_positions")


def upgrade_stored_config(data: dict) -> dict:
    """A run's stored config.yaml as this version reads it (a copy).

    Runs made before the sweep section had `dpo.loss_type`, one TRL loss for every arm: 'sigmoid' is
    the dpo method, which the default sweep section gives (same arms, keys and directories).
    """
    dpo = data.get("dpo")
    if not isinstance(dpo, dict) or "loss_type" not in dpo:
        return data
    loss = dpo["loss_type"]
    if loss != "sigmoid":
        raise ValueError(f"dpo.loss_type: this run was made with dpo.loss_type={loss!r}, which is now a method in "
                         "sweep.methods with arm directories of its own; finish it with the version that made it, "
                         "or start a new --run-dir with --set sweep.methods=[...]")
    return {**data, "dpo": {k: v for k, v in dpo.items() if k != "loss_type"}}
