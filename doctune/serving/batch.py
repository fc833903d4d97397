"""The running batch: every request's choices decode as rows of one batch over one key/value cache.
Batch is a group of requests admitted together, Row one choice of one request, RunningBatch the rows
with their cache and attention mask; new rows join it and finished rows leave it (TGI's
from_pb / concatenate / filter)."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from doctune.serving.jobs import GenJob
from doctune.serving.kv_cache import PrefixStore

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Requests admitted together; logged when their last row finishes."""

    requests: int
    rows: int
    prompt_tokens: int
    joined: int  # rows already running when these were admitted
    started: float = field(default_factory=time.perf_counter)
    new_tokens: int = 0
    open: int = 0

    @classmethod
    def of(cls, jobs: list[GenJob], joined: int) -> Batch:
        return cls(requests=len(jobs), rows=sum(j.n for j in jobs),
                   prompt_tokens=sum(len(j.prompt) for j in jobs), joined=joined)


@dataclass
class Row:
    """One choice of one request: one row of the running batch."""

    job: GenJob
    index: int
    batch: Batch
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sampled: int = 0  # tokens generated, eos included (that is what completion_tokens counts)
    last: int = 0  # the token to feed at the next step
    pos: int = 0  # its position id
    emitted: int = 0  # characters already streamed
    finish: str | None = None


def new_row(job: GenJob, index: int, batch: Batch, device: torch.device) -> Row:
    gen = None
    if job.temperature > 0:
        # Per-row generator: the same seed gives the same sample whoever shares the batch.
        gen = torch.Generator(device=device)
        gen.manual_seed((job.seed + index) % 2**64 if job.seed is not None else secrets.randbits(63))
    return Row(job, index, batch, gen, pos=len(job.prompt))


class RunningBatch:
    """The rows being decoded, their shared cache and their 2D attention mask ([rows, columns],
    left-padded). `trim`: drop the columns that became padding for every row (only for caches
    whose layers can drop columns on the left)."""

    def __init__(self, device: torch.device, trim: bool):
        self.device, self.trim = device, trim
        self.rows: list[Row] = []
        self.cache = self.mask = None

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    def join(self, rows: list[Row], parts: list[tuple[object, torch.Tensor]]) -> None:
        """Append freshly prefilled rows to the running batch. `parts` are (cache, 2D mask) in row
        order (one cache may come n times: n choices of one prompt); the shorter are left-padded."""
        if not self.rows and len(parts) == 1:
            self.rows, (self.cache, self.mask) = rows, parts[0]
            return
        if self.rows:
            parts = [(self.cache, self.mask), *parts]
        width = max(mask.shape[1] for _, mask in parts)
        cache = parts[0][0]
        for li, layer in enumerate(cache.layers):
            layer.set_rows([(c.layers[li].keys, c.layers[li].values) for c, _ in parts], width)
        self.cache, self.mask = cache, torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, mask in parts])
        self.rows = self.rows + rows

    def drop_finished(self) -> int:
        """Let finished and cancelled rows leave (logging each admitted group as its last row
        ends); the tokens the leaving rows generated."""
        keep, spent = [], 0
        for k, row in enumerate(self.rows):
            if row.finish is None and not row.job.reply.cancelled:
                keep.append(k)
                continue
            batch = row.batch
            batch.new_tokens += row.sampled
            batch.open -= 1
            spent += row.sampled
            if batch.open == 0:
                took = time.perf_counter() - batch.started
                log.info("batch: %d requests (%d rows%s), %d prompt + %d new tokens in %.2f s, %.1f new tokens/s",
                         batch.requests, batch.rows, f", joined {batch.joined} running" if batch.joined else "",
                         batch.prompt_tokens, batch.new_tokens, took, batch.new_tokens / max(took, 1e-9))
        if len(keep) == len(self.rows):
            return spent
        if not keep:
            self.clear()
            return spent
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[k] for k in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        # Columns that are padding for every remaining row cost attention compute at every step.
        first = int(self.mask.any(0).int().argmax())
        if first > 0 and self.trim:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.drop_left(first)
        return spent


def cache_of(new_cache, by_row: list[list], past: int, room: int):
    """A new cache (from `new_cache()`) holding each row's stored prefix blocks, left-padded to
    `past` columns, with room for `room` more positions."""
    cache = new_cache()
    if past:
        some = next(blocks for blocks in by_row if blocks)
        for li, layer in enumerate(cache.layers):
            blank = some[0][li][0][:, :0]  # [heads, 0, head_dim]: a row with nothing stored
            layer.set_rows([tuple(torch.cat([b[li][j] for b in blocks] or [blank], dim=-2)[None] for j in (0, 1))
                            for blocks in by_row], past, room=room + layer.room)
    return cache


def store_prefix(prefixes: PrefixStore, job: GenJob, stored: int, cache, row: int, first_new: int) -> None:
    """Keep the whole blocks of `job`'s prompt after its `stored` ones, read from `row` of
    `cache`, where the prompt's first token not found in the store sits at column `first_new`."""
    block = prefixes.block

    def block_kv(i):
        lo = first_new + (i - stored) * block
        return [(layer.keys[row, :, lo: lo + block], layer.values[row, :, lo: lo + block]) for layer in cache.layers]

    prefixes.store(job.adapter, job.prompt, stored, block_kv)
