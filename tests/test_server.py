"""The local OpenAI-compatible server on a free 127.0.0.1 port, spoken to with the official `openai`
client the way synthesis and dedup speak to it: over the real offline model (slow: what it says),
and over the tiny random model with two quickly trained LoRA adapters (what it serves, how it
refuses bad requests, what `doctune serve` picks from the registry)."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from doctune.base_model import prepare_base_model
from doctune.server import (Engine, GenJob, _GreedyHead, _PrefixStore, _streamable, check_exposure, create_app, plan_models,
                            run_server)
from tests.endpoints import serving_in_thread, wait_until_healthy

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
    with serving_in_thread(app) as srv:
        yield srv


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
def test_greedy_answers_are_what_transformers_generates(server, greedy, model_path):
    """The engine applies the head itself (bf16 candidates checked in fp32, where faster) and
    prefills newcomers inside decode steps: greedy text must still be transformers' own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    for prompt in (PROMPT, EMOJI_PROMPT, "Give one word that rhymes with cat."):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=False), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            seq = model.generate(**ids, max_new_tokens=16, do_sample=False)
        assert greedy(prompt) == tok.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), prompt
    assert server.app.state.stats["greedy_rows_rechecked_in_fp32"] < server.app.state.stats["completion_tokens"]


@pytest.mark.slow
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
    while engine._rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._rows, "the abandoned request is still decoding"


def test_streamable_holds_back_stop_prefixes_and_partial_characters():
    assert _streamable("Hello wor", ["world!"]) == "Hello "
    assert _streamable("Hello", ["\n\n"]) == "Hello"
    assert _streamable("Hello\n", ["\n\n"]) == "Hello"
    assert _streamable("ab\ufffd", []) == "ab"


@pytest.mark.slow
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


# ---------------------------------------------------------------- the tiny model with two adapters

SAY = [{"role": "user", "content": "Say your words."}]
REPLIES = {"alpha": "alpha bravo charlie delta echo", "beta": "one two three four five six"}
WORDS = 6  # new tokens asked for: within the trained replies, where greedy margins are wide


def _train_run(tiny_model: str, reply: str, run_dir: Path) -> Path:
    """A finished run folder as the train stage leaves it (adapter/ + run.json), its LoRA fitted in
    a few steps to answer SAY with `reply`, so each adapter says something the base does not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    prompt = tok(tok.apply_chat_template(SAY, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template([*SAY, {"role": "assistant", "content": reply}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(40):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({"base_model": tiny_model, "steps": 40}))
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs") / "models"
    return {name: _train_run(tiny_model, reply, root / f"run-{name}") for name, reply in REPLIES.items()}


@pytest.fixture(scope="module")
def in_process(tiny_model, runs) -> dict[str, str]:
    """What peft's own greedy `generate` says to SAY with each adapter, and with none ("base")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(runs["alpha"] / "adapter"), adapter_name="alpha")
    model.load_adapter(str(runs["beta"] / "adapter"), adapter_name="beta")
    ids = tok(tok.apply_chat_template(SAY, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
              return_tensors="pt")

    def greedy_reply() -> str:
        with torch.inference_mode():
            seq = model.generate(**ids, max_new_tokens=WORDS, do_sample=False)
        return tok.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    with model.disable_adapter():
        out = {"base": greedy_reply()}
    for name in ("alpha", "beta"):
        model.set_adapter(name)
        out[name] = greedy_reply()
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model, runs):
    app = create_app(tiny_model, served_name="tiny", api_key=KEY, max_batch=8, batch_wait_ms=20,
                     adapters={name: str(run / "adapter") for name, run in runs.items()}, max_body_mb=0.01)
    with serving_in_thread(app) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield srv


def say(client, model: str, **params) -> str:
    resp = client.chat.completions.create(model=model, messages=SAY, temperature=0, max_tokens=WORDS, **params)
    return resp.choices[0].message.content


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


