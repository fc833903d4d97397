"""The HTTP surface, spoken to with the official `openai` client the way synthesis and dedup speak
to it: over the real offline model (slow: what it says), and over the tiny random model with two
quickly trained LoRA adapters (what it serves, how it refuses bad requests); clients isolated from
one another (a long or abandoned embedding, a huge body being tokenized, a shutdown); and the
refusal to serve beyond loopback without a key."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest

from doctune.serving import KEY_ENV, check_exposure, run_server
from tests.endpoints import free_port, wait_until_healthy
from tests.serving.common import ADAPTER, BASE, EMOJI_PROMPT, KEY, PROMPT, SAY, WORDS, ask, say


@pytest.mark.slow
def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == [BASE, ADAPTER]


@pytest.mark.slow
def test_chat_returns_text_and_usage(client):
    resp = ask(client, PROMPT, max_tokens=16)
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.model == BASE and resp.object == "chat.completion"
    usage = resp.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow
def test_stop_string_is_trimmed(client, greedy):
    full = greedy(PROMPT, 24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    resp = ask(client, PROMPT, max_tokens=24, stop=[stop, "never appears"])
    assert resp.choices[0].message.content == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_max_tokens_respected(client):
    resp = ask(client, "Write a long essay about the sea.", max_tokens=5)
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"
    resp = ask(client, "Write a long essay about the sea.", max_completion_tokens=3)
    assert resp.usage.completion_tokens == 3


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [PROMPT, EMOJI_PROMPT])
def test_stream_joins_to_the_non_streamed_answer(client, greedy, prompt):
    expected = greedy(prompt, 16)
    stream = ask(client, prompt, max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the answer came in one piece: not streamed as generated"
    assert "".join(deltas) == expected
    # A character split across tokens is held back until complete (only the cut-off end may be partial).
    assert all("\ufffd" not in d for d in deltas[:-1])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 16
    if prompt == EMOJI_PROMPT:
        assert any(ord(ch) > 0xFFFF for ch in expected), "expected 4-byte characters in this answer"


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_costing_compute(server, client):
    engine = server.app.state.engine
    stream = ask(client, "Write a long essay about the sea.", max_tokens=400, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 5  # the 400 tokens it asked for take ~20 s on 2 cores
    while engine.snapshot()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.snapshot()["running"], "the abandoned request is still decoding"


@pytest.mark.slow
def test_n_choices_and_bad_requests(client):
    resp = ask(client, "Name an animal.", n=2, temperature=1.0, seed=5, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens <= 12
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(client, "Hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="n:"):
        ask(client, "Hi", n=99)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        ask(client, "Hi", logprobs=True)


@pytest.mark.slow
def test_wrong_key_and_unknown_model(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        ask(right, "Hi", model="gpt-4o", max_tokens=2)
    assert err.value.code == "model_not_found" and BASE in err.value.message


@pytest.mark.slow
def test_embeddings_are_unit_vectors_that_rank_similar_text_higher(client, model_path):
    import json

    hidden = json.loads((model_path / "config.json").read_text())["hidden_size"]
    texts = ["The cat sat on the mat.", "A cat was sitting on the mat.",
             "Corporate tax returns are due on the fifteenth of April."]
    resp = client.embeddings.create(model=BASE, input=texts)  # the client asks for base64 by default
    vecs = np.array([d.embedding for d in resp.data])
    assert vecs.shape == (3, hidden)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert resp.usage.prompt_tokens > 0
    single = client.embeddings.create(model=BASE, input=texts[2], encoding_format="float").data[0].embedding
    assert np.allclose(single, vecs[2], atol=1e-4)  # padding in a batch does not change a vector


@pytest.mark.slow
def test_adapter_is_served_by_name_beside_the_base(client, greedy):
    base = greedy(PROMPT, 12)
    tuned = greedy(PROMPT, 12, ADAPTER)
    assert tuned != base
    # One batch with both: each row keeps its own adapter.
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda m: ask(client, PROMPT, model=m, max_tokens=12).choices[0].message.content,
                             [BASE, ADAPTER]))
    assert both == [base, tuned]


def test_a_request_without_a_system_message_gets_the_adapters_training_prompt(tokenizer):
    """Without one, SmolLM2's chat template writes its own default system line, and an adapter trained
    under the dataset's system prompt answers worse than the evaluation measured."""
    import asyncio
    from types import SimpleNamespace

    from doctune.serving.handlers import chat_job
    from doctune.serving.protocol import ChatRequest

    engine = SimpleNamespace(tok=tokenizer, context=2048)

    async def prompt(messages: list[dict], system: str | None) -> str:
        job = await chat_job(ChatRequest(model="tuned", messages=messages), engine, "tuned", 8, system)
        return tokenizer.decode(job.prompt)

    user = [{"role": "user", "content": "When does the Brekke office open?"}]
    trained = asyncio.run(prompt(user, "You answer questions about Brekke."))
    assert "You answer questions about Brekke." in trained and "SmolLM" not in trained
    assert "SmolLM" in asyncio.run(prompt(user, None))  # the template's own default
    own = asyncio.run(prompt([{"role": "system", "content": "Be brief."}, *user], "You answer questions about Brekke."))
    assert "Be brief." in own and "about Brekke" not in own  # a request's own system message wins


