"""Sampling helpers: what a streamed row may send now, and the greedy head's checked argmax."""

from __future__ import annotations

import torch

from doctune.serving.sampling import GreedyHead, streamable


def test_streamable_holds_back_stop_prefixes_and_partial_characters():
    assert streamable("Hello wor", ["world!"]) == "Hello "
    assert streamable("Hello", ["\n\n"]) == "Hello"
    assert streamable("Hello\n", ["\n\n"]) == "Hello"
    assert streamable("ab\ufffd", []) == "ab"


def _head_and_hidden(seed: int = 0, vocab: int = 4096, dim: int = 64, rows: int = 256):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g) * 0.1
    hidden = torch.randn(rows, dim, generator=g) * 5
    hidden[:, 3] *= 20  # one massive activation, as LLM hidden states have
    return weight, hidden


def test_greedy_head_bounds_the_bf16_error_and_gives_the_fp32_argmax():
    weight, hidden = _head_and_hidden()
    head = GreedyHead(weight)
    exact = hidden @ weight.t()
    approx = torch.nn.functional.linear(hidden.bfloat16(), head.wb).float()
    bound = approx.abs() * 2.0**-8 + head.gamma * head.norms[None] * hidden.norm(dim=1, keepdim=True)
    assert bool(((approx - exact).abs() <= bound).all()), "the bf16 error exceeded the bound the head relies on"
    assert head.argmax(hidden) == exact.argmax(-1).tolist()
    assert head.fallbacks < len(hidden) // 10  # it is faster only if the bound settles most rows


def test_greedy_head_rechecks_a_near_tie_in_fp32():
    weight, hidden = _head_and_hidden(rows=4)
    top = (hidden @ weight.t()).argmax(-1)
    # More near-copies of each row's top token than the head takes candidates: bf16 cannot tell
    # them apart (their logits differ by ~1e-5), so some stay outside the candidates, unsettled.
    head_k = GreedyHead.k
    for r in range(4):
        twins = torch.arange(100 + r * 2 * head_k, 100 + (r + 1) * 2 * head_k)
        weight[twins] = weight[top[r]] * (1 + 1e-5 * torch.linspace(-1, 1, len(twins)))[:, None]
    head = GreedyHead(weight)
    assert head.argmax(hidden) == (hidden @ weight.t()).argmax(-1).tolist()
    assert head.fallbacks == 4
