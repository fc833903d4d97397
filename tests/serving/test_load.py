"""`doctune serve` as a real process under load: 50 clients at once, a mix of good requests, streams
that run to the end or leave after their first token, and bad requests, for seven identical rounds.
Every request must end in a well-formed 200 or a 4xx in OpenAI's error shape, the server must keep
answering as it did before the load, and its memory and open files must settle after each round."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from doctune.serving import KEY_ENV, create_app
from tests.endpoints import free_port, wait_until_healthy

KEY = "load-test-key"
# `doctune serve` has no --max-batch: it batches as many rows as create_app does by default.
MAX_BATCH = inspect.signature(create_app).parameters["max_batch"].default
NAME = "tiny"
BODY_LIMIT_MB = 0.01  # 10 KB: an oversized body needs no big buffer on either side
TIMEOUT = httpx.Timeout(120)  # a hang fails the request rather than the whole session
# Long enough that a stream decoded to the end after its client left stands out even when, on busy
# cores, the client takes a second to read its first token (the tiny model decodes ~400 tokens/s alone).
LEAVER_MAX_TOKENS = 700  # with the ~250-token prompt, within the tiny model's 1024-token context
ROUNDS = 7  # the first warms the allocator, caches and thread pools up; RSS is compared over the rest
# Measured here (2 shared cores): RSS ~490 MiB cold, ~515 MiB after the warm-up round, then up by
# 1.4-8.2 MiB from round 1 to round 6 in steps of 3-5 MiB that stop (the heap's high-water mark as
# batches of different shapes come and go). A server that kept each request's prefill KV cache
# grew 13 MiB a round, 65 MiB over the same five rounds; one that kept each step's logits ~95 MiB
# a round. The bound sits between the two: it is about leaks, not allocator noise.
RSS_GROWTH_MIB = 16
# A passage-sized prompt, as synthesis sends: ~250 tokens make each request's KV cache ~250 KiB even
# in the tiny model, so a server that kept caches of finished requests would grow visibly.
PASSAGE = " ".join(f"Lamp {i} of the lighthouse on the hill was lit at dusk by keeper {i}." for i in range(12))
MESSAGES = [{"role": "system", "content": f"Answer from this passage only:\n{PASSAGE}"},
            {"role": "user", "content": "Tell me about the lighthouse on the hill."}]


@dataclass
class Call:
    kind: str
    run: Callable[[], dict | None]


def _auth(key: str | None = KEY) -> dict:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _chat(max_tokens: int, **params) -> dict:
    return {"model": NAME, "messages": MESSAGES, "max_tokens": max_tokens, **params}


def _error_shape(resp: httpx.Response, status: int, where: str) -> None:
    assert resp.status_code == status, f"{resp.status_code}, expected {status}: {resp.text[:300]}"
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == "invalid_request_error", error
    assert where in (error["param"], error["code"]), error


def _completion(resp: httpx.Response, max_tokens: int) -> ChatCompletion:
    assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:300]}"
    body = ChatCompletion.model_validate(resp.json())
    assert body.object == "chat.completion" and body.model == NAME and len(body.choices) == 1
    choice = body.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert 1 <= body.usage.completion_tokens <= max_tokens
    return body


def _stream(http: httpx.Client, body: dict, leave_early: bool) -> dict:
    """Reads a stream; returns its text and usage. `leave_early` closes it after the first token."""
    text, usage, done, finish = [], None, False, None
    with http.stream("POST", "/v1/chat/completions", json=body, headers=_auth()) as resp:
        assert resp.status_code == 200, f"{resp.status_code}: {resp.read()[:300]}"
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            assert not done, f"data after [DONE]: {data}"
            chunk = ChatCompletionChunk.model_validate_json(data)
            assert chunk.object == "chat.completion.chunk", data
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                if choice.delta.content:
                    text.append(choice.delta.content)
                    if leave_early:
                        return {"text": "".join(text), "usage": None}  # leaving the block drops the connection
    assert done, "the stream ended without data: [DONE]"
    assert finish in ("stop", "length"), "no finish chunk"
    assert usage is not None and 1 <= usage.completion_tokens <= body["max_tokens"]
    return {"text": "".join(text), "usage": usage}


def _oversized_chunks():
    for _ in range(16):  # 16 KB with no Content-Length: the limit is enforced while reading
        yield b" " * 1024


def load_mix(http: httpx.Client) -> list[Call]:
    """The 50 requests of one round, the same every round."""
    chat_url, embed_url = "/v1/chat/completions", "/v1/embeddings"
    calls = []
    for i in range(20):
        max_tokens = 4 + (i * 7) % 29
        if i % 4 == 0:  # five seeded samples of two seeds: equal seeds must give equal text in any batch
            max_tokens, params = 12, {"temperature": 0.9, "seed": 7 if i % 8 == 0 else 8}
        elif i % 4 == 1:
            params = {"temperature": 0}
        else:
            params = {}  # OpenAI's default temperature 1, unseeded
        body = _chat(max_tokens, **params)

        def run(body=body, max_tokens=max_tokens):
            resp = http.post(chat_url, json=body, headers=_auth())
            done = _completion(resp, max_tokens)
            return {"text": done.choices[0].message.content, "usage": done.usage,
                    "seed": body.get("seed")}

        calls.append(Call("chat", run))
    for i in range(10):
        body = _chat(8 + 2 * i, stream=True, stream_options={"include_usage": True}, temperature=0 if i % 2 else 1)
        calls.append(Call("stream", lambda body=body: _stream(http, body, leave_early=False)))
    for _ in range(8):
        body = _chat(LEAVER_MAX_TOKENS, stream=True, temperature=0)
        calls.append(Call("leaver", lambda body=body: _stream(http, body, leave_early=True)))
    invalid = [b'{"model": "tiny", "messages": [', b"not json at all", b"\xff\xfe{}", b"[]"]
    for raw in invalid:
        def run(raw=raw):
            _error_shape(http.post(chat_url, content=raw, headers=_auth()), 400, "body")
        calls.append(Call("invalid JSON", run))
    for headers in (_auth(None), _auth("wrong-key"), {**_auth(), "Authorization": f"Basic {KEY}"}):
        def run(headers=headers):
            resp = http.post(chat_url, json=_chat(4), headers=headers)
            _error_shape(resp, 401, "invalid_api_key")
        calls.append(Call("bad key", run))
    for path, body in ((chat_url, {**_chat(4), "model": "gpt-4o"}), (embed_url, {"model": "gpt-4o", "input": "hi"})):
        def run(path=path, body=body):
            _error_shape(http.post(path, json=body, headers=_auth()), 404, "model_not_found")
        calls.append(Call("unknown model", run))
    oversized = [json.dumps({**_chat(4), "user": "x" * 64_000}).encode(), _oversized_chunks]
    for content in oversized:
        def run(content=content):
            resp = http.post(chat_url, content=content() if callable(content) else content, headers=_auth())
            _error_shape(resp, 413, "request_too_large")
        calls.append(Call("oversized", run))

    def embed():
        resp = http.post(embed_url, json={"model": NAME, "input": ["a lighthouse", "a hill", "the sea"],
                                          "encoding_format": "float"}, headers=_auth())
        assert resp.status_code == 200, resp.text[:300]
        out = CreateEmbeddingResponse.model_validate(resp.json())
        assert [e.index for e in out.data] == [0, 1, 2]
        for e in out.data:
            assert len(e.embedding) == 64 and abs(sum(v * v for v in e.embedding) - 1) < 1e-3
        return {}

    calls.append(Call("embeddings", embed))
    assert len(calls) == 50
    return calls


def run_round(url: str) -> list[tuple[str, dict | None, str | None]]:
    """All 50 calls released at once; (kind, result, failure) for each, in order. One client with a
    connection each: fifty clients of their own would each build an SSL context after the barrier
    and trickle in over seconds on 2 cores."""
    http = httpx.Client(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=64))
    calls = load_mix(http)
    start = threading.Barrier(len(calls), timeout=60)

    def one(call: Call):
        try:
            start.wait()
            return call.kind, call.run(), None
        except Exception as exc:  # a reset, a timeout or a failed check: reported with the others
            return call.kind, None, f"{type(exc).__name__}: {exc}"

    with http, ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


@contextmanager
def serving(model: str, log: Path):
    """`doctune serve` in its own process group, its output in `log` (a pipe nobody reads would
    fill up and block the server mid-load)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "doctune.cli", "serve", "--model", model, "--name", NAME, "--no-promoted",
           "--port", str(port), "--max-body-mb", str(BODY_LIMIT_MB)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, KEY_ENV: KEY},
                                start_new_session=True)
    try:
        wait_until_healthy(proc, url, log.read_text)
        yield proc, url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _status(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _idle_stats(url: str) -> dict:
    """The server's counters once no row decodes and nothing waits (every client is done by then)."""
    deadline = time.monotonic() + 30
    while True:
        stats = httpx.get(url + "/v1/stats", headers=_auth(), timeout=10).json()
        if stats["running"] == stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the server still decodes 30 s after every client is done: {stats}"
        time.sleep(0.2)


def _greedy(url: str) -> str:
    resp = httpx.post(url + "/v1/chat/completions", json=_chat(24, temperature=0), headers=_auth(),
                      timeout=TIMEOUT)
    return _completion(resp, 24).choices[0].message.content


@pytest.mark.slow
def test_fifty_clients_at_once_get_answers_or_openai_errors_and_the_server_settles(tiny_model, tmp_path):
    log = tmp_path / "serve.log"
    with serving(tiny_model, log) as (proc, url):
        before = _greedy(url)
        seeded: dict[int, set[str]] = {}
        samples = []
        stats = _idle_stats(url)
        print(f"cold: {_status(proc.pid)}")
        for round_no in range(ROUNDS):
            results = run_round(url)
            failures = [f"{kind}: {failure}" for kind, _, failure in results if failure]
            assert not failures, f"round {round_no}: {len(failures)} of 50 failed:\n" + "\n".join(failures) + \
                "\n--- server log tail:\n" + log.read_text()[-3000:]
            assert proc.poll() is None
            assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}

            new = _idle_stats(url)
            answered = [r for kind, r, _ in results if kind in ("chat", "stream")]
            assert new["requests"] - stats["requests"] == 38, "not every generation request reached the model"
            assert new["embedding_requests"] - stats["embedding_requests"] == 1
            left = new["completion_tokens"] - stats["completion_tokens"] - \
                sum(r["usage"].completion_tokens for r in answered)
            assert left >= 8, f"8 streams each got a token, yet the counters show {left} tokens unaccounted"
            assert left < 8 * LEAVER_MAX_TOKENS / 2, \
                f"the 8 streams that left after one token cost {left} tokens: abandoned rows kept decoding"
            stats = new
            for kind, r, _ in results:
                if kind == "chat" and r["seed"] is not None:
                    seeded.setdefault(r["seed"], set()).add(r["text"])
            samples.append({**_status(proc.pid), "leaver_tokens": left, "max_batch": new["max_batch_size"]})
            print(f"round {round_no}: {samples[-1]}")

        assert stats["max_batch_size"] == MAX_BATCH, "50 clients at once never filled a batch"
        assert all(len(texts) == 1 for texts in seeded.values()), f"equal seeds sampled differently: {seeded}"
        assert _greedy(url) == before, "the greedy answer changed after the load"
        warm, last = samples[1], samples[-1]
        growth = (last["rss_kib"] - warm["rss_kib"]) / 1024
        assert growth < RSS_GROWTH_MIB, f"RSS grew {growth:.1f} MiB over {ROUNDS - 2} rounds: {samples}"
        assert last["fds"] <= warm["fds"] + 2, f"open files grew: {samples}"
        assert last["threads"] <= warm["threads"] + 2, f"threads grew: {samples}"
