"""doctune's local OpenAI-compatible endpoint: the embedded default LLM for synthesis, and the
way a fine-tuned model (or LoRA adapters over the base) is served afterwards.

Why our own server and not `transformers serve`: it checks no API key, ignores temperature/seed
unless sampling is switched on elsewhere, leaves stop strings in the output and serves one request
at a time (see FINDINGS.md). Batching concurrent requests is worth ~3x on 2 cores, so:

- one worker thread owns the model; HTTP handlers only validate, tokenize and wait on a queue;
- the worker decodes all running requests as rows of one batch with a KV cache (a manual loop, so
  each row samples with its own temperature/top_p/seed and stops at its own eos/stop/max_tokens);
- new requests join a running batch at a decode step: their prompt tokens go through the same
  forward as the running rows' next tokens, flat and unpadded (`_Ragged`), and their cache is
  left-padded onto the batch's; a finished row leaves the batch at once;
- when idle, the first request waits `batch_wait_ms` for others so their prefill is shared;
- prompts that start alike (synthesis' few-shot prompts, a template's default system prompt) reuse
  the stored keys/values of that start and prefill only the rest (`_PrefixStore`): on 2 cores the
  prefill of a ~250-token prompt costs more than decoding its answer;
- the cache appends into spare room instead of concatenating at every step (`_growing_layer`);
- greedy rows take the head's argmax from bf16 candidates checked in fp32 (`_GreedyHead`), where a
  probe at load finds that faster than fp32 logits: the head reads a fifth of a small model's weights.

The wire format reuses the response models of the `openai` package. `plan_models` decides what
`doctune serve` serves (the base, the promoted adapter, named adapters); `check_exposure` refuses a
server that anyone on the network could use.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from openai.types import CompletionUsage, CreateEmbeddingResponse, Embedding, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.create_embedding_response import Usage as EmbeddingUsage
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

# A 135M model asked for an open-ended answer can loop until the context is full; without an
# explicit max_tokens we stop it here rather than at 8k tokens.
DEFAULT_MAX_TOKENS = 1024
MAX_STOPS = 16
BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
PROMOTED = "promoted"  # the model name of the registry's promoted adapter
KEY_ENV = "DOCTUNE_SERVE_API_KEY"


# ---------------------------------------------------------------- requests


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class ChatRequest(BaseModel):
    # An unknown field is refused, not ignored: a client asking for something this server does not
    # do (audio, reasoning_effort, vLLM's top_k...) must learn so instead of getting a plain answer.
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Accepted only so that asking for them fails loudly instead of being silently ignored.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    functions: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    # Bookkeeping that does not change the answer: accepted and ignored, as other local servers do.
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None


class APIError(Exception):
    """An error the client gets as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# ---------------------------------------------------------------- the worker's units of work


@dataclass
class _Reply:
    """Where the worker sends a request's events: an asyncio queue on the server's event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away: stop spending compute on it
    failed: bool = False

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled = True

    def fail(self, message: str) -> None:
        if not self.failed:
            self.failed = True
            self.send("error", message)


@dataclass
class GenJob:
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    presence: float
    frequency: float
    seed: int | None
    stops: list[str]
    n: int
    adapter: str | None
    stream: bool
    reply: _Reply


@dataclass
class EmbedJob:
    inputs: list[list[int]]
    adapter: str | None
    reply: _Reply


@dataclass
class _Batch:
    """Requests admitted together; logged when their last row finishes."""

    requests: int
    rows: int
    prompt_tokens: int
    joined: int  # rows already running when these were admitted
    started: float = field(default_factory=time.perf_counter)
    new_tokens: int = 0
    open: int = 0


@dataclass
class _Row:
    """One choice of one request: one row of the running batch."""

    job: GenJob
    index: int
    batch: _Batch
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sampled: int = 0  # tokens generated, eos included (that is what completion_tokens counts)
    last: int = 0  # the token to feed at the next step
    pos: int = 0  # its position id
    emitted: int = 0  # characters already streamed
    finish: str | None = None


def cpu_threads() -> int:
    """CPUs this process may really use: its affinity set, capped by a cgroup v2 CPU quota.
    torch's default counts the host's physical cores, which oversubscribes a container."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


