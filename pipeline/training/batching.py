"""Batch composition for training: length-grouped DPO batches, packed SFT rows.

A DPO batch is padded to its longest sequence (chosen and rejected alike), so random batches of
the seed's pairs (completions of 48 to 192 tokens) are a third padding. Grouping pairs of similar
length removes most of it without changing what an epoch contains. An SFT batch of padded reviews
is more than half padding; packed rows are full. docs/benchmarks.md has the numbers.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Sampler

MEGABATCH = 50  # batches per megabatch: the span within which lengths are sorted


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator | None = None) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive `batch_size` slices hold similar lengths.

    Random permutation -> megabatches of MEGABATCH batches -> each sorted by length and cut into
    batches -> all batches shuffled (so an epoch does not run long-to-short in cycles). Every index
    appears exactly once; only the last batch may be short, and it stays last.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = MEGABATCH * batch_size
    batches = []
    for start in range(0, len(order), span):
        mega = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [mega[i:i + batch_size] for i in range(0, len(mega), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail
    return [index for batch in shuffled for index in batch]


class LengthGroupedSampler(Sampler):
    """`length_grouped_order` from a generator seeded with (seed, epoch), never from torch's global RNG.

    The order must not depend on what consumed random numbers before training started (TRL's
    reference pass iterates a DataLoader, which draws a seed from the global RNG, on the first
    attempt of a job but not after a requeue that finds it cached): a resumed run skips the batches
    it already trained on, so both attempts must see the same order. accelerate calls `set_epoch`.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))


def pair_lengths(dataset) -> list[int]:
    """Padded length of each tokenized pair (TRL columns): prompt + the longer completion."""
    return [len(p) + max(len(c), len(r))
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


@functools.cache
def dpo_trainer_class():
    """TRL's DPOTrainer, with `train_sampling_strategy='group_by_length'` grouping pairs by padded length
    (the Trainer's own grouping looks for an `input_ids` column, which preference data lacks)."""
    from trl import DPOTrainer

    class PairsDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            args = self.args
            seed = args.data_seed if args.data_seed is not None else args.seed
            return LengthGroupedSampler(pair_lengths(dataset),
                                        args.per_device_train_batch_size * args.gradient_accumulation_steps, seed)

    return PairsDPOTrainer


class PackedRowsCollator:
    """Batches of packed SFT rows (TRL's best-fit-decreasing packing), each row kept as its own row.

    TRL's padding-free collator flattens the whole batch into one sequence, which only pays off
    with varlen flash attention: under SDPA the block-diagonal mask over batch x max_length tokens
    makes attention cost grow with the square of the whole batch. Here each row is at most
    max_length long, positions restart at every review and there is no attention mask, so
    transformers builds a per-row block-diagonal causal mask (attention never crosses reviews).
    The first token of each review has no in-review context and is not a target.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self._collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True,
                                                        pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self._collate(examples)
        # Right padding gets position 0 at every pad token: each pad is its own one-token segment.
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer; with `packing=True` its batches are `PackedRowsCollator` rows."""
    from trl import SFTTrainer

    class PackedRowsSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.packing:  # set here: TRL rejects a custom collator passed together with packing
                self.data_collator = PackedRowsCollator(self.processing_class.pad_token_id,
                                                        self.args.pad_to_multiple_of)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # TRL counts a batch without attention mask as one row of tokens (its own padding-free
            # batches are one row); packed rows are several: scale its `num_tokens` metric.
            rows = inputs["position_ids"].shape[0] if "attention_mask" not in inputs and "position_ids" in inputs else 1
            counted = self._total_train_tokens
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if rows > 1 and self.model.training:
                self._total_train_tokens = counted + (self._total_train_tokens - counted) * rows
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    return PackedRowsSFTTrainer
