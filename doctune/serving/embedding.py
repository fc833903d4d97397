"""Embedding requests in pieces: the worker runs an embedding request a piece at a time between decode
steps, so that a long one neither stalls the running chat rows nor outlives its client. A piece is
either several whole inputs (the shortest first, right-padded as one forward) or the next tokens of
one input longer than a piece, run over the keys/values of its earlier tokens; each input's vector
is the mean of the decoder's last hidden state over its tokens, L2-normalised, as in one forward."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from doctune.serving.jobs import EmbedJob


@dataclass
class Embedding:
    """One embedding request in progress: the inputs not started yet (shortest first), the vectors
    so far, and the input being run in pieces (`long`) with its cache and the sum of its tokens'
    hidden states so far."""

    job: EmbedJob
    todo: deque[int]
    out: list[torch.Tensor | None]
    long: int | None = None
    cache: object = None
    done: int = 0  # tokens of `long` through the model so far
    total: torch.Tensor | None = None  # the sum of their last hidden states (fp32)
    tokens: int = 0  # tokens of the whole request embedded so far

    @classmethod
    def of(cls, job: EmbedJob) -> Embedding:
        order = sorted(range(len(job.inputs)), key=lambda i: len(job.inputs[i]))
        return cls(job, deque(order), [None] * len(job.inputs))

    def finished(self) -> bool:
        return not self.todo and self.long is None

    def size(self) -> int:
        return sum(map(len, self.job.inputs))


def run_piece(e: Embedding, decoder, budget: int, max_rows: int, pad_id: int, device: torch.device,
              new_cache) -> int:
    """Embed the next piece of `e` with `decoder` (its adapter already chosen): whole inputs that fit
    `budget` padded positions and `max_rows` rows, or the next `budget` tokens of an input longer
    than `budget` (`new_cache()` makes its cache). The real tokens it ran."""
    if e.long is None and len(e.job.inputs[e.todo[0]]) > budget:
        e.long, e.cache, e.done, e.total = e.todo.popleft(), new_cache(), 0, None
    n = _long_piece(e, decoder, budget, device) if e.long is not None else \
        _short_piece(e, decoder, budget, max_rows, pad_id, device)
    e.tokens += n
    return n


def _short_piece(e: Embedding, decoder, budget: int, max_rows: int, pad_id: int, device: torch.device) -> int:
    inputs = e.job.inputs
    part = [e.todo.popleft()]
    # Shortest first: the width is the last one's length, and padded positions cost as real ones.
    while e.todo and len(part) < max_rows and (len(part) + 1) * len(inputs[e.todo[0]]) <= budget:
        part.append(e.todo.popleft())
    width = len(inputs[part[-1]])
    ids = torch.full((len(part), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(part), width), dtype=torch.long)
    for k, i in enumerate(part):  # right padding: causal attention never sees it
        ids[k, : len(inputs[i])] = torch.tensor(inputs[i])
        mask[k, : len(inputs[i])] = 1
    ids, mask = ids.to(device), mask.to(device)
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    weights = mask.unsqueeze(-1).to(torch.float32)
    pooled = F.normalize((hidden.float() * weights).sum(1) / weights.sum(1), dim=-1).cpu()
    for k, i in enumerate(part):
        e.out[i] = pooled[k]
    return sum(len(inputs[i]) for i in part)


def _long_piece(e: Embedding, decoder, budget: int, device: torch.device) -> int:
    """The next `budget` tokens of the long input, attending to its earlier tokens through the cache
    (what one forward over the whole input computes, a slice of queries at a time)."""
    ids = e.job.inputs[e.long]
    chunk = ids[e.done: e.done + budget]
    hidden = decoder(input_ids=torch.tensor([chunk], device=device), past_key_values=e.cache,
                     use_cache=True).last_hidden_state
    part = hidden[0].float().sum(0)
    e.total = part if e.total is None else e.total + part
    e.done += len(chunk)
    if e.done == len(ids):
        e.out[e.long] = F.normalize(e.total / len(ids), dim=-1).cpu()
        e.long = e.cache = e.total = None  # its keys/values go now, not with the request
    return len(chunk)