@functools.cache
def _growing_layer():
    """A transformers DynamicLayer that appends each step's keys/values into spare room at the end
    of its buffer. DynamicLayer concatenates, allocating and copying the whole cache at every decode
    step: 30% of a 16-row step over ~250-token rows, measured here. Built on first use, so importing
    this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        room = 64  # tokens of spare room per reallocation: one copy every 64 steps instead of every step

        def lazy_initialization(self, key_states, value_states):
            self.device, self._k, self._v, self._n = key_states.device, None, None, 0
            self.is_initialized = True

        # `keys`/`values` are the filled part of the buffers; assigning one (as transformers and
        # the engine do when they select or pad rows) makes it the buffer, without room.
        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, : self._n]

        @keys.setter
        def keys(self, tensor):
            self._k, self._n = tensor, (tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0)

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, : self._n]

        @values.setter
        def values(self, tensor):
            self._v = tensor

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, end = self._n, self._n + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:
                self._k, self._v = self._grown(self._k, key_states, end), self._grown(self._v, value_states, end)
            self._k[:, :, n:end] = key_states
            self._v[:, :, n:end] = value_states
            self._n = end
            return self.keys, self.values

        def _grown(self, old, new, end):
            buf = new.new_empty((*new.shape[:2], end + self.room, new.shape[-1]))
            if old is not None and self._n:
                buf[:, :, : self._n] = old[:, :, : self._n]
            return buf

        def batch_select_indices(self, indices):
            if self._k is not None:  # the whole buffer, room included
                self._k, self._v = self._k[indices], self._v[indices]

        def truncate(self, length: int) -> None:
            """Forget every position from `length` on (the buffer stays)."""
            self._n = min(self._n, length)

        def drop_left(self, columns: int) -> None:
            """Forget the first `columns` positions of every row (a view: no copy, the room stays)."""
            self._k, self._v, self._n = self._k[:, :, columns:], self._v[:, :, columns:], self._n - columns

        def set_rows(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, room: int = 0) -> None:
            """Make the cache these rows' keys/values ([rows, heads, len, dim] each), left-padded to
            `width` with zeros (masked out, but finite: a NaN there would survive the mask), with
            room for `room` more positions before the next copy."""
            k0 = parts[0][0]
            rows = sum(k.shape[0] for k, _ in parts)
            self._k = k0.new_zeros((rows, k0.shape[1], width + max(room, self.room), k0.shape[-1]))
            self._v = torch.zeros_like(self._k)
            start = 0
            for k, v in parts:
                stop = start + k.shape[0]
                self._k[start:stop, :, width - k.shape[-2]: width] = k
                self._v[start:stop, :, width - v.shape[-2]: width] = v
                start = stop
            self._n = width
            self.device, self.is_initialized = k0.device, True

    return GrowingLayer


RAGGED = "doctune_ragged"


@dataclass
class _Ragged:
    """One forward over a flat sequence: the running rows' next tokens first (one each), then each
    newcomer's prompt tokens. The linear layers see all of them at once, so a newcomer's prefill
    shares the decode step's reads of the weights (on CPU a decode step is bound by those reads);
    attention runs per part, against that part's own cache."""

    decode: int  # running rows: tokens 0..decode-1
    running: object  # their cache
    mask: torch.Tensor | None  # [decode, 1, 1, columns] bool: which cached columns each row sees
    parts: list[tuple[int, int, object, torch.Tensor | None]] = field(default_factory=list)  # start, stop, cache, mask


def _ragged_attention(module, query, key, value, attention_mask, ragged: _Ragged | None = None, **kwargs):
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
def _register_ragged() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RAGGED, _ragged_attention)
    AttentionMaskInterface.register(RAGGED, sdpa_mask)  # calls without `ragged` get SDPA's masks
    return RAGGED


class _GreedyHead:
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
    def if_faster(cls, weight: torch.Tensor, rows: int) -> tuple[_GreedyHead | None, str]:
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


