"""The trainable model: NEFTune noise, frozen weights stored in bf16 without changing a bit, and the base
model's size read from its files."""

from __future__ import annotations

import pytest
import torch

from doctune.training.batching import collate
from doctune.training.data import load_train_split, tokenize_split
from doctune.training.model import (
    initial_plan, load_model, micro_step_loss, parameter_count, store_frozen_in_compute_dtype,
)
from tests.training.common import tiny_settings


def test_neftune_noises_the_embeddings_only_while_training(tiny_model):
    settings = tiny_settings(tiny_model, neftune_alpha=5)
    model = load_model(tiny_model, initial_plan(settings), settings)
    embed = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model.eval()
    clean = embed(ids)
    model.train()
    first, second = embed(ids), embed(ids)
    bound = 5 / (6 * 64) ** 0.5  # alpha / sqrt(length x hidden size)
    assert 0 < (first - clean).abs().max() <= bound and not torch.equal(first, second)
    model.eval()
    assert torch.equal(embed(ids), clean)
    off = tiny_settings(tiny_model)
    plain = load_model(tiny_model, initial_plan(off), off).train().get_input_embeddings()
    assert torch.equal(plain(ids), plain(ids))


@pytest.mark.slow
def test_bf16_frozen_weights_cast_once_leave_loss_and_gradients_unchanged(tiny_model, dataset_dir, tokenizer):
    """The frozen base weights stored in bf16 once give the very losses and LoRA gradients that
    autocast's per-forward casts give; the embeddings stay fp32 and the tied head gets its own copy."""
    settings = tiny_settings(tiny_model, cpu_dtype="bf16", lora_dropout=0.1)
    examples, _ = tokenize_split(tokenizer, load_train_split(dataset_dir), settings)
    batch = collate(examples[:4], "packed", tokenizer.pad_token_id, settings.max_seq_len)
    runs = []
    for cast in (False, True):
        plan = initial_plan(settings)
        torch.manual_seed(0)
        model = load_model(tiny_model, plan, settings).train()
        n = store_frozen_in_compute_dtype(model, plan) if cast else 0
        torch.manual_seed(1)  # the same dropout masks on both sides
        loss = micro_step_loss(model, batch, plan)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        runs.append((n, loss.item(), grads, model))
    (n0, loss0, grads0, _), (n1, loss1, grads1, model) = runs
    assert n0 == 0 and n1 == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert loss1 == loss0
    assert grads1.keys() == grads0.keys() and all(torch.equal(grads1[k], grads0[k]) for k in grads0)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and not head.requires_grad
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # fp32 compute keeps every weight as loaded
    fp32 = tiny_settings(tiny_model, cpu_dtype="fp32")
    plan = initial_plan(fp32)
    assert store_frozen_in_compute_dtype(load_model(tiny_model, plan, fp32), plan) == 0


def test_parameter_count_reads_the_safetensors_headers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    stored = {id(p): p.numel() for p in model.parameters()}  # a tied head shares the embedding's tensor
    assert parameter_count(tiny_model) == sum(stored.values())
    assert parameter_count(str(tmp_path)) is None  # a folder without safetensors
    assert parameter_count("nobody/no-such-model") is None  # not a folder, not in the local hub cache
