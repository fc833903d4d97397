"""The local OpenAI-compatible server, over the real offline model, on a free 127.0.0.1 port,
spoken to with the official `openai` client the way synthesis and dedup speak to it."""

from __future__ import annotations

import functools
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch

from doctune.base_model import prepare_base_model
from doctune.server import _streamable, create_app

pytestmark = pytest.mark.slow

KEY = "test-key"
BASE = "smollm2-135m-instruct"
ADAPTER = "tiny-lora"
PROMPT = "What is the capital of France?"
# Its greedy answer starts with emoji that take 3 byte-level tokens each: partial UTF-8 mid-stream.
EMOJI_PROMPT = "你好，请介绍一下自己。"


@pytest.fixture(scope="module")
def model_path():
    return prepare_base_model()


@pytest.fixture(scope="module")
def adapter_dir(model_path, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    # Random A and B (not peft's zero B), so the adapter visibly changes the answers.
    lora = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(model_path, adapter_dir):
    app = create_app(str(model_path), api_key=KEY, max_batch=8, batch_wait_ms=50,
                     adapters={ADAPTER: str(adapter_dir)})
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app)
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def greedy(client):
    """Greedy answers, asked once per (prompt, max_tokens, model)."""

    @functools.cache
    def answer(prompt: str, max_tokens: int = 16, model: str = BASE) -> str:
        return ask(client, prompt, max_tokens=max_tokens, model=model).choices[0].message.content

    return answer


def ask(client, prompt: str, model: str = BASE, **params):
    params.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **params)


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == [BASE, ADAPTER]


def test_chat_returns_text_and_usage(client):
    resp = ask(client, PROMPT, max_tokens=16)
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.model == BASE and resp.object == "chat.completion"
    usage = resp.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_same_seed_same_sample_even_when_batched(client, greedy):
    params = dict(temperature=1.2, top_p=0.95, seed=1234, max_tokens=12)
    alone = [ask(client, "Tell me a story.", **params).choices[0].message.content for _ in range(2)]
    assert alone[0] == alone[1]
    other = ask(client, "Tell me a story.", **{**params, "seed": 99}).choices[0].message.content
    assert other != alone[0], "a different seed gave the same 12 sampled tokens: is the seed used at all?"
    # The same seeded request again, now sharing a batch with two others.
    prompts = ["Tell me a story.", "Name a colour.", "Count to five."]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda p: ask(client, p, **params).choices[0].message.content, prompts))
    assert together[0] == alone[0]
    assert greedy(PROMPT) == ask(client, PROMPT, max_tokens=16).choices[0].message.content


def test_stop_string_is_trimmed(client, greedy):
    full = greedy(PROMPT, 24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    resp = ask(client, PROMPT, max_tokens=24, stop=[stop, "never appears"])
    assert resp.choices[0].message.content == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_max_tokens_respected(client):
    resp = ask(client, "Write a long essay about the sea.", max_tokens=5)
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"
    resp = ask(client, "Write a long essay about the sea.", max_completion_tokens=3)
    assert resp.usage.completion_tokens == 3


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


def test_a_client_that_leaves_mid_stream_stops_costing_compute(server, client):
    engine = server.app.state.engine
    stream = ask(client, "Write a long essay about the sea.", max_tokens=400, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 5  # the 400 tokens it asked for take ~20 s on 2 cores
    while engine._rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._rows, "the abandoned request is still decoding"


def test_streamable_holds_back_stop_prefixes_and_partial_characters():
    assert _streamable("Hello wor", ["world!"]) == "Hello "
    assert _streamable("Hello", ["\n\n"]) == "Hello"
    assert _streamable("Hello\n", ["\n\n"]) == "Hello"
    assert _streamable("ab\ufffd", []) == "ab"


def test_concurrent_requests_are_batched(server, client, greedy):
    prompts = [f"Give one word that rhymes with {w}." for w in
               ["cat", "dog", "sun", "tree", "house", "moon", "car", "a very long and unusual word"]]
    server.app.state.stats["max_batch_size"] = 0  # measure this test's requests only
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: ask(client, p, max_tokens=8).choices[0].message.content, prompts))
    assert all(answers)
    assert server.app.state.stats["max_batch_size"] > 1
    # Left padding and per-row positions must not change what a row says: the shortest and the
    # longest prompt answer the same alone.
    for i in (0, 7):
        assert answers[i] == greedy(prompts[i], 8)


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


def test_wrong_key_and_unknown_model(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        ask(right, "Hi", model="gpt-4o", max_tokens=2)
    assert err.value.code == "model_not_found" and BASE in err.value.message


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


def test_adapter_is_served_by_name_beside_the_base(client, greedy):
    base = greedy(PROMPT, 12)
    tuned = greedy(PROMPT, 12, ADAPTER)
    assert tuned != base
    # One batch with both: each row keeps its own adapter.
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda m: ask(client, PROMPT, model=m, max_tokens=12).choices[0].message.content,
                             [BASE, ADAPTER]))
    assert both == [base, tuned]