def test_a_prompt_seen_before_prefills_only_its_end_and_answers_the_same(tiny, in_process):
    engine = tiny.app.state.engine
    prompt = engine.encode_chat(SAY)
    cached = []
    for _ in range(2):
        before = engine.stats["cached_prompt_tokens"]
        assert say(tiny.client, "alpha") == in_process["alpha"]
        cached.append(engine.stats["cached_prompt_tokens"] - before)
    # Whole blocks of 16, and never the last token: its logits give the first new token.
    assert cached[1] == 16 * ((len(prompt) - 1) // 16) > 0
    # Another adapter's keys/values differ: a prompt stored under one is not found under another.
    briefly = [{"role": "system", "content": "You answer briefly."}, *SAY]
    for model, found in (("tiny", False), ("beta", False), ("beta", True)):
        before = engine.stats["cached_prompt_tokens"]
        tiny.client.chat.completions.create(model=model, messages=briefly, temperature=0, max_tokens=2)
        assert (engine.stats["cached_prompt_tokens"] > before) == found, model


class _Recorder:
    """What the engine sends a request (the HTTP side's queue, without the HTTP)."""

    cancelled = False

    def __init__(self):
        self.events = []

    def send(self, *event):
        self.events.append(event)

    def fail(self, message):
        self.events.append(("error", message))

    def text(self) -> str:
        return next(e[2] for e in self.events if e[0] == "done")


@pytest.fixture
def alpha_engine(tiny_model, runs):
    """The engine driven step by step in this thread, serving adapter alpha."""
    engine = Engine(tiny_model, adapters={"alpha": str(runs["alpha"] / "adapter")}, prefix_cache_mb=0)
    say = engine.encode_chat(SAY)

    def job(max_new: int) -> GenJob:
        return GenJob(say, max_new, temperature=0, top_p=1, presence=0, frequency=0, seed=None, stops=[], n=1,
                      adapter="alpha", stream=False, reply=_Recorder())

    engine.job = job
    with torch.inference_mode():
        yield engine


def _serve_running_then_newcomer(engine, before_newcomer=lambda: None):
    running, newcomer = engine.job(4 * WORDS), engine.job(WORDS)
    engine.submit(running)
    engine._admit()
    for _ in range(3):
        engine._step()
    before_newcomer()
    engine.submit(newcomer)
    engine._admit()
    while engine._rows:
        engine._step()
    return running.reply, newcomer.reply


def test_a_newcomer_is_prefilled_in_the_running_rows_decode_step_and_answers_as_alone(alpha_engine, in_process):
    running, newcomer = _serve_running_then_newcomer(alpha_engine)
    assert alpha_engine.stats["prefilled_in_decode_step"] == 1
    assert newcomer.text() == in_process["alpha"]
    assert running.text().startswith(in_process["alpha"])


def test_a_failed_shared_step_leaves_the_running_rows_as_they_were_and_prefills_the_newcomer_apart(
        alpha_engine, in_process):
    def fail_once(module, args, kwargs):
        if kwargs.get("ragged") is not None:
            hook.remove()
            raise RuntimeError("injected fault")  # after layer 0 appended the running rows' keys

    def arm():
        nonlocal hook
        hook = alpha_engine.lm.model.layers[1].self_attn.register_forward_pre_hook(fail_once, with_kwargs=True)

    hook = None
    running, newcomer = _serve_running_then_newcomer(alpha_engine, arm)
    assert hook is not None and not alpha_engine.lm.model.layers[1].self_attn._forward_pre_hooks
    assert alpha_engine.stats["prefilled_in_decode_step"] == 0
    assert newcomer.text() == in_process["alpha"]
    assert running.text().startswith(in_process["alpha"])


def _head_and_hidden(seed: int = 0, vocab: int = 4096, dim: int = 64, rows: int = 256):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g) * 0.1
    hidden = torch.randn(rows, dim, generator=g) * 5
    hidden[:, 3] *= 20  # one massive activation, as LLM hidden states have
    return weight, hidden


def test_greedy_head_bounds_the_bf16_error_and_gives_the_fp32_argmax():
    weight, hidden = _head_and_hidden()
    head = _GreedyHead(weight)
    exact = hidden @ weight.t()
    approx = torch.nn.functional.linear(hidden.bfloat16(), head.wb).float()
    bound = approx.abs() * 2.0**-8 + head.gamma * head.norms[None] * hidden.norm(dim=1, keepdim=True)
    assert bool(((approx - exact).abs() <= bound).all()), "the bf16 error exceeded the bound the head relies on"
    assert head.argmax(hidden) == exact.argmax(-1).tolist()
    assert head.fallbacks < len(hidden) // 10  # it is faster only if the bound settles most rows


