"""OpenAI requests to engine jobs and back: validate a request (a 400 names the field), encode its
messages with the model's chat template (both in a thread, off the event loop), submit the job, and
turn the worker's events into an OpenAI response or server-sent events."""

from __future__ import annotations

import asyncio
import base64

from fastapi import Request
from fastapi.responses import JSONResponse
from openai.types import CompletionUsage, CreateEmbeddingResponse, Embedding
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.create_embedding_response import Usage as EmbeddingUsage

from doctune.serving.engine import Engine
from doctune.serving.jobs import EmbedJob, GenJob, Reply
from doctune.serving.protocol import APIError, ChatMessage, ChatRequest, EmbeddingRequest, bad

# A 135M model asked for an open-ended answer can loop until the context is full; without an
# explicit max_tokens we stop it here rather than at 8k tokens.
DEFAULT_MAX_TOKENS = 1024
MAX_STOPS = 16
# Below this a temperature is greedy (vLLM's sampling epsilon): logits / 1e-45 overflow to inf, and the
# NaN probabilities that follow would fail the sampling of every row in the batch, not only this one.
MIN_TEMPERATURE = 1e-5
# One embedding request's tokens in all: 8 inputs of the offline model's full 8,192-token context.
# Its pieces leave chat rows at least half the worker, but it still takes minutes: 8,192-token inputs
# ran at ~280 tokens/s here (2 cores), so 65,536 tokens take about 4 minutes.
DEFAULT_MAX_EMBEDDING_TOKENS = 65536


def valid_text(field: str, text: str) -> str:
    """`text` if it can be encoded as UTF-8; a lone surrogate (JSON's "\\ud800") is a 400 naming the field,
    not a 500 from the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(field, f"is not valid Unicode: {exc.reason} at character {exc.start} "
                         f"({text[exc.start:exc.end]!r}); send UTF-8 text") from None
    return text


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad(f"messages[{i}].content[{j}]",
                              f"part type {part.type!r} is not supported; this server serves a text-only model")
                texts.append(part.text)
            content = "".join(texts)
        # Templates of small chat models know "system" but not OpenAI's newer "developer".
        out.append({"role": "system" if m.role == "developer" else m.role,
                    "content": valid_text(f"messages[{i}].content", content or "")})
    return out


def check_unsupported(req: ChatRequest) -> None:
    if req.logprobs or req.top_logprobs:
        raise bad("logprobs", "log probabilities are not supported by this server")
    if req.logit_bias:
        raise bad("logit_bias", "not supported by this server")
    if req.tools or req.functions:
        raise bad("tools", "tool calling is not supported by this server")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad("tool_choice", "tool calling is not supported by this server; omit the field")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad("response_format", f"type {req.response_format.get('type')!r} is not supported; only 'text' "
                                     "(ask for JSON in the prompt and parse the reply)")


def encode_chat(tok, messages: list[dict]) -> list[int]:
    """The prompt's token ids: `messages` through the chat template of the tokenizer `tok`."""
    from jinja2 import TemplateError

    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise bad("messages", f"the model's chat template refused them: {exc}") from exc
    # The template already wrote every special token it wants.
    return tok(text, add_special_tokens=False)["input_ids"]


