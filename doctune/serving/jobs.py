"""The HTTP side's units of work for the model's worker thread (GenJob, EmbedJob), and the way their
results come back (Reply): the contract between doctune.serving.handlers and doctune.serving.engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch: no adapter may take it


@dataclass
class Reply:
    """Where the worker sends a request's events: an asyncio queue on the server's event loop.
    Events: ("delta", choice, text), ("done", choice, text, finish_reason, completion_tokens),
    ("embeddings", vectors), ("error", message)."""

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
    reply: Reply


@dataclass
class EmbedJob:
    inputs: list[list[int]]
    adapter: str | None
    reply: Reply
