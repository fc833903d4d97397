"""The prefix store: whole prefixes found per adapter, least recently used blocks out first, and
a prompt seen before prefills only its end and answers the same."""

from __future__ import annotations

import torch

from doctune.serving.handlers import encode_chat
from doctune.serving.kv_cache import PrefixStore
from tests.serving.common import SAY, say


def test_prefix_store_finds_whole_prefixes_and_drops_the_deepest_blocks_first():
    def blocks(i):  # one layer; 16 positions x 2 heads x 2 dims: 256 bytes of keys, 256 of values
        return [(torch.full((2, 16, 2), float(i)), torch.zeros(2, 16, 2))]

    store = PrefixStore(budget_bytes=3 * 512, block=16)
    a = list(range(40))
    store.store(None, a, 0, blocks)  # its 2 whole blocks
    assert len(store.lookup(None, a)) == 2 and store.lookup("adapter", a) == []
    b = a[:16] + [99] * 40  # shares a's first block only
    assert len(store.lookup(None, b)) == 1
    store.store(None, b, 1, blocks)  # 2 more: over budget, so a's second block (the least recent) goes
    assert len(store.lookup(None, b)) == 3 and len(store.lookup(None, a)) == 1
    assert store.bytes == 3 * 512 and len(store.blocks) == 3
    assert store.lookup(None, a[:16]) == []  # a prompt of one block keeps its last token to prefill


def test_a_prompt_seen_before_prefills_only_its_end_and_answers_the_same(tiny, in_process):
    engine = tiny.app.state.engine
    prompt = encode_chat(engine.tok, SAY)
    cached = []
    for _ in range(2):
        before = engine.stats["cached_prompt_tokens"]
        assert say(tiny.client, "alpha") == in_process["alpha"]
        cached.append(engine.stats["cached_prompt_tokens"] - before)
    # Whole blocks of 16, and never the last token: its logits give the first new token.
    assert cached[1] == 16 * ((len(prompt) - 1) // 16) > 0
    # Another adapter's keys/values differ: a prompt stored under one is not found under another.
    briefly = [{"role": "system", "content": "You answer briefly."}, *SAY]
    for model, found in (("tiny", False), ("beta", False), ("beta", True)):
        before = engine.stats["cached_prompt_tokens"]
        tiny.client.chat.completions.create(model=model, messages=briefly, temperature=0, max_tokens=2)
        assert (engine.stats["cached_prompt_tokens"] > before) == found, model