class _HiddenOut(torch.nn.Module):
    """Stands in for the model's head when the engine applies the head itself (`_GreedyHead`): the
    model's `logits` are then its final hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class _PrefixStore:
    """Keys/values of recently prefilled prompts, in blocks of `block` tokens, so a prompt that
    starts like an earlier one (synthesis' system line and few-shot examples, a chat template's
    default system prompt) prefills only the rest. A block is found by the adapter and every token
    up to its end, so a hit is always a whole prefix. Least recently used blocks leave first, the
    deepest of a prompt before its first: a chain shortens from its end and stays usable."""

    def __init__(self, budget_bytes: int, block: int = 16):
        self.budget, self.block, self.bytes = budget_bytes, block, 0
        self.blocks: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def _key(self, adapter: str | None, prompt: list[int], i: int) -> tuple:
        return adapter, tuple(prompt[: (i + 1) * self.block])

    def lookup(self, adapter: str | None, prompt: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The stored blocks that begin `prompt`, leaving at least its last token to prefill
        (its logits give the first new token)."""
        found = []
        for i in range((len(prompt) - 1) // self.block):
            key = self._key(adapter, prompt, i)
            if key not in self.blocks:
                break
            found.append(key)
        for key in reversed(found):
            self.blocks.move_to_end(key)
        return [self.blocks[key] for key in found]

    def store(self, adapter: str | None, prompt: list[int], have: int, block_kv) -> None:
        """Keep blocks `have`.. of `prompt` (whole blocks only); `block_kv(i)` gives block i's
        (keys, values) per layer, each [heads, block, head_dim]."""
        new = range(have, len(prompt) // self.block)
        for i in reversed(new):
            key = self._key(adapter, prompt, i)
            if key in self.blocks:  # an identical prompt prefilled beside this one
                continue
            kv = [(k.clone(), v.clone()) for k, v in block_kv(i)]
            size = sum(k.nbytes + v.nbytes for k, v in kv)
            if size > self.budget:
                return
            self.blocks[key] = kv
            self.bytes += size
        for i in reversed(range(have)):
            key = self._key(adapter, prompt, i)
            if key in self.blocks:  # (another group's store of this admission may have dropped it)
                self.blocks.move_to_end(key)
        while self.bytes > self.budget:
            _, kv = self.blocks.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in kv)


def _streamable(text: str, stops: list[str]) -> str:
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


# ---------------------------------------------------------------- the engine


class Engine:
    """Owns the model in one thread and decodes every running request as a row of one batch."""

    def __init__(self, model_path: str, device: str = "cpu", adapters: dict[str, str] | None = None,
                 max_batch: int = 16, batch_wait_ms: float = 10, prefix_cache_mb: float = 256):
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
        from transformers.cache_utils import DynamicLayer

        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be at least 1")
        self.device = torch.device(device)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        path = Path(model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}/config.json is missing: model_path must be a transformers model folder "
                                    "(prepare_base_model() writes one; so does save_pretrained of a merged fine-tune)")
        # Handlers encode while the worker decodes: two tokenizer objects, so the Rust tokenizer is
        # never borrowed by two threads at once.
        self.tok = AutoTokenizer.from_pretrained(path)
        self._detok = AutoTokenizer.from_pretrained(path)
        if not self.tok.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; serve an instruct/chat model "
                             "or add chat_template.jinja to the folder")
        if self.device.type == "cpu":
            dtype = torch.float32  # bf16 speed on CPU varies by machine (FINDINGS.md): fp32 is the safe default
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.lm, self.peft = model, None
        if adapters:
            self.peft = _load_adapters(model, adapters)
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
            growing = _growing_layer()

            def new_cache():
                cache = DynamicCache(config=self.lm.config)
                cache.layers = [growing() for _ in cache.layers]
                return cache

            self._new_cache = new_cache
            if prefix_cache_mb > 0:
                self._prefixes = _PrefixStore(int(prefix_cache_mb * 2**20))
        # Newcomers are prefilled in the running rows' decode forward (`_Ragged`) where the model
        # runs transformers' SDPA attention: ours dispatches to it per part.
        self._ragged = self._can_join and self.lm.config._attn_implementation == "sdpa"
        if self._ragged:
            self.lm.set_attn_implementation(_register_ragged())
        self.threads = cpu_threads() if self.device.type == "cpu" else torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)  # the probe below times what the worker thread will run
        # Greedy rows take the head's argmax from bf16 candidates checked in fp32 where that is faster.
        self._head, head = None, self.lm.get_output_embeddings()
        if self.device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None and dtype == torch.float32:
            with torch.inference_mode():
                self._head, said = _GreedyHead.if_faster(head.weight.detach(), rows=min(8, max_batch))
            log.info("greedy rows: %s (%s)", "argmax of bf16 candidates checked in fp32" if self._head else
                     "argmax of fp32 logits", said)
            if self._head is not None:
                self.lm.set_output_embeddings(_HiddenOut())
        self.stats = {"requests": 0, "embedding_requests": 0, "batches": 0, "max_batch_size": 0,
                      "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
                      "prefilled_in_decode_step": 0, "greedy_rows_rechecked_in_fp32": 0}
        self.queue: queue.Queue = queue.Queue()
        self._pending: deque[GenJob] = deque()
        self._rows: list[_Row] = []
        self._cache = self._mask = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The first forward pages the weights in and sets kernels up (measured here under load: the
        # first 16-request batch 26-57 s, the same batch later 5 s); pay for it before /health says ok.
        with torch.inference_mode():
            self.lm(input_ids=torch.tensor([[self.pad_id] * 8] * 2, device=self.device))
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

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise _bad("messages", f"the model's chat template refused them: {exc}") from exc
        # The template already wrote every special token it wants.
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # -- the worker thread

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as exc:  # one bad batch must not take the server down
                    log.exception("decoding failed; failing its %d rows", len(self._rows))
                    for row in self._rows:
                        row.job.reply.fail(f"generation failed: {type(exc).__name__}: {exc}")
                    self._rows, self._cache, self._mask = [], None, None
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

    def _admit(self) -> None:
        if not self._rows and not self._pending:
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
        jobs, free = [], self.max_batch - len(self._rows)
        while self._pending and self._pending[0].n <= free and (self._can_join or not self._rows):
            job = self._pending.popleft()
            if not job.reply.cancelled:
                jobs.append(job)
                free -= job.n
        if jobs:
            adapters = {job.adapter for job in jobs} | {row.job.adapter for row in self._rows}
            if self._ragged and (self.peft is None or len(adapters) == 1):
                self._step_with(jobs)
            else:  # rows of different adapters need peft's batch rows: padded prefill apart
                self._prefill(jobs)

    def _forward(self, rows: list[_Row], **inputs) -> torch.Tensor:
        """Last-position logits (float32) for the rows, or with `self._head` their final hidden
        states; each row with its own adapter."""
        inputs.update(use_cache=True, logits_to_keep=1)
        if self.peft is not None:
            out = self.peft(**inputs, adapter_names=[r.job.adapter or BASE for r in rows])
        else:
            out = self.lm(**inputs)
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(rows))
        return out.logits[:, -1].float()

    def _prefill(self, jobs: list[GenJob]) -> None:
        """Prefill newcomers and join them to the running batch. A prompt that begins with stored
        blocks prefills only the rest; prompts left with similar lengths share a forward (each
        padded position costs as much as a real one)."""
        cached = {id(job): self._prefixes.lookup(job.adapter, job.prompt) if self._prefixes else [] for job in jobs}
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
        batch = self._new_batch(jobs)
        rows, have = [], []  # have: each row's prompt tokens found in the prefix store
        block = self._prefixes.block if self._prefixes else 0
        for job, blocks in zip(jobs, cached):
            for i in range(job.n):
                rows.append(self._new_row(job, i, batch))
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
        cache = self._cache_of([blocks for job, blocks in zip(jobs, cached) for _ in range(job.n)], past, room=width)
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
                self._store_prefix(job, len(blocks), cache, k, first_new=past + width - (len(job.prompt) - block * len(blocks)))
                k += job.n
        self._join(rows, [(cache, mask)])
        self._sample(rows, last)
        self._drop_finished()

    def _new_batch(self, jobs: list[GenJob]) -> _Batch:
        return _Batch(requests=len(jobs), rows=sum(j.n for j in jobs),
                      prompt_tokens=sum(len(j.prompt) for j in jobs), joined=len(self._rows))

    def _cache_of(self, by_row: list[list], past: int, room: int):
        """A new cache holding each row's stored prefix blocks, left-padded to `past` columns, with
        room for `room` more positions."""
        cache = self._new_cache()
        if past:
            some = next(blocks for blocks in by_row if blocks)
            for li, layer in enumerate(cache.layers):
                blank = some[0][li][0][:, :0]  # [heads, 0, head_dim]: a row with nothing stored
                layer.set_rows([tuple(torch.cat([b[li][j] for b in blocks] or [blank], dim=-2)[None] for j in (0, 1))
                                for blocks in by_row], past, room=room + layer.room)
        return cache

    def _count_admitted(self, batch: _Batch, cached: list[list]) -> None:
        self.stats["requests"] += batch.requests
        self.stats["batches"] += 1
        self.stats["prompt_tokens"] += batch.prompt_tokens
        self.stats["cached_prompt_tokens"] += sum(len(blocks) for blocks in cached) * (self._prefixes.block if self._prefixes else 0)

    def _store_prefix(self, job: GenJob, stored: int, cache, row: int, first_new: int) -> None:
        """Keep the whole blocks of `job`'s prompt after its `stored` ones, read from `row` of
        `cache`, where the prompt's first token not found in the store sits at column `first_new`."""
        block = self._prefixes.block

        def block_kv(i):
            lo = first_new + (i - stored) * block
            return [(layer.keys[row, :, lo: lo + block], layer.values[row, :, lo: lo + block]) for layer in cache.layers]

        self._prefixes.store(job.adapter, job.prompt, stored, block_kv)

    def _new_row(self, job: GenJob, index: int, batch: _Batch) -> _Row:
        gen = None
        if job.temperature > 0:
            # Per-row generator: the same seed gives the same sample whoever shares the batch.
            gen = torch.Generator(device=self.device)
            gen.manual_seed((job.seed + index) % 2**64 if job.seed is not None else secrets.randbits(63))
        return _Row(job, index, batch, gen, pos=len(job.prompt))

    def _join(self, rows: list[_Row], parts: list[tuple[object, torch.Tensor]]) -> None:
        """Append freshly prefilled rows to the running batch. `parts` are (cache, 2D mask) in row
        order (one cache may come n times: n choices of one prompt); the shorter are left-padded."""
        if not self._rows and len(parts) == 1:
            self._rows, (self._cache, self._mask) = rows, parts[0]
            return
        if self._rows:
            parts = [(self._cache, self._mask), *parts]
        width = max(mask.shape[1] for _, mask in parts)
        cache = parts[0][0]
        for li, layer in enumerate(cache.layers):
            layer.set_rows([(c.layers[li].keys, c.layers[li].values) for c, _ in parts], width)
        self._cache, self._mask = cache, torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, mask in parts])
        self._rows = self._rows + rows

    def _step_with(self, jobs: list[GenJob]) -> None:
        """Prefill newcomers in the forward of the running rows' next decode step, flat and without
        padding (`_Ragged`), and join them to the batch: on CPU their prompt tokens ride on the
        step's reads of the weights (measured here: a 30-token prefill beside an 8-row step cost
        138 ms in one forward, 182 ms in two). A prompt that begins with stored blocks prefills only
        the rest."""
        running, block = self._rows, self._prefixes.block if self._prefixes else 0
        cached = [self._prefixes.lookup(job.adapter, job.prompt) if self._prefixes else [] for job in jobs]
        ids, pos, keep = [r.last for r in running], [r.pos for r in running], list(range(len(running)))
        filled = [layer.get_seq_length() for layer in self._cache.layers] if running else []
        if running:
            self._mask = F.pad(self._mask, (0, 1), value=1)
        ragged = _Ragged(len(running), self._cache, self._mask[:, None, None, :].bool() if running else None)
        for job, blocks in zip(jobs, cached):
            have = block * len(blocks)
            rest = len(job.prompt) - have
            cache = self._cache_of([blocks], have, room=rest)
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
            for layer, n in zip(self._cache.layers if running else [], filled):
                layer.truncate(n)  # the running rows as they were
            if running:
                self._mask = self._mask[:, :-1]
            self._prefill(jobs)  # a bad newcomer fails alone there
            return
        last = out.logits[0].float()  # logits, or with self._head hidden states
        for row in running:
            row.pos += 1
        batch = self._new_batch(jobs)
        rows, parts, index = [], [], list(range(len(running)))
        for k, (job, (_, _, cache, _)) in enumerate(zip(jobs, ragged.parts)):
            for i in range(job.n):
                rows.append(self._new_row(job, i, batch))
                parts.append((cache, torch.ones((1, len(job.prompt)), dtype=torch.long, device=self.device)))
                index.append(len(running) + k)
            if self._prefixes is not None:
                self._store_prefix(job, len(cached[k]), cache, 0, first_new=block * len(cached[k]))
        batch.open = len(rows)
        self._count_admitted(batch, cached)
        self.stats["prefilled_in_decode_step"] += len(jobs) if running else 0
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(running) + len(rows))
        self._join(rows, parts)
        self._sample(self._rows, last[index])
        self._drop_finished()

    def _step(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        last = self._forward(rows, input_ids=ids, attention_mask=self._mask, position_ids=pos,
                               past_key_values=self._cache)
        for row in rows:
            row.pos += 1
        self._sample(rows, last)
        self._drop_finished()

    def _sample(self, rows: list[_Row], out: torch.Tensor) -> None:
        """`out`: each row's logits, or with `self._head` its final hidden state (greedy rows then
        get the head's checked argmax, the others their fp32 logits)."""
        plain = [k for k, row in enumerate(rows) if row.job.temperature == 0 and not (row.job.presence or row.job.frequency)]
        if self._head is None:
            logits, greedy = out, dict(zip(plain, out[plain].argmax(-1).tolist()))
        else:
            greedy = dict(zip(plain, self._head.argmax(out[plain]))) if plain else {}
            others = [k for k in range(len(rows)) if k not in greedy]
            logits = dict(zip(others, self._head.logits(out[others]))) if others else {}
            self.stats["greedy_rows_rechecked_in_fp32"] = self._head.fallbacks
        for k, row in enumerate(rows):
            self._advance(row, greedy[k] if k in greedy else self._sample_row(row, logits[k]))

    def _sample_row(self, row: _Row, logits: torch.Tensor) -> int:
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

    def _advance(self, row: _Row, token: int) -> None:
        job = row.job
        row.sampled += 1
        row.last = token
        text = None
        if token in self.eos_ids:
            row.finish = "stop"
        else:
            row.ids.append(token)
            if job.stops or job.stream:
                # Decode everything so far and diff: decoding token by token breaks multi-byte characters.
                text = self._detok.decode(row.ids, skip_special_tokens=True)
                cuts = [i for i in (text.find(s) for s in job.stops) if i >= 0]
                if cuts:
                    text, row.finish = text[: min(cuts)], "stop"
        if row.finish is None and row.sampled >= job.max_new:
            row.finish = "length"
        if row.finish is not None:
            if text is None:
                text = self._detok.decode(row.ids, skip_special_tokens=True)
            if job.stream and len(text) > row.emitted:
                job.reply.send("delta", row.index, text[row.emitted:])
            job.reply.send("done", row.index, text, row.finish, row.sampled)
        elif job.stream:
            ready = _streamable(text, job.stops)
            if len(ready) > row.emitted:
                job.reply.send("delta", row.index, ready[row.emitted:])
                row.emitted = len(ready)

    def _drop_finished(self) -> None:
        keep = []
        for k, row in enumerate(self._rows):
            if row.finish is None and not row.job.reply.cancelled:
                keep.append(k)
                continue
            batch = row.batch
            batch.new_tokens += row.sampled
            batch.open -= 1
            self.stats["completion_tokens"] += row.sampled
            if batch.open == 0:
                took = time.perf_counter() - batch.started
                log.info("batch: %d requests (%d rows%s), %d prompt + %d new tokens in %.2f s, %.1f new tokens/s",
                         batch.requests, batch.rows, f", joined {batch.joined} running" if batch.joined else "",
                         batch.prompt_tokens, batch.new_tokens, took, batch.new_tokens / max(took, 1e-9))
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[k] for k in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        # Columns that are padding for every remaining row cost attention compute at every step.
        first = int(self._mask.any(0).int().argmax())
        if first > 0 and self._can_join:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.drop_left(first)

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


def _load_adapters(model, adapters: dict[str, str]):
    from peft import PeftModel

    for name, folder in adapters.items():
        if name == BASE or not name:
            raise ValueError(f"adapters: {name!r} is reserved; pick another adapter name")
        if not (Path(folder) / "adapter_config.json").exists():
            raise FileNotFoundError(f"adapters[{name!r}]: {folder}/adapter_config.json is missing; point it at a "
                                    "folder written by peft's save_pretrained (the train stage's adapter folder)")
    (first, first_dir), *rest = adapters.items()
    peft = PeftModel.from_pretrained(model, first_dir, adapter_name=first, is_trainable=False)
    for name, folder in rest:
        peft.load_adapter(folder, adapter_name=name, is_trainable=False)
    return peft.eval()


# ---------------------------------------------------------------- HTTP


def _message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise _bad(f"messages[{i}].content[{j}]",
                               f"part type {part.type!r} is not supported; this server serves a text-only model")
                texts.append(part.text)
            content = "".join(texts)
        # Templates of small chat models know "system" but not OpenAI's newer "developer".
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def _check_unsupported(req: ChatRequest) -> None:
    if req.logprobs or req.top_logprobs:
        raise _bad("logprobs", "log probabilities are not supported by this server")
    if req.logit_bias:
        raise _bad("logit_bias", "not supported by this server")
    if req.tools or req.functions:
        raise _bad("tools", "tool calling is not supported by this server")
    if req.tool_choice not in (None, "none", "auto"):
        raise _bad("tool_choice", "tool calling is not supported by this server; omit the field")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _bad("response_format", f"type {req.response_format.get('type')!r} is not supported; only 'text' "
                                      "(ask for JSON in the prompt and parse the reply)")


def _chat_job(req: ChatRequest, engine: Engine, adapter: str | None, max_batch: int) -> GenJob:
    """Validate a chat request (400s name the field) and turn it into the worker's job."""
    _check_unsupported(req)
    n = req.n or 1
    if n > max_batch:
        raise _bad("n", f"{n} choices do not fit one batch of this server (max_batch={max_batch})")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise _bad("stop", f"give at most {MAX_STOPS} non-empty strings")
    prompt = engine.encode_chat(_message_dicts(req.messages))
    room = engine.context - len(prompt)
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1:
        raise _bad("messages", f"the prompt has {len(prompt)} tokens, leaving no room in the model's context of "
                               f"{engine.context} tokens; shorten the messages")
    if asked and asked > room:
        field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise _bad(field_name, f"the prompt has {len(prompt)} tokens and {asked} more were asked for, over the "
                               f"model's context of {engine.context} tokens; ask for at most {room} or shorten "
                               "the messages")
    return GenJob(prompt=prompt, max_new=asked or min(DEFAULT_MAX_TOKENS, room),
                  temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
                  top_p=1.0 if req.top_p is None else req.top_p, presence=req.presence_penalty or 0.0,
                  frequency=req.frequency_penalty or 0.0, seed=req.seed, stops=stops, n=n, adapter=adapter,
                  stream=bool(req.stream), reply=_Reply(asyncio.get_running_loop()))


def _embedding_inputs(req: EmbeddingRequest, engine: Engine) -> list[list[int]]:
    """Token ids per input (strings are tokenized, token arrays checked); 400s name the input."""
    if req.dimensions is not None and req.dimensions != engine.hidden_size:
        raise _bad("dimensions", f"this model's embeddings have {engine.hidden_size} dimensions; omit the field")
    items = [req.input] if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) \
        else list(req.input)
    if not items:
        raise _bad("input", "is empty; send a string or a list of strings")
    inputs = []
    for i, item in enumerate(items):
        ids = engine.tok(item)["input_ids"] if isinstance(item, str) else list(item)
        if not ids:
            raise _bad(f"input[{i}]", "is empty; every input needs at least one token")
        if len(ids) > engine.context:
            raise _bad(f"input[{i}]", f"has {len(ids)} tokens, over the model's context of {engine.context}")
        if min(ids) < 0 or max(ids) >= engine.vocab:
            raise _bad(f"input[{i}]", f"token ids must lie in [0, {engine.vocab})")
        inputs.append(ids)
    return inputs


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 in OpenAI's shape before any
    handler parses it. A chunked body carries no length, so it is read up to the limit here and
    then handed on; the handler still sees later messages (a disconnect) from the client."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _refusal(self, size: str) -> JSONResponse:
        mb = self.limit / 2**20
        return APIError(413, f"The request body is {size}, over this server's limit of {mb:g} MB; send less "
                             "(fewer embedding inputs per call) or restart the server with a larger --max-body-mb.",
                        code="request_too_large").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refusal(f"{int(length)} bytes")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refusal(f"over {self.limit} bytes")(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _validation_message(error: dict) -> tuple[str, str]:
    """(param, message) for pydantic's first complaint about a request body, in words a client can act on."""
    loc = [str(p) for p in error["loc"] if p != "body"]
    if error["type"] == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", error["msg"])
        return "body", f"is not valid JSON ({reason}); send one JSON object"
    if not loc and error["type"] in ("model_attributes_type", "dict_type", "missing"):
        return "body", "must be a JSON object (with Content-Type: application/json)"
    param = ".".join(loc) or "body"
    if error["type"] == "extra_forbidden":
        return param, "is not supported by this server (it is refused rather than silently ignored); remove it"
    return param, error["msg"]


def create_app(model_path: str, served_name: str = "smollm2-135m-instruct", api_key: str | None = None,
               max_batch: int = 16, batch_wait_ms: float = 10, device="cpu",
               adapters: dict[str, str] | None = None, max_body_mb: float = 8,
               prefix_cache_mb: float = 256) -> FastAPI:
    """An OpenAI-compatible app over the model folder `model_path` (loaded now; the worker starts
    with the app). `adapters` maps extra model names to LoRA adapter folders over that model.
    A request body over `max_body_mb` is refused with a 413. Up to `prefix_cache_mb` of prompt
    keys/values are kept for prompts that start alike (0: none)."""
    if adapters and served_name in adapters:
        raise ValueError(f"adapters: {served_name!r} is already the served_name of the base model; rename the adapter")
    if max_body_mb <= 0:
        raise ValueError(f"max_body_mb={max_body_mb}: must be positive")
    engine = Engine(model_path, device=device, adapters=adapters, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                    prefix_cache_mb=prefix_cache_mb)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="doctune OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = engine
    app.state.stats = engine.stats

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        param, message = _validation_message(errors[0])
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return _bad(param, f"{message}{more}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes and methods too: clients parse one error shape.
        if exc.status_code == 404:
            message = (f"{request.method} {request.url.path} is not a route of this server; it serves "
                       "/v1/models, /v1/chat/completions, /v1/embeddings and /health")
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=str(exc.status_code)).response()

    app.add_middleware(_BodyLimit, limit=int(max_body_mb * 2**20))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key "
                                "this server was started with.", code="invalid_api_key")

    def adapter_for(name: str) -> str | None:
        if name == served_name:
            return None
        if name in engine.adapters:
            return name
        served = ", ".join([served_name, *engine.adapters])
        raise APIError(404, f"The model {name!r} does not exist on this server; it serves: {served}.",
                       code="model_not_found", param="model")

    @app.get("/health")
    async def health():
        if not engine.alive():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        # root/parent as vLLM reports them: the folder each name serves, and the base an adapter sits on.
        data = [{**Model(id=served_name, object="model", created=created, owned_by="doctune").model_dump(),
                 "root": str(model_path), "parent": None}]
        data += [{**Model(id=name, object="model", created=created, owned_by="doctune").model_dump(),
                  "root": folder, "parent": served_name} for name, folder in engine.adapter_dirs.items()]
        return {"object": "list", "data": data}

    @v1.get("/stats")
    async def stats():
        # The token counters move only when a row ends, so they cannot tell an idle server from one
        # still decoding long rows (a client that left mid-stream, say): these two can.
        return {**engine.stats, "running": len(engine._rows),
                "waiting": len(engine._pending) + engine.queue.qsize()}

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        adapter = adapter_for(req.model)
        job = _chat_job(req, engine, adapter, max_batch)
        engine.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, rid, now, req.model, include_usage), media_type="text/event-stream")

        reply, n, prompt = job.reply, job.n, job.prompt
        done: dict[int, tuple] = {}
        while len(done) < n:
            try:
                event = await asyncio.wait_for(reply.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                # A client that timed out will retry; stop generating for the abandoned request.
                if await request.is_disconnected():
                    reply.cancelled = True
                    return JSONResponse({}, status_code=499)
                continue
            if event[0] == "error":
                raise APIError(500, event[1], type="server_error")
            if event[0] == "done":
                done[event[1]] = event[2:]
        completion = sum(d[2] for d in done.values())
        body = ChatCompletion(
            id=rid, object="chat.completion", created=now, model=req.model,
            choices=[Choice(index=i, finish_reason=done[i][1], logprobs=None,
                            message=ChatCompletionMessage(role="assistant", content=done[i][0])) for i in range(n)],
            usage=CompletionUsage(prompt_tokens=len(prompt), completion_tokens=completion,
                                  total_tokens=len(prompt) + completion),
        )
        return JSONResponse(body.model_dump(mode="json", exclude_unset=True))

    @v1.post("/embeddings")
    async def embeddings(req: EmbeddingRequest):
        adapter = adapter_for(req.model)
        inputs = _embedding_inputs(req, engine)
        reply = _Reply(asyncio.get_running_loop())
        engine.submit(EmbedJob(inputs, adapter, reply))
        event = await reply.events.get()
        if event[0] == "error":
            raise APIError(500, event[1], type="server_error")
        tokens = sum(map(len, inputs))
        usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        if req.encoding_format == "base64":
            # The openai client asks for base64 unless told otherwise and decodes it itself;
            # the typed model only knows float lists, so this shape is written by hand.
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()}
                    for i, v in enumerate(event[1])]
            return {"object": "list", "model": req.model, "data": data, "usage": usage.model_dump()}
        return CreateEmbeddingResponse(
            object="list", model=req.model, usage=usage,
            data=[Embedding(object="embedding", index=i, embedding=v.tolist()) for i, v in enumerate(event[1])],
        ).model_dump(mode="json")

    app.include_router(v1)
    return app


