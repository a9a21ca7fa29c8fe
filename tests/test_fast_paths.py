"""Correctness of every speed path against the plain computation, on the CPU with tiny models.

- length-grouped DPO batches: a permutation of the epoch, much less padding;
- packed SFT rows: loss and gradients equal those of the reviews computed one by one;
- the project's DPO trainer (length grouping, padding to a multiple, torch.compile): loss and
  gradients equal a hand-written DPO loss on unpadded sequences;
- static-KV-cache sampling: the same tokens as the dynamic cache;
- mixed precision: trained weights are float32 under a bf16 compute dtype.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from pipeline.training.batching import PackedRowsCollator, length_grouped_order


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of the padded batch tokens that are padding, for batches taken in `order`."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded


def tiny_gpt2(seed: int = 0, vocab: int = 97):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, attn_implementation="sdpa",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic forward passes
    return GPT2LMHeadModel(config)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


# ------------------------------------------------------------------------------------------- batching
def test_length_grouped_order_is_a_permutation_with_far_less_padding():
    rng = random.Random(0)
    lengths = [8 + rng.randint(48, 192) for _ in range(6000)]  # the seed's pair shapes
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(6000))
    random_order = torch.randperm(6000, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding_fraction(lengths, random_order, 8) > 0.25
    assert padding_fraction(lengths, order, 8) < 0.03
    # same seed, same order; another seed, another order
    assert order == length_grouped_order(lengths, 8, torch.Generator().manual_seed(0))
    assert order != length_grouped_order(lengths, 8, torch.Generator().manual_seed(1))


def test_length_grouped_batches_are_shuffled_and_a_short_batch_stays_last():
    lengths = list(range(1003))
    order = length_grouped_order(lengths, 10, torch.Generator().manual_seed(0))
    batches = [order[i:i + 10] for i in range(0, len(order), 10)]
    assert len(batches[-1]) == 3
    maxima = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_packed_rows_give_the_loss_and_gradients_of_separate_reviews():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = random.Random(1)
    reviews = [[rng.randrange(1, 97) for _ in range(n)] for n in (30, 11, 25, 7, 19, 40, 3)]
    packed = pack_dataset(Dataset.from_dict({"input_ids": reviews}), seq_length=48, strategy="bfd")
    assert len(packed) < len(reviews)  # several reviews share rows
    batch = PackedRowsCollator(pad_token_id=0)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch
    assert int((batch["labels"] != -100).sum()) == sum(len(r) - 1 for r in reviews)  # no cross-review targets

    model = tiny_gpt2()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    packed_loss, packed_grads = out.loss.item(), grads(model)

    model.zero_grad()
    total, targets = 0.0, 0
    for review in reviews:
        ids = torch.tensor([review])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        total = total + F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        targets += len(review) - 1
    plain = total / targets
    plain.backward()
    assert packed_loss == pytest.approx(plain.item(), abs=1e-5)
    assert_close_grads(packed_grads, grads(model), atol=1e-5)


# ------------------------------------------------------------------------------------------- DPO
def word_tokenizer(vocab: int = 97):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>")


def dpo_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text = lambda k: "".join(f" w{rng.randrange(1, 97)}" for _ in range(k))  # noqa: E731
    return [{"prompt": text(rng.randint(2, 5)).strip(), "chosen": text(rng.randint(3, 20)),
             "rejected": text(rng.randint(3, 20))} for _ in range(n)]


def plain_dpo_loss(model, ref_model, tokenizer, rows: list[dict], beta: float) -> torch.Tensor:
    """-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), one unpadded sequence at a time."""

    def completion_logp(m, prompt, completion):
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([full])
        logp = torch.log_softmax(m(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        return picked[len(p) - 1:].sum()

    losses = []
    for row in rows:
        with torch.no_grad():
            ref_c = completion_logp(ref_model, row["prompt"], row["chosen"])
            ref_r = completion_logp(ref_model, row["prompt"], row["rejected"])
        pi_c = completion_logp(model, row["prompt"], row["chosen"])
        pi_r = completion_logp(model, row["prompt"], row["rejected"])
        losses.append(-F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))))
    return torch.stack(losses).mean()


def project_dpo_trainer(tmp_path, model, ref_model, tokenizer, rows, **train_changes):
    from datasets import Dataset
    from trl import DPOConfig

    from pipeline.training.batching import dpo_trainer_class
    from pipeline.config import PipelineConfig
    from pipeline.configlib import from_dict
    from pipeline.training.loop import trainer_kwargs

    cfg = from_dict(PipelineConfig, {"device": "cpu", "dpo": {"batch_size": len(rows), "max_length": 64,
                                                              **train_changes}})
    args = DPOConfig(**trainer_kwargs(cfg, cfg.dpo, tmp_path / "out", torch.device("cpu"), torch.float32, []),
                     beta=0.1, loss_type=["sigmoid"])
    return dpo_trainer_class()(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(rows))


@pytest.mark.parametrize("changes", [{}, {"group_by_length": True, "pad_to_multiple_of": 32},
                                     {"compile": "default", "pad_to_multiple_of": 32}],
                         ids=["eager", "grouped+padded", "compiled"])
def test_project_dpo_loss_and_gradients_match_the_plain_implementation(tmp_path, changes):
    tokenizer = word_tokenizer()
    rows = dpo_rows(6)
    model, ref_model = tiny_gpt2(0), tiny_gpt2(0)
    with torch.no_grad():  # a policy that already differs from its reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = project_dpo_trainer(tmp_path, model, ref_model, tokenizer, rows, **changes)
    batch = next(iter(trainer.get_train_dataloader()))
    if changes.get("pad_to_multiple_of"):
        assert batch["input_ids"].shape[1] % changes["pad_to_multiple_of"] == 0
    assert trainer.args.torch_compile == bool(changes.get("compile"))
    # with torch_compile the Trainer wraps the model like this when training starts
    train_model = torch.compile(trainer.model) if changes.get("compile") else trainer.model
    loss = trainer.compute_loss(train_model, batch)
    loss.backward()
    fast_loss, fast_grads = loss.item(), grads(model)

    model.zero_grad()
    order = [trainer.train_dataset[i]["prompt"] for i in range(len(rows))]
    assert sorted(order) == sorted(r["prompt"] for r in rows)
    plain = plain_dpo_loss(model, ref_model, tokenizer, rows, beta=0.1)
    plain.backward()
    assert fast_loss == pytest.approx(plain.item(), abs=1e-5)
    assert_close_grads(fast_grads, grads(model), atol=1e-5)


def test_length_grouped_sampler_depends_on_seed_and_epoch_only():
    from pipeline.training.batching import LengthGroupedSampler

    lengths = [random.Random(i).randint(10, 200) for i in range(500)]
    sampler = LengthGroupedSampler(lengths, 8, seed=3)
    first = list(sampler)
    torch.manual_seed(123)
    torch.rand(100)  # whatever ran before (a reference pass, a DataLoader) must not change the order
    assert list(sampler) == first == list(LengthGroupedSampler(lengths, 8, seed=3))
    sampler.set_epoch(1)
    second_epoch = list(sampler)
    assert second_epoch != first and sorted(second_epoch) == sorted(first)
    assert list(LengthGroupedSampler(lengths, 8, seed=4)) != first


def test_dpo_trainer_uses_the_length_grouped_sampler_only_when_asked(tmp_path):
    from pipeline.training.batching import LengthGroupedSampler

    tokenizer = word_tokenizer()
    rows = dpo_rows(40)
    grouped = project_dpo_trainer(tmp_path, tiny_gpt2(), tiny_gpt2(), tokenizer, rows, group_by_length=True)
    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    prompt, chosen, rejected = (grouped.train_dataset[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert sampler.lengths == [len(p) + max(len(c), len(r)) for p, c, r in zip(prompt, chosen, rejected)]
    plain = project_dpo_trainer(tmp_path, tiny_gpt2(), tiny_gpt2(), tokenizer, rows)
    assert not isinstance(plain._get_train_sampler(), LengthGroupedSampler)


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("num_prompts", [4, 3], ids=["full-batches", "short-last-batch"])
def test_static_cache_sampling_draws_the_same_tokens_as_the_dynamic_cache(num_prompts):
    from pipeline.evaluation.sampling import sample_completions

    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_gpt2(3).eval()
    prompts = ["w1 w2 w3", "w4", "w5 w6", "w7 w8 w9 w10"][:num_prompts]
    kwargs = dict(num_samples=2, max_new_tokens=12, batch_size=4, seed=5)
    dynamic = sample_completions(model, tokenizer, prompts, **kwargs)
    static = sample_completions(model, tokenizer, prompts, kv_cache="static", prompt_width=4, **kwargs)
    assert [len(g) for g in static] == [2] * num_prompts
    full_batches = 4 if num_prompts == 4 else 2  # prompts whose samples share a full batch in both runs
    for d, s in zip(dynamic[:full_batches // 2 * 2], static):
        assert [x.completion_ids for x in d] == [x.completion_ids for x in s]
    assert sum(len(x.completion_ids) for g in static for x in g) > 2 * num_prompts  # really sampled


def test_compiled_static_cache_sampling_draws_the_same_tokens():
    """What transformers does on a GPU with a static cache (compile the decode step), forced on the CPU."""
    from transformers import CompileConfig

    from pipeline.evaluation.sampling import sample_completions

    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_gpt2(3).eval()
    prompts = ["w1 w2 w3", "w4", "w5 w6", "w7 w8 w9 w10"]
    kwargs = dict(num_samples=2, max_new_tokens=12, batch_size=4, seed=5)
    dynamic = sample_completions(model, tokenizer, prompts, **kwargs)
    model.generation_config.compile_config = CompileConfig(mode="default")  # no CUDA graphs on the CPU
    model.generation_config.compile_config._compile_all_devices = True
    compiled = sample_completions(model, tokenizer, prompts, kv_cache="static", prompt_width=4, **kwargs)
    assert hasattr(model, "_compiled_call")  # the decode step really ran compiled
    for d, c in zip(dynamic, compiled):
        assert [x.completion_ids for x in d] == [x.completion_ids for x in c]


# ------------------------------------------------------------------------------------------- precision
def test_training_keeps_float32_weights_under_a_bf16_compute_dtype(tmp_path):
    from pipeline.config import PipelineConfig
    from pipeline.configlib import from_dict
    from pipeline.models.policy import load_model
    from pipeline.training.loop import trainer_kwargs

    tiny_gpt2().save_pretrained(tmp_path / "m")
    trained = load_model(tmp_path / "m", torch.device("cpu"), torch.bfloat16, train=True)
    sampler = load_model(tmp_path / "m", torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert {p.dtype for p in sampler.parameters()} == {torch.bfloat16}
    cfg = from_dict(PipelineConfig, {"device": "cpu"})
    kwargs = trainer_kwargs(cfg, cfg.dpo, tmp_path / "out", torch.device("cpu"), torch.bfloat16, [])
    assert kwargs["bf16"] and not kwargs["fp16"]  # the Trainer autocasts to bf16
    # why: an Adam-sized step (lr 2e-5) on a typical weight is lost in bf16 but kept in float32
    w = torch.tensor(0.05)
    assert (w.bfloat16() + 2e-5).item() == w.bfloat16().item()
    assert (w + 2e-5).item() != w.item()


def test_checkpoint_weights_are_copied_into_the_evaluated_model_in_place(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.models.policy import load_model, load_weights_into

    tiny_gpt2(0).save_pretrained(tmp_path / "a")
    tiny_gpt2(1).save_pretrained(tmp_path / "b")
    model = load_model(tmp_path / "a", torch.device("cpu"), torch.bfloat16)
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    load_weights_into(model, tmp_path / "b")
    fresh = load_model(tmp_path / "b", torch.device("cpu"), torch.bfloat16)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage  # same tensors
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # still tied
    deeper = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=3, n_head=4))
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match="do not fit"):
        load_weights_into(model, tmp_path / "deeper")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_weights_into(model, tmp_path)


def test_packed_sft_trainer_uses_packed_rows_and_counts_every_row(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from pipeline.training.batching import PackedRowsCollator, sft_trainer_class
    from pipeline.config import PipelineConfig
    from pipeline.configlib import from_dict
    from pipeline.training.loop import trainer_kwargs

    cfg = from_dict(PipelineConfig, {"device": "cpu", "sft": {"packing": True, "batch_size": 3, "max_length": 32}})
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, tmp_path / "out", torch.device("cpu"), torch.float32, []),
                     dataset_text_field="text", packing=True, packing_strategy="bfd")
    rng = random.Random(2)
    texts = [" ".join(f"w{rng.randrange(1, 97)}" for _ in range(rng.randint(4, 20))) for _ in range(40)]
    trainer = sft_trainer_class()(model=tiny_gpt2(), args=args, processing_class=word_tokenizer(),
                                  train_dataset=Dataset.from_dict({"text": texts}))
    assert isinstance(trainer.data_collator, PackedRowsCollator)
    batch = next(iter(trainer.get_train_dataloader()))
    rows, width = batch["input_ids"].shape
    assert rows == 3 and width <= 32 and "attention_mask" not in batch
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["num_tokens"] == [rows * width]  # TRL alone would count one row


@pytest.mark.slow
def test_compiled_dpo_stage_trains_like_the_eager_one_and_saves_plain_weights(tiny_run, tmp_path, monkeypatch):
    from safetensors import safe_open

    from conftest import clone_before_dpo, max_weight_difference, start_stage_job

    # the stage uses RUN/cache/torch_compile unless the environment names a cache (inductor sets the
    # variable in this process once anything here compiled; a user's own setting would win too)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    # every batch padded to max_length (64): one shape, so inductor compiles the step once, not once
    # per length bucket (compiling dominates this test on a CPU)
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", dpo={"betas": [0.1], "compile": "default",
                                                                 "pad_to_multiple_of": 64})
    proc = start_stage_job(run_dir, "dpo", "0.1")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    final = run_dir / "dpo" / "beta-0.1" / "final"
    keys = [k for f in final.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert keys and not any("_orig_mod" in k for k in keys)  # the compiled wrapper is not what was saved
    assert any((run_dir / "cache" / "torch_compile").iterdir())  # kernels cached in the run directory
    # the same 75 steps as the eager run; float reassociation, amplified by Adam, stays small
    assert max_weight_difference(final, tiny_run / "dpo" / "beta-0.1" / "final") < 1e-3