def with_default_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with `system` as their system message when they bring none: an adapter answers best under
    the system prompt it was trained with, and without one the chat template writes its own default."""
    if not system or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


async def chat_job(req: ChatRequest, engine: Engine, adapter: str | None, max_batch: int,
                   default_system: str | None = None) -> GenJob:
    """Validate a chat request (400s name the field) and turn it into the worker's job; a request without a
    system message gets `default_system` (the served adapter's training system prompt). Validating and
    tokenizing run in a thread: a 7.5 MB message takes seconds to tokenize (4.6 s here), and on the
    event loop it held every other request, /health included (11.4 s for a user)."""
    reply = Reply(asyncio.get_running_loop())
    fields = await asyncio.to_thread(chat_fields, req, engine, max_batch, default_system)
    return GenJob(**fields, adapter=adapter, reply=reply)


def chat_fields(req: ChatRequest, engine: Engine, max_batch: int, default_system: str | None) -> dict:
    """The GenJob fields of a chat request but its adapter and reply; APIError (a 400) naming the field
    at fault. Runs off the event loop: it touches only the request and the engine's tokenizer."""
    check_unsupported(req)
    n = req.n or 1
    if n > max_batch:
        raise bad("n", f"{n} choices do not fit one batch of this server (max_batch={max_batch})")
    stops = [valid_text("stop", s) for s in ([req.stop] if isinstance(req.stop, str) else list(req.stop or []))]
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad("stop", f"give at most {MAX_STOPS} non-empty strings")
    prompt = encode_chat(engine.tok, with_default_system(message_dicts(req.messages), default_system))
    room = engine.context - len(prompt)
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1:
        raise bad("messages", f"the prompt has {len(prompt)} tokens, leaving no room in the model's context of "
                              f"{engine.context} tokens; shorten the messages")
    if asked and asked > room:
        field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise bad(field_name, f"the prompt has {len(prompt)} tokens and {asked} more were asked for, over the "
                              f"model's context of {engine.context} tokens; ask for at most {room} or shorten "
                              "the messages")
    return dict(prompt=prompt, max_new=asked or min(DEFAULT_MAX_TOKENS, room),
                # OpenAI's default is 1; a temperature too small to divide by is greedy.
                temperature=1.0 if req.temperature is None else
                (0.0 if req.temperature < MIN_TEMPERATURE else req.temperature),
                top_p=1.0 if req.top_p is None else req.top_p, presence=req.presence_penalty or 0.0,
                frequency=req.frequency_penalty or 0.0, seed=req.seed, stops=stops, n=n, stream=bool(req.stream))


async def next_event(reply: Reply, request: Request) -> tuple | None:
    """The worker's next event for `reply`, or None once the client has gone: then the worker is told to
    stop spending compute on it (a client that timed out will retry, and its abandoned request would
    otherwise keep the worker busy)."""
    while True:
        try:
            return await asyncio.wait_for(reply.events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                reply.cancelled = True
                return None


async def chat_completion(job: GenJob, rid: str, created: int, model: str, request: Request) -> JSONResponse:
    """Wait for every choice of a submitted job and answer them as one chat.completion."""
    reply, n, prompt = job.reply, job.n, job.prompt
    done: dict[int, tuple] = {}
    while len(done) < n:
        event = await next_event(reply, request)
        if event is None:
            return JSONResponse({}, status_code=499)
        if event[0] == "error":
            raise APIError(500, event[1], type="server_error")
        if event[0] == "done":
            done[event[1]] = event[2:]
    completion = sum(d[2] for d in done.values())
    body = ChatCompletion(
        id=rid, object="chat.completion", created=created, model=model,
        choices=[Choice(index=i, finish_reason=done[i][1], logprobs=None,
                        message=ChatCompletionMessage(role="assistant", content=done[i][0])) for i in range(n)],
        usage=CompletionUsage(prompt_tokens=len(prompt), completion_tokens=completion,
                              total_tokens=len(prompt) + completion),
    )
    return JSONResponse(body.model_dump(mode="json", exclude_unset=True))


async def sse(job: GenJob, rid: str, created: int, model: str, include_usage: bool):
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


def embedding_inputs(req: EmbeddingRequest, engine: Engine, max_tokens: int) -> list[list[int]]:
    """Token ids per input (strings are tokenized, token arrays checked); 400s name the input. Over
    `max_tokens` in all is a 400 as soon as the count passes it (the rest is not tokenized). Runs off
    the event loop."""
    if req.dimensions is not None and req.dimensions != engine.hidden_size:
        raise bad("dimensions", f"this model's embeddings have {engine.hidden_size} dimensions; omit the field")
    items = [req.input] if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) \
        else list(req.input)
    if not items:
        raise bad("input", "is empty; send a string or a list of strings")
    inputs, total = [], 0
    for i, item in enumerate(items):
        ids = engine.tok(valid_text(f"input[{i}]", item))["input_ids"] if isinstance(item, str) else list(item)
        if not ids:
            raise bad(f"input[{i}]", "is empty; every input needs at least one token")
        if len(ids) > engine.context:
            raise bad(f"input[{i}]", f"has {len(ids)} tokens, over the model's context of {engine.context}")
        if min(ids) < 0 or max(ids) >= engine.vocab:
            raise bad(f"input[{i}]", f"token ids must lie in [0, {engine.vocab})")
        inputs.append(ids)
        total += len(ids)
        if total > max_tokens:
            raise bad("input", f"the first {i + 1} of {len(items)} inputs already have {total} tokens, over "
                               f"this server's limit of {max_tokens} tokens per embedding request; send the "
                               "inputs in several smaller requests")
    return inputs


async def embed(req: EmbeddingRequest, engine: Engine, adapter: str | None, request: Request,
                max_tokens: int = DEFAULT_MAX_EMBEDDING_TOKENS) -> dict | JSONResponse:
    """Embed a request's inputs on the worker and answer in OpenAI's shape (float lists or base64). A
    client that leaves stops the work: the worker drops the request before its next piece."""
    reply = Reply(asyncio.get_running_loop())
    inputs = await asyncio.to_thread(embedding_inputs, req, engine, max_tokens)
    engine.submit(EmbedJob(inputs, adapter, reply))
    event = await next_event(reply, request)
    if event is None:
        return JSONResponse({}, status_code=499)
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