async def _sse(job: GenJob, rid: str, created: int, model: str, include_usage: bool):
    """Server-sent events in OpenAI's order: a role chunk, content deltas, a finish chunk per
    choice, a usage chunk if asked for, then [DONE]."""
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[ChunkChoice], **fields) -> str:
        body = ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=model,
                                   choices=choices, **{**extra, **fields})
        return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

    reply = job.reply
    try:
        yield chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""), finish_reason=None)
                     for i in range(job.n)])
        finished, completion = 0, 0
        while finished < job.n:
            event = await reply.events.get()
            if event[0] == "error":
                yield f"data: {APIError(500, event[1], type='server_error').response().body.decode()}\n\n"
                return
            if event[0] == "delta":
                yield chunk([ChunkChoice(index=event[1], delta=ChoiceDelta(content=event[2]), finish_reason=None)])
            elif event[0] == "done":
                finished += 1
                completion += event[4]
                yield chunk([ChunkChoice(index=event[1], delta=ChoiceDelta(), finish_reason=event[3])])
        if include_usage:
            prompt = len(job.prompt)
            yield chunk([], usage=CompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                                                  total_tokens=prompt + completion))
        yield "data: [DONE]\n\n"
    finally:
        reply.cancelled = True  # finished or the client left: either way no more compute for it


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(host: str, api_key: str | None, key_env: str = KEY_ENV) -> None:
    """Refuse (ValueError) to serve beyond loopback without a key: anyone who reaches the port
    could use the model and read every adapter's answers."""
    if _is_loopback(host) or api_key:
        return
    raise ValueError(
        f"--host {host} is reachable beyond this machine and no API key is set (${key_env} is unset or empty), "
        f"so anyone who can reach the port could use the model. Set a key, e.g. "
        f"`export {key_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`, or name another "
        f"variable with --api-key-env; clients then send it as their API key. Or bind --host 127.0.0.1.")


