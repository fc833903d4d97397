"""The engine: greedy text is transformers' own, a seeded sample does not depend on its batch,
concurrent requests share a batch, and a newcomer prefilled inside the running rows' decode step
(or apart, when that step fails) answers as it would alone. One request cannot stall or fail
another: embeddings run in bounded pieces between decode steps (with the vectors of one forward),
an abandoned one is dropped, and a row that fails fails alone."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from doctune.serving import engine as engine_module
from doctune.serving import sampling
from doctune.serving.engine import Engine
from doctune.serving.handlers import encode_chat
from doctune.serving.jobs import EmbedJob, GenJob
from tests.serving.common import EMOJI_PROMPT, PROMPT, SAY, WORDS, ask


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
    say = encode_chat(engine.tok, SAY)

    def job(max_new: int) -> GenJob:
        return GenJob(say, max_new, temperature=0, top_p=1, presence=0, frequency=0, seed=None, stops=[], n=1,
                      adapter="alpha", stream=False, reply=_Recorder())

    engine.job = job
    with torch.inference_mode():
        yield engine


def _serve_running_then_newcomer(engine, before_newcomer=lambda: None):
    running, newcomer = engine.job(4 * WORDS), engine.job(WORDS)
    engine.submit(running)
    engine.admit()
    for _ in range(3):
        engine.step()
    before_newcomer()
    engine.submit(newcomer)
    engine.admit()
    while engine.snapshot()["running"]:
        engine.step()
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


# ---------------------------------------------------------------- one request cannot stall or fail another


def _ids(engine, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(100, engine.vocab) for _ in range(n)] for n in lengths]


def test_embeddings_run_in_bounded_pieces_are_the_vectors_of_one_forward(tiny_model, runs):
    """Short inputs share a piece, longer ones run a piece at a time over their own cache; each vector
    must still be the mean of one forward's last hidden state over the input, L2-normalised."""
    engine = Engine(tiny_model, adapters={"alpha": str(runs["alpha"] / "adapter")}, prefix_cache_mb=0,
                    max_batch=4, embed_piece_tokens=16)
    lengths = [3, 5, 5, 7, 16, 17, 40, 100]
    inputs = _ids(engine, lengths)
    widths = []
    with torch.inference_mode():
        one_shot = {}
        for adapter in (None, "alpha"):
            with engine._adapter(adapter):
                one_shot[adapter] = [F.normalize(engine.decoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
                                                 .mean(0), dim=-1) for ids in inputs]
        hook = engine.decoder.register_forward_pre_hook(
            lambda module, args, kwargs: widths.append(kwargs["input_ids"].numel()), with_kwargs=True)
        for adapter in (None, "alpha"):
            job = EmbedJob(inputs, adapter, _Recorder())
            engine.submit(job)
            for _ in range(50):
                engine.turn()
                if job.reply.events:
                    break
            [(kind, vectors)] = job.reply.events
            assert kind == "embeddings"
            for n, got, want in zip(lengths, vectors, one_shot[adapter], strict=True):
                assert torch.allclose(got, want, atol=1e-5), f"the {n}-token input, adapter {adapter}"
        hook.remove()
    assert max(widths) <= 16, f"a piece ran {max(widths)} positions, over embed_piece_tokens=16"
    assert len(widths) >= 2 * (2 + 3 + 7), "the 17-, 40- and 100-token inputs did not run in pieces"
    assert engine.stats["embedding_tokens"] == 2 * sum(lengths) and engine.stats["embedding_requests"] == 2
    assert engine.snapshot()["embedding_running"] == 0


def test_a_chat_sent_during_a_long_embedding_is_answered_first_and_an_abandoned_one_is_dropped(
        alpha_engine, in_process):
    """A whole embedding request used to run between two decode steps: an abandoned 4,096-token one
    turned a user's 1.1 s chat into 60.8 s. Now each turn of the worker runs at most one piece."""
    engine = alpha_engine
    long = EmbedJob(_ids(engine, [1000] * 8), None, _Recorder())  # 32 pieces of 256 tokens
    engine.submit(long)
    engine.turn()
    assert engine.snapshot()["embedding_running"] == 1 and engine.stats["embedding_tokens"] == 256
    chat = engine.job(WORDS)
    engine.submit(chat)
    for _ in range(100):
        engine.turn()
        if any(e[0] == "done" for e in chat.reply.events):
            break
    assert chat.reply.text() == in_process["alpha"]
    assert not long.reply.events and engine.snapshot()["embedding_running"] == 1, "the chat waited for the embedding"
    spent = engine.stats["embedding_tokens"]
    assert 256 < spent < 8000
    long.reply.cancelled = True  # its client left
    engine.turn()
    assert engine.snapshot()["embedding_running"] == 0 and engine.stats["embedding_tokens"] == spent
    assert not long.reply.events and engine.stats["embedding_requests"] == 0


@pytest.mark.parametrize("where", ["sampling", "advance"])
def test_a_row_that_fails_fails_alone_and_its_batch_goes_on(alpha_engine, in_process, monkeypatch, where):
    """An exception in one row's sampling or bookkeeping used to fail every running row (HTTP 500 for all)."""
    engine = alpha_engine
    good, bad = engine.job(4 * WORDS), replace(engine.job(4 * WORDS), temperature=1.0, seed=13, reply=_Recorder())

    def failing_for_bad(real):
        def wrapped(row, *args):
            if row.job is bad and row.sampled >= 2:
                raise RuntimeError("injected fault in one row")
            return real(row, *args)
        return wrapped

    if where == "sampling":
        monkeypatch.setattr(sampling, "sample_row", failing_for_bad(sampling.sample_row))
    else:
        monkeypatch.setattr(engine_module, "advance", failing_for_bad(engine_module.advance))
    engine.submit(good)
    engine.submit(bad)
    engine.admit()
    for _ in range(100):
        if not engine.snapshot()["running"]:
            break
        engine.step()
    assert engine.stats["max_batch_size"] == 2, "the two requests did not share a batch"
    assert bad.reply.events[-1][0] == "error" and "injected fault in one row" in bad.reply.events[-1][1]
    assert good.reply.text().startswith(in_process["alpha"])
    assert not engine.snapshot()["running"]
