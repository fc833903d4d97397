"""The engine: one worker thread owns the model and decodes every running request as a row of one
batch. It admits queued jobs (a padded prefill, or a prefill inside the running rows' decode step),
steps the batch, and runs embedding jobs between steps. It knows jobs, not HTTP: errors are plain
exceptions, and `snapshot()` is what /v1/stats reports."""

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
from doctune.serving.jobs import BASE, EmbedJob, GenJob
from doctune.serving.kv_cache import PrefixStore, growing_layer
from doctune.serving.loading import cpu_threads, load_adapters, load_model, warm_up
from doctune.serving.sampling import GreedyHead, HiddenOut, advance, next_tokens

log = logging.getLogger(__name__)


class Engine:
    """Owns the model in one thread and decodes every running request as a row of one batch."""

    def __init__(self, model_path: str, device: str = "cpu", adapters: dict[str, str] | None = None,
                 max_batch: int = 16, batch_wait_ms: float = 10, prefix_cache_mb: float = 256):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be at least 1")
        self.device = torch.device(device)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
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
        self.stats = {"requests": 0, "embedding_requests": 0, "batches": 0, "max_batch_size": 0,
                      "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
                      "prefilled_in_decode_step": 0, "greedy_rows_rechecked_in_fp32": 0}
        self.queue: queue.Queue = queue.Queue()
        self._pending: deque[GenJob] = deque()
        self._running = RunningBatch(self.device, trim=self._can_join)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        warm_up(self.lm, self.pad_id, self.device)
        log.info("loaded %s (%s, %s) on %s, %d threads, context %d, adapters: %s", path, type(model).__name__,
                 dtype, self.device, self.threads, self.context, ", ".join(self.adapters) or "none")

    # -- called from the HTTP side

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="doctune-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: GenJob | EmbedJob) -> None:
        self.queue.put(job)

    def snapshot(self) -> dict:
        """The counters, plus the rows decoding now and the jobs waiting. The token counters move
        only when a row ends, so they cannot tell an idle server from one still decoding long rows
        (a client that left mid-stream, say): `running` and `waiting` can."""
        return {**self.stats, "running": len(self._running.rows),
                "waiting": len(self._pending) + self.queue.qsize()}

    # -- the worker thread (tests drive admit() and step() directly)

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self.admit()
                    if self._running.rows:
                        self.step()
                except Exception as exc:  # one bad batch must not take the server down
                    log.exception("decoding failed; failing its %d rows", len(self._running.rows))
                    for row in self._running.rows:
                        row.job.reply.fail(f"generation failed: {type(exc).__name__}: {exc}")
                    self._running.clear()
        for job in [*self._pending, *self._drain()]:
            job.reply.fail("the server is shutting down")

    def _drain(self) -> list:
        jobs = []
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                return jobs

    def _take(self, job: GenJob | EmbedJob) -> None:
        if isinstance(job, EmbedJob):
            self._embed(job)  # one forward pass: run it between decode steps
        else:
            self._pending.append(job)

    def admit(self) -> None:
        """Take queued jobs; start those that fit the batch (idle: after waiting `batch_wait_ms`
        for more), prefilled inside the next decode step where possible."""
        running = self._running.rows
        if not running and not self._pending:
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
        """`out`: each row's logits, or with `self._head` its final hidden state."""
        for row, token in zip(rows, next_tokens(rows, out, self._head)):
            advance(row, token, self.eos_ids, self._detok)
        if self._head is not None:
            self.stats["greedy_rows_rechecked_in_fp32"] = self._head.fallbacks

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

    def _embed(self, job: EmbedJob) -> None:
        """Mean of the last hidden state over each input's tokens, L2-normalised."""
        try:
            out: list[torch.Tensor | None] = [None] * len(job.inputs)
            order = sorted(range(len(job.inputs)), key=lambda i: len(job.inputs[i]))
            for start in range(0, len(order), self.max_batch):
                part = order[start:start + self.max_batch]
                width = max(len(job.inputs[i]) for i in part)
                ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for k, i in enumerate(part):  # right padding: causal attention never sees it
                    ids[k, : len(job.inputs[i])] = torch.tensor(job.inputs[i])
                    mask[k, : len(job.inputs[i])] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                with self._adapter(job.adapter):
                    hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                weights = mask.unsqueeze(-1).to(torch.float32)
                pooled = F.normalize((hidden.float() * weights).sum(1) / weights.sum(1), dim=-1).cpu()
                for k, i in enumerate(part):
                    out[i] = pooled[k]
            self.stats["embedding_requests"] += 1
            job.reply.send("embeddings", out)
        except Exception as exc:
            log.exception("embedding %d inputs failed", len(job.inputs))
            job.reply.fail(f"embedding failed: {type(exc).__name__}: {exc}")
