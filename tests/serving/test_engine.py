"""The engine: greedy text is transformers' own, a seeded sample does not depend on its batch,
concurrent requests share a batch, and a newcomer prefilled inside the running rows' decode step
(or apart, when that step fails) answers as it would alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from doctune.serving.engine import Engine
from doctune.serving.handlers import encode_chat
from doctune.serving.jobs import GenJob
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
