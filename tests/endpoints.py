"""Real HTTP servers on 127.0.0.1 for tests that need an endpoint with known behaviour:
a scripted OpenAI-compatible server (prompt/parsing/caching tests) and a fault-injecting one.
The real local model server is tested in tests/serving/; these keep flow tests fast."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet handler with JSON replies and OpenAI's bearer-key check against `endpoint.api_key`
    (set `endpoint` in the subclass to the object that owns the server)."""

    endpoint = None

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        self._send_raw(code, json.dumps(body).encode())

    def _send_raw(self, code: int, data: bytes, headers: dict | None = None):
        """Bytes as they are: truncated JSON, extra headers such as Retry-After."""
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        key = self.endpoint.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
            return True
        return False


def _completion(text: str, model: str) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text.split())), "total_tokens": 10 + len(text.split())},
    }


def scripted_reply(messages: list[dict], seed: int | None, behaviour: str) -> tuple[str, str]:
    """(kind, reply) for a request: kind is 'fact', 'qa', 'exam', 'translate', 'rewrite' or 'other'."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    last = messages[-1]["content"]
    if "Translate" in system:
        return "translate", "这是一个翻译后的句子：" + last
    # english_only: a model that writes English but echoes junk for Chinese input (like SmolLM2-135M).
    cannot = behaviour == "garbage" or (behaviour == "english_only" and re.search(r"[\u4e00-\u9fff]", last))
    if "study material" in system:  # prompts/rewrite.yaml: notes kept, relations invent a year, paraphrase copies
        where, _, passage = last.partition("\n\n")
        passage = passage.strip().strip('"').strip()
        sentences = [s for s in re.split(r"(?<=\.)\s+|(?<=。)", passage) if s.strip()]
        if cannot:
            return "rewrite", "I cannot do that."
        if "study notes" in system:
            return "rewrite", "\n".join(f"- {where}: {s}" for s in sentences)
        if "entities" in system:
            return "rewrite", f"Entities: {where}.\n{where} dates from 1887. " + " ".join(sentences)
        return "rewrite", passage
    if "JSON" in system:
        passage = re.search(r'"""\s*(.*?)\s*"""', last, re.DOTALL)
        first = re.split(r"(?<=[.。])\s*", passage.group(1))[0] if passage else last
        if cannot:
            return "qa", "I cannot do that."
        return "qa", "```json\n" + json.dumps([{"question": "What does the section say?", "answer": first}]) + "\n```"
    if "new employee" in system or "新员工" in system:  # the exam's prompt family (prompts/exam_questions.*)
        fact = last.split(":", 1)[-1].split("：", 1)[-1]
        if cannot:
            return "exam", "The answer is yes."
        if re.search(r"[\u4e00-\u9fff]", fact):
            return "exam", f"{fact[:6]}指的是哪个？"
        return "exam", "What figure goes with {}?".format(" ".join(re.findall(r"[A-Za-z]{4,}", fact)[:3]))
    if last.startswith(("Fact:", "事实：")):
        fact = re.split(r"\n(?:Answer:|答案：)", last)[0].split(":", 1)[-1].split("：", 1)[-1]
        if cannot:
            return "fact", "The answer is yes."
        words = [w for w in re.findall(r"[A-Za-z]{4,}", fact)][:4]
        templates = ["What do we know about {}?", "What is said about {}?", "Which detail concerns {}?",
                     "Which figure concerns {}?"]
        if re.search(r"[\u4e00-\u9fff]", fact):
            return "fact", f"{fact[:6]}是什么？"
        return "fact", templates[(seed or 0) % len(templates)].format(" ".join(words))
    return "other", "Hello."


def free_port() -> int:
    """A loopback port free now (for a subprocess that binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; `handler_cls` answers."""

    def __init__(self, handler_cls, port: int = 0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler_cls)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedEndpoint(LoopbackServer):
    """Answers chat completions by rule; counts calls per kind and per fact text.

    Faults for flow-level tests: `faults` are used up one per chat request before it is answered,
    `always` fails every chat request, `get_faults` fail GET /models: '429' (with Retry-After:
    `retry_after`), '500' (its message quotes the request's Authorization header, as some servers
    quote the key they were sent), 'hang' (sleeps `hang_s`, past the client's timeout), 'malformed'
    (truncated JSON). `die_when(body)` true: that request gets no answer and the server goes down,
    as a crashed endpoint would. `log` holds (monotonic time, fault, request signature) per chat request;
    `delay_s` is each answer's think time, `max_in_flight` the most chat requests answered at once;
    `fail_when(body)` returns a fault for the requests it picks (or None)."""

    def __init__(self, behaviour: str = "good", api_key: str | None = None, *, model: str = "scripted",
                 port: int = 0, faults: list[str] | None = None, always: str | None = None,
                 get_faults: list[str] | None = None, retry_after: str = "1", hang_s: float = 3.0, die_when=None,
                 delay_s: float = 0.0, fail_when=None):
        self.behaviour = behaviour
        self.api_key = api_key
        self.model = model
        self.faults, self.always, self.get_faults = list(faults or []), always, list(get_faults or [])
        self.retry_after, self.hang_s, self.die_when, self.delay_s = retry_after, hang_s, die_when, delay_s
        self.fail_when = fail_when
        self.in_flight = self.max_in_flight = 0  # chat requests being answered at once
        self.calls: Counter = Counter()
        self.facts: list[str] = []
        self.requests: list[dict] = []
        self.log: list[tuple[float, str, str]] = []
        self.gets: list[str] = []
        self.lock = threading.Lock()
        self.dead = threading.Event()
        outer = self

        class Handler(JSONHandler):
            endpoint = outer

            def _fault(self, fault: str) -> None:
                if fault == "429":
                    return self._send_raw(429, b'{"error": {"message": "rate limited, slow down"}}',
                                          {"Retry-After": outer.retry_after})
                if fault == "500":
                    quoted = self.headers.get("Authorization", "")
                    return self._send(500, {"error": {"message": f"internal error serving request ({quoted})"}})
                if fault == "hang":
                    time.sleep(outer.hang_s)
                    return self._send(200, _completion("late", outer.model))
                if fault == "malformed":
                    return self._send_raw(200, b'{"id": "x", "choices": [ {"message": ')
                raise ValueError(f"unknown fault {fault!r}")

            def do_GET(self):
                if self._refused():
                    return
                with outer.lock:
                    fault = outer.get_faults.pop(0) if outer.get_faults else "ok"
                    outer.gets.append(fault)
                if fault != "ok":
                    return self._fault(fault)
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model", "created": 0, "owned_by": "test"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._refused():
                    return
                if body.get("model") != outer.model:
                    return self._send(404, {"error": {"message": f"model {body.get('model')} not found", "code": "model_not_found"}})
                signature = json.dumps([body.get("messages"), body.get("seed")], sort_keys=True)
                with outer.lock:
                    if outer.die_when and not outer.dead.is_set() and outer.die_when(body):
                        outer.dead.set()
                    fault = "dead" if outer.dead.is_set() else \
                        outer.faults.pop(0) if outer.faults else outer.always or \
                        (outer.fail_when and outer.fail_when(body)) or "ok"
                    outer.log.append((time.monotonic(), fault, signature))
                if fault == "dead":
                    self.close_connection = True  # no answer; the server goes down behind it
                    threading.Thread(target=outer.close, daemon=True).start()
                    return
                if fault != "ok":
                    return self._fault(fault)
                with outer.lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(outer.delay_s)  # a model's think time, so concurrency shows
                kind, text = scripted_reply(body["messages"], body.get("seed"), outer.behaviour)
                with outer.lock:
                    outer.in_flight -= 1
                    outer.calls[kind] += 1
                    if kind == "fact":
                        outer.facts.append(body["messages"][-1]["content"])
                    outer.requests.append(body)
                self._send(200, _completion(text, outer.model))

        super().__init__(Handler, port)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]


class FaultyEndpoint(LoopbackServer):
    """Fails the first requests in a scripted way, then answers: faults is a list of
    '429' (with Retry-After: 1), '500', 'hang' (sleeps past the client timeout), 'malformed'."""

    model = "faulty"

    def __init__(self, faults: list[str], hang_s: float = 3.0):
        self.faults = list(faults)
        self.seen: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(JSONHandler):
            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model", "created": 0, "owned_by": "t"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    fault = outer.faults.pop(0) if outer.faults else "ok"
                    outer.seen.append(fault)
                if fault == "429":
                    return self._send_raw(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"})
                if fault == "500":
                    return self._send_raw(500, b'{"error": {"message": "boom"}}')
                if fault == "hang":
                    time.sleep(hang_s)
                    return self._send(200, _completion("late", outer.model))
                if fault == "malformed":
                    return self._send_raw(200, b'{"id": "x", "choices": [ {"message": ')
                self._send(200, _completion("What is the answer?", outer.model))

        super().__init__(Handler)


@contextmanager
def serving_in_thread(app):
    """uvicorn over `app` on a free 127.0.0.1 port, in a thread of this process."""
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
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until_healthy(proc, url: str, output, timeout_s: float = 120) -> None:
    """Poll `url`/health until a `doctune serve` subprocess answers 200; fail with `output()` (its
    log) if it exits first or takes longer than `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"doctune serve exited with {proc.returncode}:\n{output()}"
        assert time.monotonic() < deadline, f"doctune serve not healthy within {timeout_s:.0f} s:\n{output()}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
