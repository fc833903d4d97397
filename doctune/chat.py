"""`doctune chat`: a terminal chat with `doctune serve` or any OpenAI-compatible endpoint.

`Chat` holds the conversation, runs the slash commands and writes each answer to a text writer
as it streams, so tests drive it without a terminal. `run` only feeds it lines: from
prompt_toolkit when stdin and stdout are a terminal (tmux included), from plain stdin lines
otherwise, so a pipe or a script gets one answer per line and the end of input ends the chat.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import os
import sys
from typing import Iterator, TextIO
from urllib.parse import urlparse

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8765/v1"
DEFAULT_KEY_ENV = "DOCTUNE_SERVE_API_KEY"
# A dead endpoint should say so at once; a busy CPU server may think for minutes before its first token.
TIMEOUT = openai.Timeout(300.0, connect=5.0)
# A stream that breaks mid-answer raises the HTTP library's own error, not an OpenAIError. Newer
# openai releases run on httpx2 (and refuse an httpx.Timeout), older ones on httpx: catch either.
TRANSPORT_ERRORS = tuple(importlib.import_module(name).HTTPError for name in ("httpx", "httpx2")
                        if importlib.util.find_spec(name))

HELP = """\
Type a question and press Enter; the whole conversation is sent with each question.
  /reset         forget the conversation (the --system prompt stays)
  /retry         ask the last failed question again
  /model [NAME]  show the served models, or switch to NAME
  /help          this text
  /exit          quit (also /quit, Ctrl-D, or the end of piped input)