# ---------------------------------------------------------------- the tiny model with two adapters


def test_models_lists_the_base_and_each_adapter_with_its_folder(tiny, tiny_model, runs):
    models = {m.id: m for m in tiny.client.models.list()}
    assert list(models) == ["tiny", "alpha", "beta"]
    assert models["tiny"].root == tiny_model
    assert models["beta"].root == str(runs["beta"] / "adapter") and models["beta"].parent == "tiny"


def test_each_adapter_answers_as_peft_does_in_process(tiny, in_process):
    assert in_process["alpha"].startswith("alpha bravo") and in_process["beta"].startswith("one two")
    assert in_process["base"] not in (in_process["alpha"], in_process["beta"])
    for name, model in (("base", "tiny"), ("alpha", "alpha"), ("beta", "beta")):
        assert say(tiny.client, model) == in_process[name], name


def test_an_adapter_streams_what_it_answers(tiny, in_process):
    stream = tiny.client.chat.completions.create(model="beta", messages=SAY, temperature=0, max_tokens=WORDS,
                                                 stream=True)
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == in_process["beta"]


def test_twenty_concurrent_calls_over_three_models_are_all_answered(tiny, in_process):
    models = (["tiny", "alpha", "beta"] * 7)[:20]
    stats = tiny.app.state.stats
    stats["max_batch_size"] = 0
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda m: say(tiny.client, m), models))
    assert stats["max_batch_size"] > 1, "20 concurrent calls never shared a batch"
    # The trained replies have wide greedy margins: padding in a mixed batch must not change them.
    for model, answer in zip(models, answers, strict=True):
        if model != "tiny":
            assert answer == in_process[model], model
        else:
            assert answer


def test_streaming_clients_that_leave_mid_stream_leave_the_server_serving(tiny, in_process):
    engine, stats = tiny.app.state.engine, tiny.app.state.stats
    spent = stats["completion_tokens"]
    body = {"model": "tiny", "messages": SAY, "temperature": 0, "max_tokens": 900, "stream": True}

    def leave_after_first_delta() -> None:
        with httpx.stream("POST", tiny.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    return  # leaving the block closes the connection mid-stream

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: leave_after_first_delta(), range(4)))
    deadline = time.monotonic() + 10
    while engine.snapshot()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.snapshot()["running"], "abandoned streams are still decoding"
    assert stats["completion_tokens"] - spent < 4 * 900 / 2, "the abandoned streams were decoded to the end"
    assert httpx.get(tiny.url + "/health").json() == {"status": "ok"}
    assert say(tiny.client, "alpha") == in_process["alpha"]


def _oversized_chunks():
    for _ in range(12):  # 12 KB in chunks, no Content-Length: over the 0.01 MB limit all the same
        yield b" " * 1024