def test_greedy_head_rechecks_a_near_tie_in_fp32():
    weight, hidden = _head_and_hidden(rows=4)
    top = (hidden @ weight.t()).argmax(-1)
    # More near-copies of each row's top token than the head takes candidates: bf16 cannot tell
    # them apart (their logits differ by ~1e-5), so some stay outside the candidates, unsettled.
    head_k = _GreedyHead.k
    for r in range(4):
        twins = torch.arange(100 + r * 2 * head_k, 100 + (r + 1) * 2 * head_k)
        weight[twins] = weight[top[r]] * (1 + 1e-5 * torch.linspace(-1, 1, len(twins)))[:, None]
    head = _GreedyHead(weight)
    assert head.argmax(hidden) == (hidden @ weight.t()).argmax(-1).tolist()
    assert head.fallbacks == 4


def test_prefix_store_finds_whole_prefixes_and_drops_the_deepest_blocks_first():
    def blocks(i):  # one layer; 16 positions x 2 heads x 2 dims: 256 bytes of keys, 256 of values
        return [(torch.full((2, 16, 2), float(i)), torch.zeros(2, 16, 2))]

    store = _PrefixStore(budget_bytes=3 * 512, block=16)
    a = list(range(40))
    store.store(None, a, 0, blocks)  # its 2 whole blocks
    assert len(store.lookup(None, a)) == 2 and store.lookup("adapter", a) == []
    b = a[:16] + [99] * 40  # shares a's first block only
    assert len(store.lookup(None, b)) == 1
    store.store(None, b, 1, blocks)  # 2 more: over budget, so a's second block (the least recent) goes
    assert len(store.lookup(None, b)) == 3 and len(store.lookup(None, a)) == 1
    assert store.bytes == 3 * 512 and len(store.blocks) == 3
    assert store.lookup(None, a[:16]) == []  # a prompt of one block keeps its last token to prefill


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
    while engine._rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._rows, "abandoned streams are still decoding"
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


# ---------------------------------------------------------------- refusing an open server


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_key(host):
    check_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost"])
def test_beyond_loopback_needs_a_key(host):
    check_exposure(host, "a-key")
    with pytest.raises(ValueError, match="--api-key-env") as err:
        check_exposure(host, None)
    assert "DOCTUNE_SERVE_API_KEY" in str(err.value) and host in str(err.value)


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


# ---------------------------------------------------------------- what `doctune serve` picks


def _promote(outputs: Path, run_dir: Path | str) -> None:
    (outputs / "registry").mkdir(parents=True, exist_ok=True)
    (outputs / "registry" / "current.json").write_text(json.dumps({"run_dir": str(run_dir), "metric": "fact_recall"}))


def test_plan_serves_the_promoted_run_and_named_adapters_on_their_base(tiny_model, runs, tmp_path):
    _promote(tmp_path, runs["alpha"])
    base, adapters = plan_models(None, [f"b={runs['beta']}"], tmp_path, "tiny")
    assert base == tiny_model
    assert adapters == {"promoted": str(runs["alpha"] / "adapter"), "b": str(runs["beta"] / "adapter")}
    # An adapter folder itself works too; --no-promoted (outputs None) leaves the registry alone.
    assert plan_models(tiny_model, [f"b={runs['beta'] / 'adapter'}"], None, "tiny") == \
        (tiny_model, {"b": str(runs["beta"] / "adapter")})


def test_plan_without_a_promotion_serves_the_default_base(tmp_path):
    assert plan_models(None, [], tmp_path, "tiny") == (None, {})


def test_plan_finds_a_relative_run_dir_under_the_outputs_folder(runs):
    outputs = runs["alpha"].parent.parent  # <outputs>/models/run-alpha
    _promote(outputs, "somewhere/else/models/run-alpha")  # as a worker in another directory wrote it
    assert plan_models(None, [], outputs, "tiny")[1] == {"promoted": str(runs["alpha"] / "adapter")}