def run_server(model_path: str, host: str = "127.0.0.1", port: int = 8765, api_key: str | None = None, **kw) -> None:
    """Serve until interrupted (blocking). `kw` goes to create_app (served_name, adapters, ...)."""
    import uvicorn

    check_exposure(host, api_key)
    app = create_app(model_path, api_key=api_key, **kw)
    uvicorn.run(app, host=host, port=port, log_level="info")


# ---------------------------------------------------------------- what `doctune serve` serves


@dataclass
class AdapterSource:
    name: str
    folder: Path  # holds adapter_config.json
    base_model: str  # the model it was trained on
    said_by: Path  # the file that names base_model


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); restore it from the run that wrote it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path or any(c.isspace() for c in name):
        raise ValueError(f"--adapter {spec!r}: expected NAME=RUN_DIR with a name without spaces, e.g. "
                         "--adapter tuned=outputs/models/<run>")
    return name, Path(path)


def find_adapter(name: str, path: Path, what: str | None = None) -> AdapterSource:
    """The adapter of a run folder (`<run>/adapter/` + `<run>/run.json`) or an adapter folder itself,
    with the base model it was trained on. `what` names where `path` came from, for errors."""
    what = what or f"--adapter {name}={path}"
    if (path / "adapter_config.json").is_file():
        folder, run_json = path, path.parent / "run.json"
    elif (path / "adapter" / "adapter_config.json").is_file():
        folder, run_json = path / "adapter", path / "run.json"
    elif not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist; give a run folder (outputs/models/<run>) "
                                "or its adapter/ folder")
    else:
        raise FileNotFoundError(f"{what}: {path} has neither adapter/adapter_config.json (a run folder) nor "
                                "adapter_config.json (an adapter folder); is the run finished (run.json is "
                                "written last)?")
    if run_json.is_file():
        said_by, base = run_json, _read_json(run_json).get("base_model")
    else:  # an adapter folder outside a run: peft records the base it was made on
        said_by = folder / "adapter_config.json"
        base = _read_json(said_by).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{what}: {said_by} names no base model (base_model / base_model_name_or_path); "
                         "pass the base it was trained on with --model")
    return AdapterSource(name, folder, str(base), said_by)