CHAT = {"model": "tiny", "messages": SAY, "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
BAD_REQUESTS = {  # name: (path, headers, body, status, param or code in the error)
    "invalid JSON": ("/v1/chat/completions", AUTH, b'{"model": "tiny", "messages": [', 400, "body"),
    "body not an object": ("/v1/chat/completions", AUTH, b"[]", 400, "body"),
    "missing Authorization": ("/v1/chat/completions", {"Content-Type": "application/json"}, CHAT, 401,
                              "invalid_api_key"),
    "wrong key": ("/v1/chat/completions", {**AUTH, "Authorization": "Bearer nope"}, CHAT, 401, "invalid_api_key"),
    "unknown model (chat)": ("/v1/chat/completions", AUTH, {**CHAT, "model": "gpt-4o"}, 404, "model_not_found"),
    "unknown model (embeddings)": ("/v1/embeddings", AUTH, {"model": "gpt-4o", "input": "hi"}, 404,
                                   "model_not_found"),
    "max_tokens beyond the context": ("/v1/chat/completions", AUTH, {**CHAT, "max_tokens": 5000}, 400, "max_tokens"),
    "empty messages": ("/v1/chat/completions", AUTH, {**CHAT, "messages": []}, 400, "messages"),
    "missing messages": ("/v1/chat/completions", AUTH, {"model": "tiny"}, 400, "messages"),
    "temperature out of range": ("/v1/chat/completions", AUTH, {**CHAT, "temperature": 5}, 400, "temperature"),
    "oversized body": ("/v1/chat/completions", AUTH, {**CHAT, "padding": "x" * 20_000}, 413, "request_too_large"),
    "oversized chunked body": ("/v1/chat/completions", AUTH, _oversized_chunks, 413, "request_too_large"),
    "unknown field": ("/v1/chat/completions", AUTH, {**CHAT, "top_k": 5}, 400, "top_k"),
    "logprobs": ("/v1/chat/completions", AUTH, {**CHAT, "logprobs": True}, 400, "logprobs"),
    "tools": ("/v1/chat/completions", AUTH, {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    "json_schema output": ("/v1/chat/completions", AUTH, {**CHAT, "response_format": {"type": "json_schema"}}, 400,
                           "response_format"),
    "unknown field (embeddings)": ("/v1/embeddings", AUTH, {"model": "tiny", "input": "hi", "x": 1}, 400, "x"),
    "unknown route": ("/v1/completions", AUTH, {"model": "tiny", "prompt": "hi"}, 404, "404"),
    # json.dumps writes the lone surrogate as the escape "\\ud800", which the server decodes to it.
    "lone surrogate": ("/v1/chat/completions", AUTH, {**CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]},
                       400, "messages[0].content"),
    "lone surrogate (embeddings)": ("/v1/embeddings", AUTH, {"model": "tiny", "input": ["ok", "hi \udc00"]}, 400,
                                    "input[1]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_in_openai_shape_and_the_server_keeps_serving(tiny, in_process, case):
    path, headers, body, status, where = BAD_REQUESTS[case]
    payload = {"content": body()} if callable(body) else {"content": body} if isinstance(body, bytes) \
        else {"content": json.dumps(body)}
    resp = httpx.post(tiny.url + path, headers=headers, timeout=30, **payload)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert where in (error["param"], error["code"]), error
    assert say(tiny.client, "alpha") == in_process["alpha"]


def test_the_openai_client_reads_the_errors(tiny):
    with pytest.raises(openai.BadRequestError, match="max_tokens") as err:
        tiny.client.chat.completions.create(model="alpha", messages=SAY, max_tokens=5000)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as err:
        tiny.client.embeddings.create(model="gamma", input="hi")
    assert err.value.code == "model_not_found" and "alpha, beta" in err.value.message
    with pytest.raises(openai.BadRequestError, match="not supported"):
        tiny.client.chat.completions.create(model="alpha", messages=SAY, extra_body={"top_k": 3})


# ---------------------------------------------------------------- clients isolated from one another


def _token_inputs(n: int, inputs: int) -> list[list[int]]:
    rnd = random.Random(0)
    return [[rnd.randrange(100, 40000) for _ in range(n)] for _ in range(inputs)]


def _stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


@pytest.mark.slow
def test_a_chat_sent_during_a_long_embedding_is_answered_first_and_the_embedding_stops_when_its_client_leaves(
        server, client, greedy):
    """Measured before: a 0.27 s chat took 32.4 s during a 2x8,192-token embedding (it waited for all of
    it), and a client that left did not stop the embedding while /v1/stats showed nothing running."""
    engine = server.app.state.engine
    expected = greedy(PROMPT, 8)
    before = dict(engine.stats)
    body = json.dumps({"model": BASE, "input": _token_inputs(8192, 2)})  # ~35 s of embedding on 2 cores
    where = urlsplit(server.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request("POST", "/v1/embeddings", body=body,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        deadline = time.monotonic() + 60
        while not _stats(server.url)["embedding_running"]:
            assert time.monotonic() < deadline, "the embedding never showed in /v1/stats"
            time.sleep(0.1)
        assert ask(client, PROMPT, max_tokens=8).choices[0].message.content == expected
        assert _stats(server.url)["embedding_running"] == 1, "the chat was answered only after the embedding"
    finally:
        conn.close()  # the embedding's client leaves
    deadline = time.monotonic() + 15
    while engine.snapshot()["embedding_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not engine.snapshot()["embedding_running"], "the abandoned embedding is still running"
    spent = engine.stats["embedding_tokens"] - before["embedding_tokens"]
    assert 0 < spent < 8192, f"the abandoned embedding ran {spent} of its 16384 tokens"
    assert engine.stats["embedding_requests"] == before["embedding_requests"]


@pytest.mark.slow
def test_an_embedding_request_over_the_token_limit_is_a_400_naming_the_fix(server):
    """8 inputs of the full context are allowed; one token more is refused before any is embedded."""
    engine = server.app.state.engine
    before = dict(engine.stats)
    resp = httpx.post(server.url + "/v1/embeddings", json={"model": BASE, "input": [*_token_inputs(8192, 8), [5]]},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["param"] == "input" and error["type"] == "invalid_request_error"
    assert "65537 tokens" in error["message"] and "limit of 65536" in error["message"]
    assert "several smaller requests" in error["message"]
    assert engine.stats["embedding_tokens"] == before["embedding_tokens"]


class _HeldTokenizer:
    """The engine's tokenizer, holding each call until released: a message of megabytes, tokenized."""

    def __init__(self, tok):
        self.tok, self.entered, self.release = tok, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)
        return self.tok(*args, **kwargs)


@pytest.mark.parametrize("route", ["chat", "embeddings"])
def test_the_server_answers_while_a_request_is_tokenized(tiny, in_process, route):
    """A 7.5 MB message was tokenized on the event loop: /health took 11.4 s for a user meanwhile."""
    engine = tiny.app.state.engine
    held = _HeldTokenizer(engine.tok)
    engine.tok = held
    with ThreadPoolExecutor(1) as pool:
        try:
            if route == "chat":
                call = pool.submit(say, tiny.client, "alpha")
            else:
                call = pool.submit(lambda: tiny.client.embeddings.create(model="tiny", input="a lighthouse",
                                                                         encoding_format="float"))
            assert held.entered.wait(30), "the request never reached the tokenizer"
            assert httpx.get(tiny.url + "/health", timeout=5).json() == {"status": "ok"}
            assert _stats(tiny.url)["running"] == 0
        finally:
            held.release.set()
            engine.tok = held.tok
        result = call.result(timeout=60)
    if route == "chat":
        assert result == in_process["alpha"]
    else:
        assert len(result.data[0].embedding) == 64


SHUTDOWN_S = 10  # measured 0.8 s here; before, the server outlived a 4x8,192-token embedding (over 90 s)


@pytest.mark.slow
def test_sigint_during_a_long_embedding_stops_doctune_serve_within_seconds(tmp_path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    cmd = [sys.executable, "-m", "doctune.cli", "serve", "--no-promoted", "--port", str(port),
           "--outputs", str(tmp_path)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    answer = {}

    def embed():
        body = {"model": BASE, "input": _token_inputs(8192, 4)}  # ~2 minutes of embedding on 2 cores
        try:
            answer["response"] = httpx.post(url + "/v1/embeddings", json=body, timeout=120)
        except httpx.HTTPError as exc:
            answer["error"] = exc

    client = threading.Thread(target=embed)
    try:
        wait_until_healthy(proc, url, log.read_text)
        client.start()
        deadline = time.monotonic() + 60
        while not httpx.get(url + "/v1/stats", timeout=10).json().get("embedding_tokens"):
            assert time.monotonic() < deadline, "the embedding never started"
            time.sleep(0.1)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client.join(timeout=60)
    assert took < SHUTDOWN_S, f"doctune serve took {took:.1f} s to stop after SIGINT:\n{log.read_text()[-2000:]}"
    resp = answer.get("response")
    assert resp is not None and resp.status_code == 500, answer
    assert "shutting down" in resp.json()["error"]["message"]


# ---------------------------------------------------------------- refusing an open server


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_key(host):
    check_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost"])
def test_beyond_loopback_needs_a_key(host):
    check_exposure(host, "k3y-of-twenty-one-chr")
    with pytest.raises(ValueError, match="--api-key-env") as err:
        check_exposure(host, None)
    assert "DOCTUNE_SERVE_API_KEY" in str(err.value) and host in str(err.value)


@pytest.mark.parametrize("key", ["x", " ", "short-key-15chr", " k3y-of-twenty-one-chr"])
def test_beyond_loopback_a_short_or_blank_key_is_refused(key):
    with pytest.raises(ValueError, match="at least 16 characters"):
        check_exposure("0.0.0.0", key)
    check_exposure("127.0.0.1", key)  # loopback needs none, so any will do


def test_a_vanishing_temperature_is_greedy_and_fails_no_other_row(tiny, in_process):
    """1e-45 passes the 0..2 range check; dividing logits by it gives NaN probabilities, which failed
    the sampling of every row in the batch (HTTP 500 for all)."""
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda t: tiny.client.chat.completions.create(
            model="alpha", messages=SAY, temperature=t, max_tokens=WORDS).choices[0].message.content,
            [1e-45, 0, 1e-45, 0]))
    assert replies == [in_process["alpha"]] * 4


def test_run_server_refuses_before_loading_the_model(tmp_path):
    with pytest.raises(ValueError, match="no API key"):  # not FileNotFoundError: nothing was loaded
        run_server(str(tmp_path / "no-model-here"), host="0.0.0.0", api_key=None)


def test_doctune_serve_on_all_interfaces_without_a_key_exits_with_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DOCTUNE_SERVE_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "doctune.cli", "serve", "--host", "0.0.0.0",
                           "--outputs", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no API key" in proc.stderr and "export DOCTUNE_SERVE_API_KEY=" in proc.stderr
    assert "loaded" not in proc.stderr + proc.stdout
