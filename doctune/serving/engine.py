"""The engine: one worker thread owns the model and decodes every running request as a row of one
batch. It admits queued jobs (a padded prefill, or a prefill inside the running rows' decode step),
steps the batch, and runs embedding requests a piece at a time between steps, time-shared with the
running rows. It knows jobs, not HTTP: errors are plain exceptions, and `snapshot()` is what
/v1/stats reports."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from doctune.serving.attention import Ragged, register_ragged
from doctune.serving.batch import Batch, Row, RunningBatch, cache_of, new_row, store_prefix
from doctune.serving.embedding import Embedding, run_piece
from doctune.serving.jobs import BASE, EmbedJob, GenJob
from doctune.serving.kv_cache import PrefixStore, growing_layer
from doctune.serving.loading import cpu_threads, load_adapters, load_model, warm_up
from doctune.serving.sampling import GreedyHead, HiddenOut, advance, next_tokens

log = logging.getLogger(__name__)

# Embedding requests in progress at once, taking pieces in turn (the rest wait): a small request is
# not stuck behind a huge one, and at most this many long inputs hold keys/values (an 8,192-token
# input's are ~380 MB on the offline model).
EMBEDDINGS_AT_ONCE = 4
SHUTTING_DOWN = "the server is shutting down"


class Engine:
    """Owns the model in one thread and decodes every running request as a row of one batch."""

    def __init__(self, model_path: str, device: str = "cpu", adapters: dict[str, str] | None = None,
                 max_batch: int = 16, batch_wait_ms: float = 10, prefix_cache_mb: float = 256,
                 embed_piece_tokens: int = 256):
        """`embed_piece_tokens`: the most token positions one piece of embedding work runs. Measured
        here on the offline model (2 cores): a 256-token piece takes 0.23 s at the start of an input
        and 0.92 s at the end of an 8,192-token one, and the pieces of an input add up to what one
        forward over it costs (28.9 s against 30.5 s for 8,192 tokens)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be at least 1")
        if embed_piece_tokens < 1:
            raise ValueError(f"embed_piece_tokens={embed_piece_tokens}: must be at least 1")
        self.device = torch.device(device)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.embed_piece = embed_piece_tokens
        path = Path(model_path)
        self.tok, self._detok, model, dtype = load_model(path, self.device)
        self.lm, self.peft = model, None
        if adapters:
            self.peft = load_adapters(model, adapters)
            self.lm = self.peft.get_base_model()
        self.adapters = list(adapters or {})
        self.adapter_dirs = {name: str(folder) for name, folder in (adapters or {}).items()}
        self.decoder = self.lm.get_decoder()
        cfg = self.lm.config.get_text_config()
        self.hidden_size = cfg.hidden_size
        self.context = getattr(cfg, "max_position_embeddings", None) or 2048
        self.vocab = cfg.vocab_size
        eos = self.lm.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tok.eos_token_id is not None:
            self.eos_ids.add(self.tok.eos_token_id)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos_ids, default=0)
        self._new_cache = lambda: DynamicCache(config=self.lm.config)
        self._embed_cache = self._new_cache  # transformers' own layers (sliding windows included)
        # Joining a running batch pads caches on the left; that is only right for full-attention
        # layers (a sliding-window layer keeps its own offsets). Other models batch per arrival wave,
        # with transformers' own cache layers and no prefix reuse.
        self._can_join = all(type(layer) is DynamicLayer for layer in self._new_cache().layers)
        self._prefixes = None
        if self._can_join:
            growing = growing_layer()

            def new_cache():
                cache = DynamicCache(config=self.lm.config)
                cache.layers = [growing() for _ in cache.layers]
                return cache

            self._new_cache = new_cache
            if prefix_cache_mb > 0:
                self._prefixes = PrefixStore(int(prefix_cache_mb * 2**20))
        # Newcomers are prefilled in the running rows' decode forward (`Ragged`) where the model
        # runs transformers' SDPA attention: ours dispatches to it per part.
        self._ragged = self._can_join and self.lm.config._attn_implementation == "sdpa"
        if self._ragged:
            self.lm.set_attn_implementation(register_ragged())
        self.threads = cpu_threads() if self.device.type == "cpu" else torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)  # the probe below times what the worker thread will run
        # Greedy rows take the head's argmax from bf16 candidates checked in fp32 where that is faster.
        self._head, head = None, self.lm.get_output_embeddings()
        if self.device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None and dtype == torch.float32:
            with torch.inference_mode():
                self._head, said = GreedyHead.if_faster(head.weight.detach(), rows=min(8, max_batch))
            log.info("greedy rows: %s (%s)", "argmax of bf16 candidates checked in fp32" if self._head else
                     "argmax of fp32 logits", said)
            if self._head is not None:
                self.lm.set_output_embeddings(HiddenOut())
        self.stats = {"requests": 0, "embedding_requests": 0, "embedding_tokens": 0, "batches": 0,
                      "max_batch_size": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
                      "prefilled_in_decode_step": 0, "greedy_rows_rechecked_in_fp32": 0}
        self.queue: queue.Queue = queue.Queue()
        self._pending: deque[GenJob] = deque()
        self._running = RunningBatch(self.device, trim=self._can_join)
        self._embeds: deque[Embedding] = deque()  # the first EMBEDDINGS_AT_ONCE are in progress
        self._embed_at = 0.0  # with rows running, no embedding piece before this (time.monotonic())
        self._stop = threading.Event()
        self._closing = threading.Lock()  # submit() against the worker's last look at the queue
        self._closed = False
        self._thread: threading.Thread | None = None
        warm_up(self.lm, self.pad_id, self.device)
        log.info("loaded %s (%s, %s) on %s, %d threads, context %d, adapters: %s", path, type(model).__name__,
                 dtype, self.device, self.threads, self.context, ", ".join(self.adapters) or "none")

    # -- called from the HTTP side

    def start(self) -> None:
        self._stop.clear()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="doctune-model", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Tell the worker to stop: it fails every request it holds ("the server is shutting down")
        after the step or piece it is running. `wait=False` only tells it (safe in a signal handler)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: GenJob | EmbedJob) -> None:
        """Queue a job; once the worker has stopped, fail it at once rather than leave its client waiting."""
        with self._closing:
            if not self._closed:
                self.queue.put(job)
                return
        job.reply.fail(SHUTTING_DOWN)

    def snapshot(self) -> dict:
        """The counters, plus the rows decoding now, the jobs waiting, and the embedding requests in
        progress and waiting. The token counters move only when a row ends, so they cannot tell an
        idle server from one still decoding long rows (a client that left mid-stream, say): `running`
        and `waiting` can, and `embedding_running` shows a long embedding that would otherwise look
        idle (`embedding_tokens` moves with each of its pieces)."""
        embeds = len(self._embeds)
        return {**self.stats, "running": len(self._running.rows),
                "waiting": len(self._pending) + self.queue.qsize(),
                "embedding_running": min(embeds, EMBEDDINGS_AT_ONCE),
                "embedding_waiting": max(embeds - EMBEDDINGS_AT_ONCE, 0)}

    # -- the worker thread (tests drive turn(), or admit() and step(), directly)

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stop.is_set():
                self.turn()
        self._close()

    def turn(self) -> None:
        """One turn of the worker: admit what fits, one decode step of the running rows, and a piece of
        embedding work when it is its turn."""
        try:
            self.admit()
            if self._running.rows:
                self.step()
        except Exception as exc:  # one bad batch must not take the server down
            log.exception("decoding failed; failing its %d rows", len(self._running.rows))
            for row in self._running.rows:
                row.job.reply.fail(f"generation failed: {type(exc).__name__}: {exc}")
            self._running.clear()
        self.embed_turn()

    def _close(self) -> None:
        """Fail every request the worker holds: the running rows, the queued jobs, the embeddings; and
        any submitted from now on (`submit`)."""
        with self._closing:
            self._closed = True
            queued = self._drain()
        jobs = [*{id(row.job): row.job for row in self._running.rows}.values(), *self._pending, *queued,
                *(e.job for e in self._embeds)]
        self._running.clear()
        self._pending.clear()
        self._embeds.clear()
        for job in jobs:
            job.reply.fail(SHUTTING_DOWN)

    def _drain(self) -> list:
        jobs = []
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                return jobs

    def _take(self, job: GenJob | EmbedJob) -> None:
        if isinstance(job, EmbedJob):
            self._embeds.append(Embedding.of(job))  # run a piece at a time by embed_turn()
        else:
            self._pending.append(job)

    def admit(self) -> None:
        """Take queued jobs; start those that fit the batch (idle: after waiting `batch_wait_ms`
        for more), prefilled inside the next decode step where possible."""
        running = self._running.rows
        if not running and not self._pending and not self._embeds:
            try:
                self._take(self.queue.get(timeout=0.1))
            except queue.Empty:
                return
            # Idle: give requests sent at the same moment a few ms to arrive and share the prefill.
            deadline = time.monotonic() + self.batch_wait
            while sum(j.n for j in self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    self._take(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        for job in self._drain():
            self._take(job)
        running = self._running.rows
        jobs, free = [], self.max_batch - len(running)
        while self._pending and self._pending[0].n <= free and (self._can_join or not running):
            job = self._pending.popleft()
            if not job.reply.cancelled:
                jobs.append(job)
                free -= job.n
        if jobs:
            adapters = {job.adapter for job in jobs} | {row.job.adapter for row in running}
            if self._ragged and (self.peft is None or len(adapters) == 1):
                self._step_with(jobs)
            else:  # rows of different adapters need peft's batch rows: padded prefill apart
                self._prefill(jobs)

    def _forward(self, rows: list[Row], **inputs) -> torch.Tensor:
        """Last-position logits (float32) for the rows, or with `self._head` their final hidden
        states; each row with its own adapter."""
        inputs.update(use_cache=True, logits_to_keep=1)
        if self.peft is not None:
            out = self.peft(**inputs, adapter_names=[r.job.adapter or BASE for r in rows])
        else:
            out = self.lm(**inputs)
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(rows))
        return out.logits[:, -1].float()

    def _lookup(self, job: GenJob) -> list:
        return self._prefixes.lookup(job.adapter, job.prompt) if self._prefixes else []

    def _prefill(self, jobs: list[GenJob]) -> None:
        """Prefill newcomers and join them to the running batch. A prompt that begins with stored
        blocks prefills only the rest; prompts left with similar lengths share a forward (each
        padded position costs as much as a real one)."""
        cached = {id(job): self._lookup(job) for job in jobs}
        block = self._prefixes.block if self._prefixes else 0
        todo = {id(job): len(job.prompt) - block * len(cached[id(job)]) for job in jobs}
        groups: list[list[GenJob]] = []
        for job in sorted(jobs, key=lambda j: todo[id(j)], reverse=True):
            if groups and self._can_join and 2 * todo[id(job)] >= todo[id(groups[-1][0])]:
                groups[-1].append(job)
            elif groups and not self._can_join:  # one forward: nothing can join it afterwards
                groups[0].append(job)
            else:
                groups.append([job])
        for group in groups:
            self._prefill_group(group, [cached[id(job)] for job in group])

    def _prefill_group(self, jobs: list[GenJob], cached: list[list]) -> None:
        batch = Batch.of(jobs, joined=len(self._running.rows))
        rows, have = [], []  # have: each row's prompt tokens found in the prefix store
        block = self._prefixes.block if self._prefixes else 0
        for job, blocks in zip(jobs, cached):
            for i in range(job.n):
                rows.append(new_row(job, i, batch, self.device))
                have.append(block * len(blocks))
        batch.open = len(rows)
        # Columns: [padding, stored prefix | padding, rest of the prompt]: left padding on both sides
        # of the boundary, so every row's next token lands in the last column.
        past, width = max(have), max(len(r.job.prompt) - h for r, h in zip(rows, have))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), past + width), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for k, (row, h) in enumerate(zip(rows, have)):
            rest = len(row.job.prompt) - h
            ids[k, width - rest:] = torch.tensor(row.job.prompt[h:])
            mask[k, past - h: past] = 1
            mask[k, past + width - rest:] = 1
            pos[k, width - rest:] = torch.arange(h, len(row.job.prompt))
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        cache = cache_of(self._new_cache, [blocks for job, blocks in zip(jobs, cached) for _ in range(job.n)], past,
                         room=width)
        try:
            last = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        except Exception as exc:  # the running rows are untouched; fail only the newcomers
            log.exception("prefill of %d requests failed", len(jobs))
            for job in jobs:
                job.reply.fail(f"generation failed: {type(exc).__name__}: {exc}")
            return
        self._count_admitted(batch, cached)
        if self._prefixes is not None:
            k = 0
            for job, blocks in zip(jobs, cached):
                store_prefix(self._prefixes, job, len(blocks), cache, k,
                             first_new=past + width - (len(job.prompt) - block * len(blocks)))
                k += job.n
        self._running.join(rows, [(cache, mask)])
        self._sample(rows, last)
        self._drop_finished()

    def _count_admitted(self, batch: Batch, cached: list[list]) -> None:
        self.stats["requests"] += batch.requests
        self.stats["batches"] += 1
        self.stats["prompt_tokens"] += batch.prompt_tokens
        self.stats["cached_prompt_tokens"] += sum(len(blocks) for blocks in cached) * (self._prefixes.block if self._prefixes else 0)

    def _step_with(self, jobs: list[GenJob]) -> None:
        """Prefill newcomers in the forward of the running rows' next decode step, flat and without
        padding (`Ragged`), and join them to the batch: on CPU their prompt tokens ride on the
        step's reads of the weights (measured here: a 30-token prefill beside an 8-row step cost
        138 ms in one forward, 182 ms in two). A prompt that begins with stored blocks prefills only
        the rest."""
        now, block = self._running, self._prefixes.block if self._prefixes else 0
        running = now.rows
        cached = [self._lookup(job) for job in jobs]
        ids, pos, keep = [r.last for r in running], [r.pos for r in running], list(range(len(running)))
        filled = [layer.get_seq_length() for layer in now.cache.layers] if running else []
        if running:
            now.mask = F.pad(now.mask, (0, 1), value=1)
        ragged = Ragged(len(running), now.cache, now.mask[:, None, None, :].bool() if running else None)
        for job, blocks in zip(jobs, cached):
            have = block * len(blocks)
            rest = len(job.prompt) - have
            cache = cache_of(self._new_cache, [blocks], have, room=rest)
            # Causal over its own tokens, every stored one visible; without stored ones SDPA's causal flag.
            mask = torch.ones(rest, have + rest, dtype=torch.bool, device=self.device).tril(have)[None, None] if have else None
            ragged.parts.append((len(ids), len(ids) + rest, cache, mask))
            ids += job.prompt[have:]
            pos += range(have, len(job.prompt))
            keep.append(len(ids) - 1)
        inputs = dict(input_ids=torch.tensor([ids], device=self.device), position_ids=torch.tensor([pos], device=self.device),
                      # A prepared (4D) mask, so transformers builds none: each part brings its own.
                      attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device),
                      use_cache=False, logits_to_keep=torch.tensor(keep, device=self.device), ragged=ragged)
        try:
            if self.peft is not None:
                out = self.peft(**inputs, adapter_names=[jobs[0].adapter or BASE])
            else:
                out = self.lm(**inputs)
        except Exception:
            log.exception("a decode step with %d newcomers failed; prefilling them apart", len(jobs))
            for layer, n in zip(now.cache.layers if running else [], filled):
                layer.truncate(n)  # the running rows as they were
            if running:
                now.mask = now.mask[:, :-1]
            self._prefill(jobs)  # a bad newcomer fails alone there
            return
        last = out.logits[0].float()  # logits, or with self._head hidden states
        for row in running:
            row.pos += 1
        batch = Batch.of(jobs, joined=len(running))
        rows, parts, index = [], [], list(range(len(running)))
        for k, (job, (_, _, cache, _)) in enumerate(zip(jobs, ragged.parts)):
            for i in range(job.n):
                rows.append(new_row(job, i, batch, self.device))
                parts.append((cache, torch.ones((1, len(job.prompt)), dtype=torch.long, device=self.device)))
                index.append(len(running) + k)
            if self._prefixes is not None:
                store_prefix(self._prefixes, job, len(cached[k]), cache, 0, first_new=block * len(cached[k]))
        batch.open = len(rows)
        self._count_admitted(batch, cached)
        self.stats["prefilled_in_decode_step"] += len(jobs) if running else 0
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(running) + len(rows))
        now.join(rows, parts)
        self._sample(now.rows, last[index])
        self._drop_finished()

    def step(self) -> None:
        """One decode step of every running row."""
        now = self._running
        rows = now.rows
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)
        now.mask = F.pad(now.mask, (0, 1), value=1)
        last = self._forward(rows, input_ids=ids, attention_mask=now.mask, position_ids=pos,
                             past_key_values=now.cache)
        for row in rows:
            row.pos += 1
        self._sample(rows, last)
        self._drop_finished()

    def _sample(self, rows: list[Row], out: torch.Tensor) -> None:
        """`out`: each row's logits, or with `self._head` its final hidden state. A row whose sampling
        or bookkeeping fails fails alone: the other rows of the batch go on."""
        for row, token in zip(rows, next_tokens(rows, out, self._head)):
            try:
                if isinstance(token, Exception):
                    raise token
                advance(row, token, self.eos_ids, self._detok)
            except Exception as exc:
                self._fail_row(row, exc)
        if self._head is not None:
            self.stats["greedy_rows_rechecked_in_fp32"] = self._head.fallbacks

    def _fail_row(self, row: Row, exc: Exception) -> None:
        """Answer `row`'s request with the error and let all its rows (its other choices too) leave the
        batch at the next `_drop_finished`."""
        log.error("a row of a %d-token prompt failed; failing its request alone", len(row.job.prompt), exc_info=exc)
        row.job.reply.fail(f"generation failed: {type(exc).__name__}: {exc}")
        row.job.reply.cancelled = True

    def _drop_finished(self) -> None:
        self.stats["completion_tokens"] += self._running.drop_finished()

    @contextmanager
    def _adapter(self, name: str | None):
        if self.peft is None:
            yield
        elif name is None:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(name)
            yield

    def embed_turn(self) -> None:
        """Run the next piece of embedding work if there is any and it is its turn. While rows are
        running, a piece that took t seconds is followed by about t seconds of decode steps, so chat
        rows keep at least half the worker (one request run whole stalled a 0.28 s chat to 4.06 s
        here, 1.1 s to 60.8 s for a user). The requests in progress take pieces in turn; one whose
        client left is dropped before its next piece."""
        if not self._embeds or (self._running.rows and time.monotonic() < self._embed_at):
            return
        self._drop_abandoned()
        if not self._embeds:
            return
        e = self._embeds[0]  # left in place while it runs: /v1/stats still counts it
        start = time.monotonic()
        try:
            with self._adapter(e.job.adapter):
                self.stats["embedding_tokens"] += run_piece(e, self.decoder, self.embed_piece, self.max_batch,
                                                            self.pad_id, self.device, self._embed_cache)
        except Exception as exc:
            log.exception("embedding %d inputs failed", len(e.job.inputs))
            self._embeds.popleft()
            e.job.reply.fail(f"embedding failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self._embed_at = time.monotonic() + (time.monotonic() - start)
        if e.finished():
            self._embeds.popleft()
            self.stats["embedding_requests"] += 1
            e.job.reply.send("embeddings", e.out)
        else:  # to the end of those in progress; inserted before it leaves the front, so stats never miss it
            self._embeds.insert(min(len(self._embeds), EMBEDDINGS_AT_ONCE), e)
            self._embeds.popleft()

    def _drop_abandoned(self) -> None:
        """Forget the embedding requests whose clients left (their reply is cancelled)."""
        gone = [e for e in self._embeds if e.job.reply.cancelled]
        if gone:
            self._embeds = deque(e for e in self._embeds if not e.job.reply.cancelled)
            for e in gone:
                log.info("embedding dropped: its client left after %d of its %d tokens", e.tokens, e.size())
