"""Batching: the seeded epoch schedule, length grouping, packed attention boundaries, step counts."""

from __future__ import annotations

import random

import torch

from doctune.model_settings import TrainSettings
from doctune.training.batching import collate, epoch_batches, total_steps
from doctune.training.data import IGNORE, render_example
from tests.training.common import _row


def test_max_steps_zero_with_epochs_is_valid():
    s = TrainSettings(max_steps=0, num_epochs=2, per_device_batch_size=4, gradient_accumulation_steps=2)
    assert total_steps(s, n_examples=10) == 3  # 3 micro-batches per epoch x 2 epochs / 2


def test_epoch_batches_cover_every_example_and_are_reproducible():
    lengths = [random.Random(i).randint(5, 300) for i in range(103)]
    for batching in ("padded", "length_grouped", "packed"):
        a = epoch_batches(lengths, 8, batching, seed=1, epoch=0)
        assert sorted(i for b in a for i in b) == list(range(103))
        assert a == epoch_batches(lengths, 8, batching, seed=1, epoch=0)
        assert a != epoch_batches(lengths, 8, batching, seed=1, epoch=1)

    def pad_waste(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, "length_grouped", 1, 0)
    assert pad_waste(grouped) < pad_waste(epoch_batches(lengths, 8, "padded", 1, 0)) / 3


def test_packed_batches_attend_within_their_own_sequence(tiny_model, tokenizer):
    """Packed rows must give every sequence the logits it gets alone (no cross-attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    rng = random.Random(3)
    examples = [render_example(tokenizer, _row(i, rng)["messages"], None, 512) for i in range(5)]
    batch = collate(examples, "packed", tokenizer.pad_token_id, max_seq_len=400)
    assert batch["input_ids"].shape[0] < len(examples)  # several sequences share a row
    assert batch["n_tokens"] == sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            n = len(ex.input_ids)
            row, start = next(  # find where the sequence landed
                (r, s) for r in range(batch["input_ids"].shape[0]) for s in range(batch["input_ids"].shape[1] - n + 1)
                if batch["input_ids"][r, s : s + n].tolist() == ex.input_ids and batch["position_ids"][r, s] == 0
            )
            torch.testing.assert_close(packed[row, start : start + n], alone, atol=1e-4, rtol=1e-4)
    # The same labels are trained either way (first token of each sequence is never a target).
    padded = collate(examples, "padded", tokenizer.pad_token_id, 400)
    assert (batch["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()