Ctrl-C stops an answer mid-way."""


class ChatError(Exception):
    """The chat cannot go on as asked; the message says why and what to do."""


def is_loopback(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _server_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and body.get("message"):
        return _one_line(body["message"])
    return _one_line(exc.message)


class Chat:
    """One conversation with one endpoint. `handle(line)` returns False when the chat should end;
    a failed turn writes one line to `err`, leaves the history as it was and the chat goes on."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, model: str | None = None, *,
                 api_key_env: str = DEFAULT_KEY_ENV, system: str | None = None,
                 temperature: float | None = None, max_tokens: int | None = None,
                 out: TextIO | None = None, err: TextIO | None = None):
        key = os.environ.get(api_key_env)
        if not key and not is_loopback(base_url):
            raise ChatError(f"--api-key-env: ${api_key_env} is not set; export it with the key for {base_url} "
                            "(any value will do for a server that checks none)")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        # The client insists on a key; doctune serve without --api-key-env accepts any.
        # No retries: the person at the keyboard sees the error now and can /retry.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key or "no-key", max_retries=0, timeout=TIMEOUT)
        self.model = model
        self.system = system
        self.params = {k: v for k, v in {"temperature": temperature, "max_tokens": max_tokens}.items() if v is not None}
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.history: list[dict] = []
        self.last_failed: str | None = None
        self.failures = 0

    def served_models(self) -> list[str]:
        return [m.id for m in self.client.models.list()]

    def pick_model(self, served: list[str] | None = None) -> str:
        """The model asked for, else `promoted` when served, else the first one listed."""
        if self.model is None:
            served = self.served_models() if served is None else served
            if not served:
                raise ChatError(f"{self.base_url}/models lists no model; pass MODEL (or /model NAME)")
            self.model = "promoted" if "promoted" in served else served[0]
        return self.model

    def connect(self) -> str:
        """A greeting line once the endpoint answers and serves the model; raises what a turn would."""
        served = self.served_models()
        model = self.pick_model(served)
        if model not in served:
            raise ChatError(self._unknown_model(model, served))
        return f"{model} at {self.base_url}: /help lists the commands, /exit or Ctrl-D quits"

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def _unknown_model(self, model: str, served: list[str] | None) -> str:
        serves = f"it serves: {', '.join(served)}" if served else "it lists no models"
        return f"{self.base_url} does not serve the model {model!r}; {serves}. Switch with /model NAME or pass MODEL"

    def explain(self, exc: Exception, mid_answer: bool = False) -> str:
        """One line naming the endpoint, what went wrong and the fix; `mid_answer`: the answer had
        begun to stream (so the endpoint was reached)."""
        url = self.base_url
        if isinstance(exc, ChatError):
            return str(exc)
        if isinstance(exc, openai.APITimeoutError):
            return f"{url} sent no answer within {TIMEOUT.read:.0f} s; is the server overloaded? /retry asks again"
        # The HTTP library raises its own error only while a stream is read; openai wraps the rest.
        if isinstance(exc, TRANSPORT_ERRORS) or (mid_answer and isinstance(exc, openai.APIConnectionError)):
            why = _one_line(exc.__cause__ or exc) or type(exc).__name__
            return f"the connection to {url} broke mid-answer ({why}); /retry asks again"
        if isinstance(exc, openai.APIConnectionError):
            cause = _one_line(exc.__cause__ or exc)
            hint = "start it with `doctune serve`" if is_loopback(url) else "is the server up?"
            return f"cannot reach {url} ({cause}); {hint} or pass --base-url, then /retry"
        if isinstance(exc, openai.AuthenticationError):
            return (f"{url} refused the API key (401): set ${self.api_key_env} to the key the server was started "
                    "with (`doctune serve --api-key-env` names it)")
        if isinstance(exc, openai.NotFoundError):
            message = _server_message(exc)
            if exc.code == "model_not_found" or "model" in message.lower():
                try:
                    served = self.served_models()
                except openai.OpenAIError:
                    served = None
                return self._unknown_model(self.model, served)
            return f"{url}/chat/completions: not found (404: {message}); is --base-url right? It usually ends in /v1"
        if isinstance(exc, openai.APIStatusError):
            # A 400 deep into a conversation is most often the context overflowing.
            hint = "; /reset starts a shorter conversation" if exc.status_code == 400 and self.history else ""
            return f"{url} answered HTTP {exc.status_code}: {_server_message(exc)}{hint}"
        if isinstance(exc, openai.APIError):  # an error event in the middle of a stream
            return f"{url} failed mid-answer: {_server_message(exc)}; /retry asks again"
        return f"{url}: {type(exc).__name__}: {_one_line(exc)}"

    def _pieces(self, stream: openai.Stream) -> Iterator[tuple[str, str | None]]:
        """(text, finish_reason) as the endpoint sends them."""
        if stream.response.headers.get("content-type", "").startswith("application/json"):
            # Some endpoints ignore stream=True and send one completion, which the SSE parser
            # would read as an empty answer.
            stream.response.read()
            try:
                choice = stream.response.json()["choices"][0]
                yield choice["message"]["content"] or "", choice.get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ChatError(f"{self.base_url} sent a reply that is not a chat completion "
                                f"({type(exc).__name__}: {_one_line(exc)}); is --base-url an OpenAI-compatible API?")
            return
        for chunk in stream:
            if chunk.choices:
                yield chunk.choices[0].delta.content or "", chunk.choices[0].finish_reason

    def ask(self, question: str) -> bool:
        """Stream the answer to `out`; True when it arrived (whole, or as far as Ctrl-C let it)."""
        parts: list[str] = []
        finish = None
        streaming = False
        try:
            model = self.pick_model()
            messages = self.messages() + [{"role": "user", "content": question}]
            with self.client.chat.completions.create(model=model, messages=messages, stream=True,
                                                     **self.params) as stream:
                streaming = True
                for text, reason in self._pieces(stream):
                    finish = reason or finish
                    if text:
                        parts.append(text)
                        self.out.write(text)
                        self.out.flush()
        except KeyboardInterrupt:
            finish = "interrupted"  # leaving the `with` closed the stream: the server stops generating
        except (openai.OpenAIError, ChatError, *TRANSPORT_ERRORS) as exc:
            if parts:
                self.out.write("\n")
            self.out.flush()
            self.note(f"error: {self.explain(exc, mid_answer=streaming)}")
            self.last_failed = question
            self.failures += 1
            return False
        if parts or finish != "interrupted":
            self.out.write("\n")
            self.out.flush()
            # What was shown is what the model said, stopped or not: it stays in the history.
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(parts)}]
        if finish == "length":
            self.note("(cut at the token limit: raise --max-tokens for longer answers)")
        elif finish == "interrupted":
            self.note("(stopped)")
        self.last_failed = None
        return True

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def _switch_model(self, name: str) -> None:
        try:
            served = self.served_models()
        except openai.OpenAIError as exc:
            return self.note(f"error: {self.explain(exc)}")
        if not name:
            listed = ", ".join(f"{m} (current)" if m == self.model else m for m in served)
            return self.note(f"{self.base_url} serves: {listed or 'no models'}")
        if name not in served:
            return self.note(f"error: {self._unknown_model(name, served)}")
        self.model = name
        self.note(f"now asking {name}; the conversation so far is kept (/reset forgets it)")

    def handle(self, line: str) -> bool:
        """One line of input: a slash command or a question. False means quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, arg = line[1:].partition(" ")
        if command in ("exit", "quit"):
            return False
        if command == "help":
            self.out.write(HELP + "\n")
            self.out.flush()
        elif command == "reset":
            self.history.clear()
            self.note("conversation forgotten")
        elif command == "retry":
            if self.last_failed is None:
                self.note("nothing to retry: the last question was answered")
            else:
                self.ask(self.last_failed)
        elif command == "model":
            self._switch_model(arg.strip())
        else:
            self.note(f"unknown command /{command}; /help lists the commands")
        return True


def _terminal_lines() -> Iterator[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    # In memory only: questions about private documents stay out of files in $HOME.
    session = PromptSession(history=InMemoryHistory())
    while True:
        try:
            yield session.prompt("> ")
        except KeyboardInterrupt:
            continue  # like a shell: Ctrl-C drops the line being typed
        except EOFError:
            return


def run(chat: Chat, stdin: TextIO | None = None) -> int:
    """Read lines until /exit or the end of input; the exit status. Piped input exits 1 when
    any question went unanswered, so a script notices."""
    stdin = stdin or sys.stdin
    terminal = stdin.isatty() and chat.out.isatty()
    if terminal:
        try:
            chat.note(chat.connect())
        except (openai.OpenAIError, ChatError) as exc:
            chat.note(f"error: {chat.explain(exc)}")
        lines = _terminal_lines()
    else:
        lines = (line.rstrip("\n") for line in stdin)
    try:
        for line in lines:
            if not chat.handle(line):
                break
    except KeyboardInterrupt:
        return 130
    return 1 if chat.failures and not terminal else 0
