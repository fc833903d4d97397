"""Ragged attention: one forward over a flat sequence of the running rows' next tokens and the
newcomers' prompt tokens, with attention run per part against that part's own cache. Registered with
transformers as the attention function `doctune_ragged`; without `ragged` it is transformers' SDPA."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

RAGGED = "doctune_ragged"


@dataclass
class Ragged:
    """One forward over a flat sequence: the running rows' next tokens first (one each), then each
    newcomer's prompt tokens. The linear layers see all of them at once, so a newcomer's prefill
    shares the decode step's reads of the weights (on CPU a decode step is bound by those reads);
    attention runs per part, against that part's own cache."""

    decode: int  # running rows: tokens 0..decode-1
    running: object  # their cache
    mask: torch.Tensor | None  # [decode, 1, 1, columns] bool: which cached columns each row sees
    parts: list[tuple[int, int, object, torch.Tensor | None]] = field(default_factory=list)  # start, stop, cache, mask


def ragged_attention(module, query, key, value, attention_mask, ragged: Ragged | None = None, **kwargs):
    """transformers' SDPA attention, or with `ragged` its parts one by one: query/key/value are
    [1, heads, tokens, head_dim] over the flat sequence, and the caches are updated here (the model
    runs without a cache of its own)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if ragged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer, out, r = module.layer_idx, [], ragged.decode
    if r:
        rows = [t[0, :, :r].transpose(0, 1).unsqueeze(2) for t in (query, key, value)]  # [rows, heads, 1, dim]
        k, v = ragged.running.layers[layer].update(rows[1], rows[2])
        o, _ = sdpa_attention_forward(module, rows[0], k, v, ragged.mask, **kwargs)
        out.append(o.reshape(1, r, *o.shape[2:]))
    for start, stop, cache, mask in ragged.parts:
        k, v = cache.layers[layer].update(key[:, :, start:stop], value[:, :, start:stop])
        o, _ = sdpa_attention_forward(module, query[:, :, start:stop], k, v, mask, **kwargs)
        out.append(o)
    return torch.cat(out, dim=1), None


@functools.cache
def register_ragged() -> str:
    """Register the ragged attention (and SDPA's masks for it) with transformers; its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RAGGED, ragged_attention)
    AttentionMaskInterface.register(RAGGED, sdpa_mask)  # calls without `ragged` get SDPA's masks
    return RAGGED
