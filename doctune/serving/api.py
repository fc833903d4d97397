"""The FastAPI app: routes, API-key check, body limit, error handlers (every error in OpenAI's JSON
shape), and the refusal to serve beyond loopback without a key."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Model
from starlette.exceptions import HTTPException as StarletteHTTPException

from doctune.serving.engine import Engine
from doctune.serving.handlers import DEFAULT_MAX_EMBEDDING_TOKENS, chat_completion, chat_job, embed, sse
from doctune.serving.protocol import APIError, ChatRequest, EmbeddingRequest, bad

log = logging.getLogger(__name__)

KEY_ENV = "DOCTUNE_SERVE_API_KEY"
MIN_KEY_LENGTH = 16  # beyond loopback: a short key is guessed, a blank one cannot be sent
# After Ctrl+C / SIGTERM, how long uvicorn waits for open requests before cancelling them. The worker
# fails what it holds at once (`run_server`), so this bounds only what it does not hold, such as a
# stream its client stopped reading: the process no longer waits for them without end.
GRACEFUL_SHUTDOWN_S = 5


class BodyLimit:
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


def validation_message(error: dict) -> tuple[str, str]:
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
               prefix_cache_mb: float = 256, system_prompts: dict[str, str] | None = None,
               max_embedding_tokens: int = DEFAULT_MAX_EMBEDDING_TOKENS, embed_piece_tokens: int = 256,
               aliases: list[str] | None = None) -> FastAPI:
    """An OpenAI-compatible app over the model folder `model_path` (loaded now; the worker starts
    with the app), asked for by `served_name` and by each of `aliases`. `adapters` maps extra model names to
    LoRA adapter folders over that model;
    `system_prompts` maps a model name to the system message its requests get when they bring none.
    A request body over `max_body_mb` is refused with a 413, an embedding request of more than
    `max_embedding_tokens` tokens in all with a 400; embeddings run `embed_piece_tokens` at a time
    between decode steps. Up to `prefix_cache_mb` of prompt keys/values are kept for prompts that
    start alike (0: none)."""
    names = [served_name, *(aliases or [])]
    taken = next((n for n in names if n in (adapters or {})), None)
    if taken is not None:
        raise ValueError(f"adapters: {taken!r} is already a name of the served model; rename the adapter")
    if max_body_mb <= 0:
        raise ValueError(f"max_body_mb={max_body_mb}: must be positive")
    if max_embedding_tokens < 1:
        raise ValueError(f"max_embedding_tokens={max_embedding_tokens}: must be at least 1")
    engine = Engine(model_path, device=device, adapters=adapters, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                    prefix_cache_mb=prefix_cache_mb, embed_piece_tokens=embed_piece_tokens)
    for name, prompt in (system_prompts or {}).items():
        log.info("model %r: a request without a system message gets its training system prompt %r", name, prompt)
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
        param, message = validation_message(errors[0])
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return bad(param, f"{message}{more}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes and methods too: clients parse one error shape.
        if exc.status_code == 404:
            message = (f"{request.method} {request.url.path} is not a route of this server; it serves "
                       "/v1/models, /v1/chat/completions, /v1/embeddings and /health")
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=str(exc.status_code)).response()

    app.add_middleware(BodyLimit, limit=int(max_body_mb * 2**20))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key "
                                "this server was started with.", code="invalid_api_key")

    def adapter_for(name: str) -> str | None:
        if name in names:
            return None
        if name in engine.adapters:
            return name
        served = ", ".join([*names, *engine.adapters])
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
        data = [{**Model(id=name, object="model", created=created, owned_by="doctune").model_dump(),
                 "root": str(model_path), "parent": None} for name in names]
        data += [{**Model(id=name, object="model", created=created, owned_by="doctune").model_dump(),
                  "root": folder, "parent": served_name} for name, folder in engine.adapter_dirs.items()]
        return {"object": "list", "data": data}

    @v1.get("/stats")
    async def stats():
        return engine.snapshot()

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        adapter = adapter_for(req.model)
        job = await chat_job(req, engine, adapter, max_batch, (system_prompts or {}).get(req.model))
        engine.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, rid, now, req.model, include_usage), media_type="text/event-stream")
        return await chat_completion(job, rid, now, req.model, request)

    @v1.post("/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        return await embed(req, engine, adapter_for(req.model), request, max_embedding_tokens)

    app.include_router(v1)
    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(host: str, api_key: str | None, key_env: str = KEY_ENV) -> None:
    """Refuse (ValueError) to serve beyond loopback without a key: anyone who reaches the port
    could use the model and read every adapter's answers."""
    if is_loopback(host):
        return
    if api_key and (len(api_key.strip()) < MIN_KEY_LENGTH or api_key != api_key.strip()):
        raise ValueError(
            f"--host {host} is reachable beyond this machine and ${key_env} holds a key of {len(api_key)} characters"
            f"{' with spaces at its ends' if api_key != api_key.strip() else ''}: too easy to guess, or one no "
            f"client can send. Use at least {MIN_KEY_LENGTH} characters without surrounding spaces, e.g. "
            f"`export {key_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`.")
    if api_key:
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
    engine = app.state.engine

    class Server(uvicorn.Server):
        """uvicorn's server that also stops the worker at the first Ctrl+C / SIGTERM. uvicorn waits for
        open requests before the app's shutdown stops the worker, so a long embedding held the process
        for its whole length (SIGINT during a 4x8,192-token one: still running after 90 s here); stopped
        first, the worker answers every request it holds with "the server is shutting down" after its
        current step or piece, and those requests end at once (0.8 s here)."""

        def handle_exit(self, sig, frame) -> None:
            engine.stop(wait=False)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn.run's exit status when the server could not start (a port in use)