@pytest.mark.parametrize("spec, message", [
    ("beta", "expected NAME=RUN_DIR"),
    ("=x", "expected NAME=RUN_DIR"),
    ("my adapter=x", "expected NAME=RUN_DIR"),
    ("b=", "expected NAME=RUN_DIR"),
    ("b=/no/such/run", "/no/such/run does not exist"),
    ("tiny={beta}", "is the base model's name"),
])
def test_plan_refuses_a_bad_adapter_spec(runs, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        plan_models(None, [spec.format(beta=runs["beta"])], None, "tiny")


def test_plan_refuses_a_folder_without_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither adapter/adapter_config.json"):
        plan_models(None, [f"b={tmp_path}"], None, "tiny")


def test_plan_refuses_duplicate_names(runs, tmp_path):
    with pytest.raises(ValueError, match="'b' is taken"):
        plan_models(None, [f"b={runs['alpha']}", f"b={runs['beta']}"], None, "tiny")
    _promote(tmp_path, runs["alpha"])
    with pytest.raises(ValueError, match="--no-promoted"):
        plan_models(None, [f"promoted={runs['beta']}"], tmp_path, "tiny")


def test_plan_refuses_adapters_of_different_bases(runs, tmp_path, tiny_model):
    other = tmp_path / "run-other"
    (other / "adapter").mkdir(parents=True)
    (other / "adapter" / "adapter_config.json").write_text("{}")
    (other / "run.json").write_text(json.dumps({"base_model": "/models/qwen"}))
    with pytest.raises(ValueError) as err:
        plan_models(None, [f"a={runs['alpha']}", f"o={other}"], None, "tiny")
    assert "/models/qwen" in str(err.value) and tiny_model in str(err.value)
    assert str(other / "run.json") in str(err.value)
    with pytest.raises(ValueError, match="--model is /models/qwen") as err:
        plan_models("/models/qwen", [f"a={runs['alpha']}"], None, "tiny")
    assert tiny_model in str(err.value)


def test_plan_names_the_registry_file_when_the_promoted_run_is_gone(tmp_path):
    _promote(tmp_path, tmp_path / "models" / "deleted-run")
    with pytest.raises(FileNotFoundError, match="current.json: run_dir .*--no-promoted"):
        plan_models(None, [], tmp_path, "tiny")
    (tmp_path / "registry" / "current.json").write_text("{}")
    with pytest.raises(ValueError, match="no run_dir field"):
        plan_models(None, [], tmp_path, "tiny")
    (tmp_path / "registry" / "current.json").write_text('{"run_dir": ')
    with pytest.raises(ValueError, match="current.json: not valid JSON"):
        plan_models(None, [], tmp_path, "tiny")


def test_doctune_serve_serves_the_promoted_run_over_http(runs, in_process, tmp_path):
    """The whole command: registry → adapters → base from run.json → uvicorn on a free port."""
    _promote(tmp_path, runs["alpha"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "DOCTUNE_SERVE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "doctune.cli", "serve", "--port", str(port), "--name", "tiny",
                             "--outputs", str(tmp_path), "--adapter", f"b={runs['beta']}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, lambda: proc.stdout.read().decode() if proc.poll() is not None else "")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny", "promoted", "b"]
        assert say(client, "promoted") == in_process["alpha"]
        assert say(client, "b") == in_process["beta"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def test_synthesis_starts_doctune_serve_without_the_promoted_adapter(monkeypatch, tmp_path):
    from doctune import local_llm
    from doctune.settings import LLMSettings

    started = []

    class Exited:  # a server that exits at once: serving() reports it and stops waiting
        pid, returncode = 0, 1

        def __init__(self, cmd, **kw):
            started.append(cmd)

        def poll(self):
            return 1

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing answers there
    monkeypatch.setattr(local_llm.subprocess, "Popen", Exited)
    llm = LLMSettings(base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        with local_llm.serving(llm, log_dir=tmp_path):
            pass
    assert started and started[0][3] == "serve" and "--no-promoted" in started[0]
