"""Choosing each row's next token and what it means for the row: the greedy head (the fp32 argmax
from bf16 candidates), per-row sampling (penalties, temperature, top-p, a seeded generator per row),
and `advance` (eos, stop strings, max_tokens, streamed deltas)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from doctune.serving.batch import Row


class GreedyHead:
    """The argmax of the fp32 head's logits, for greedy rows, at about a third of its cost on a CPU
    with native bf16 (measured here, 8 rows x 49152 tokens: 4.7 ms against 15.5 ms). A bf16 copy of
    the head names `k` candidates; their logits are computed in fp32; every other token v is then
    shown unable to beat the best of them, with a bound on the bf16 error of its logit:
    |bf16(w)·bf16(h) - w·h| <= (2u + u^2) sum|w_i||h_i| + the fp32 accumulation's error
    <= gamma |w_v| |h| (u = 2^-8, Cauchy-Schwarz), plus 2^-8 of the logit for the bf16 result's
    own rounding. A row the bound does not settle gets its fp32 logits (on the offline model every
    row of 324 decode steps was settled; the bound was 6.7x the largest error seen)."""

    k = 16
    gamma = 2.0**-7 + 2.0**-11

    def __init__(self, weight: torch.Tensor):
        self.w, self.wb = weight, weight.bfloat16()
        self.norms = weight.norm(dim=1)  # |w_v|, fp32
        self.fallbacks = 0  # rows rechecked in fp32

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.w)

    def argmax(self, hidden: torch.Tensor, fallback: bool = True) -> list[int]:
        approx = F.linear(hidden.bfloat16(), self.wb).float()
        top = approx.topk(self.k, dim=-1).indices
        best, j = torch.einsum("mkd,md->mk", self.w[top], hidden).max(-1)
        tokens = top.gather(1, j[:, None])[:, 0]
        # The most any other token's fp32 logit could be (x + 2^-8 |x| grows with x).
        ceiling = approx.abs().mul_(2.0**-8).add_(approx).addcmul_(
            self.norms.expand_as(approx), hidden.norm(dim=1, keepdim=True).expand_as(approx), value=self.gamma)
        ceiling.scatter_(1, top, float("-inf"))
        unsettled = ceiling.max(-1).values >= best
        if fallback and bool(unsettled.any()):
            self.fallbacks += int(unsettled.sum())
            tokens[unsettled] = self.logits(hidden[unsettled]).argmax(-1)
        return tokens.tolist()

    @classmethod
    def if_faster(cls, weight: torch.Tensor, rows: int) -> tuple[GreedyHead | None, str]:
        """The candidate head where it beats fp32 logits on this machine (bf16 is slow on a CPU without
        native bf16), with the timings for the log."""
        head, hidden = cls(weight), torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)

        def fastest(f) -> float:
            f()
            return min(_seconds(f) for _ in range(3))

        fp32 = fastest(lambda: head.logits(hidden).argmax(-1).tolist())
        ours = fastest(lambda: head.argmax(hidden, fallback=False))
        said = f"candidates {1000 * ours:.1f} ms, fp32 logits {1000 * fp32:.1f} ms, {rows} rows"
        return (head, said) if ours < 0.8 * fp32 else (None, said)


def _seconds(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


class HiddenOut(torch.nn.Module):
    """Stands in for the model's head when the engine applies the head itself (`GreedyHead`): the
    model's `logits` are then its final hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def next_tokens(rows: list[Row], out: torch.Tensor, head: GreedyHead | None) -> Iterator[int | Exception]:
    """Each row's next token, in row order, or the exception its own sampling raised (that row fails,
    the others go on). `out`: each row's logits, or with `head` its final hidden state (greedy rows
    then get the head's checked argmax, the others their fp32 logits)."""
    plain = [k for k, row in enumerate(rows) if row.job.temperature == 0 and not (row.job.presence or row.job.frequency)]
    if head is None:
        logits, greedy = out, dict(zip(plain, out[plain].argmax(-1).tolist()))
    else:
        greedy = dict(zip(plain, head.argmax(out[plain]))) if plain else {}
        others = [k for k in range(len(rows)) if k not in greedy]
        logits = dict(zip(others, head.logits(out[others]))) if others else {}
    for k, row in enumerate(rows):
        if k in greedy:
            yield greedy[k]
            continue
        try:
            token = sample_row(row, logits[k])
        except Exception as exc:
            token = exc
        yield token


def sample_row(row: Row, logits: torch.Tensor) -> int:
    """One row's token from its logits: penalties, then greedy or temperature + top-p with the row's
    own generator."""
    job = row.job
    if (job.presence or job.frequency) and row.ids:
        counts = torch.bincount(torch.tensor(row.ids, device=logits.device), minlength=logits.shape[-1])
        logits = logits - job.frequency * counts - job.presence * (counts > 0)
    if job.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / job.temperature, dim=-1)
    if job.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= job.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(drop, 0))
    return int(torch.multinomial(probs, 1, generator=row.generator))


def advance(row: Row, token: int, eos_ids: set[int], detok) -> None:
    """Give `row` its next token: finish it at eos, a stop string or max_tokens, and send its
    reply what can be sent now (`detok`: the worker's own tokenizer)."""
    job = row.job
    row.sampled += 1
    row.last = token
    text = None
    if token in eos_ids:
        row.finish = "stop"
    else:
        row.ids.append(token)
        if job.stops or job.stream:
            # Decode everything so far and diff: decoding token by token breaks multi-byte characters.
            text = detok.decode(row.ids, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in job.stops) if i >= 0]
            if cuts:
                text, row.finish = text[: min(cuts)], "stop"
    if row.finish is None and row.sampled >= job.max_new:
        row.finish = "length"
    if row.finish is not None:
        if text is None:
            text = detok.decode(row.ids, skip_special_tokens=True)
        if job.stream and len(text) > row.emitted:
            job.reply.send("delta", row.index, text[row.emitted:])
        job.reply.send("done", row.index, text, row.finish, row.sampled)
    elif job.stream:
        ready = streamable(text, job.stops)
        if len(ready) > row.emitted:
            job.reply.send("delta", row.index, ready[row.emitted:])
            row.emitted = len(ready)


def streamable(text: str, stops: list[str]) -> str:
    """The part of a row's text that can be sent now: not a trailing half of a UTF-8 character
    (decoded as U+FFFD until its last byte arrives), not a tail that may be the start of a stop."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold]