def promoted_adapter(outputs: Path) -> AdapterSource | None:
    """The registry's promoted adapter under `outputs`, or None when nothing was promoted yet."""
    current_json = outputs / "registry" / "current.json"
    if not current_json.is_file():
        return None
    run_dir = _read_json(current_json).get("run_dir")
    if not run_dir:
        raise ValueError(f"{current_json}: no run_dir field; it is written by the evaluate stage's promotion, "
                         "restore it or serve without it (--no-promoted)")
    # run_dir is as the worker wrote it, maybe relative to another working directory; the run is
    # also found under this outputs folder by its name.
    tried = [Path(run_dir)]
    if not tried[0].is_absolute():
        tried.append(outputs / "models" / tried[0].name)
    for path in tried:
        if path.exists():
            return find_adapter(PROMOTED, path, what=f"{current_json}: run_dir")
    raise FileNotFoundError(f"{current_json}: run_dir {run_dir!r} does not exist (looked in "
                            f"{', '.join(map(str, tried))}); restore the run folder, or serve without it "
                            "(--no-promoted)")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def plan_models(model: str | None, adapter_specs: list[str], outputs: Path | None,
                served_name: str) -> tuple[str | None, dict[str, str]]:
    """(base model, {name: adapter folder}) for `doctune serve`: the promoted adapter of
    `outputs/registry/current.json` as `promoted` (outputs=None: not), then every NAME=RUN_DIR.
    The base is `model` or, when None, the one the adapters were trained on (None if there are
    none: the caller picks the default). Raises ValueError/FileNotFoundError naming the file and the fix."""
    sources: list[AdapterSource] = []
    if outputs is not None:
        promoted = promoted_adapter(outputs)
        if promoted is None:
            log.info("%s: no promoted model yet; serving the base model", outputs / "registry" / "current.json")
        else:
            sources.append(promoted)
    for spec in adapter_specs:
        name, path = parse_adapter_spec(spec)
        clash = next((s for s in sources if s.name == name), None)
        if name == served_name:
            raise ValueError(f"--adapter {spec}: {name!r} is the base model's name (--name); pick another name")
        if clash is not None:
            hint = ("the promoted adapter is served as 'promoted'; pick another name or add --no-promoted"
                    if name == PROMOTED else "give each --adapter its own name")
            raise ValueError(f"--adapter {spec}: the name {name!r} is taken by {clash.folder}; {hint}")
        if name == BASE:
            raise ValueError(f"--adapter {spec}: {name!r} is reserved; pick another name")
        sources.append(find_adapter(name, path))
    for s in sources:
        if model is not None and not _same_model(s.base_model, model):
            raise ValueError(f"adapter {s.name!r} was trained on {s.base_model} ({s.said_by}), but --model is "
                             f"{model}; drop --model to serve {s.base_model}, or leave that adapter out")
        first = sources[0]
        if not _same_model(s.base_model, first.base_model):
            raise ValueError(f"adapter {s.name!r} was trained on {s.base_model} ({s.said_by}), but adapter "
                             f"{first.name!r} on {first.base_model} ({first.said_by}); one server serves "
                             "adapters of one base: start one server per base")
    base = model if model is not None else (sources[0].base_model if sources else None)
    return base, {s.name: str(s.folder) for s in sources}
