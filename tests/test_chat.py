"""`doctune chat` against real servers on 127.0.0.1: a scripted streaming endpoint (known answers,
recorded requests), the scripted non-streaming one from tests/endpoints.py, our own server over the
tiny model, and the CLI itself as a subprocess, piped and inside tmux."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from doctune.chat import Chat, run
from tests.endpoints import JSONHandler, LoopbackServer, free_port, serving_in_thread

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "doctune.cli", "chat"]


def answer_pieces(messages: list[dict]) -> list[str]:
    """The scripted answer, in the chunks it is streamed in: it says which turn it is and echoes it."""
    turn = sum(m["role"] == "user" for m in messages)
    return [f"Answer {turn}", " to", f" <{messages[-1]['content']}>", "."]


def answer(messages: list[dict]) -> str:
    return "".join(answer_pieces(messages))


class StreamingEndpoint(LoopbackServer):
    """Streams `answer_pieces` as server-sent events and records every chat request.
    `gate`: after the first chunk, wait for this event before sending the rest (proves the client
    wrote the first chunk before the answer was complete). `fail_mid_stream`: an error event
    after the first chunk, once. `drop_mid_stream`: a chunked body cut off after the first chunk,
    once, as when the server dies (the client's HTTP library raises, not openai)."""

    def __init__(self, models=("scripted",), port: int = 0, api_key: str | None = None):
        self.models = list(models)
        self.api_key = api_key
        self.requests: list[dict] = []
        self.gate: threading.Event | None = None
        self.gate_opened: bool | None = None
        self.fail_mid_stream = False
        self.drop_mid_stream = False
        outer = self

        class Handler(JSONHandler):
            endpoint = outer

            def _event(self, body: dict | str):
                self.wfile.write(f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode())
                self.wfile.flush()

            def do_GET(self):
                if self._refused():
                    return
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                             "owned_by": "test"} for m in outer.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._refused():
                    return
                if body["model"] not in outer.models:
                    return self._send(404, {"error": {"message": f"The model {body['model']!r} does not exist",
                                                      "code": "model_not_found"}})
                outer.requests.append(body)

                def chunk(delta: dict, finish: str | None = None) -> dict:
                    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

                if outer.drop_mid_stream:
                    outer.drop_mid_stream = False
                    self.protocol_version = "HTTP/1.1"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    event = f"data: {json.dumps(chunk({'content': 'Answer'}))}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event) + b"400\r\npartial")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes

                self._event(chunk({"role": "assistant", "content": ""}))
                for i, piece in enumerate(answer_pieces(body["messages"])):
                    self._event(chunk({"content": piece}))
                    if i == 0 and outer.fail_mid_stream:
                        outer.fail_mid_stream = False
                        return self._event({"error": {"message": "the model worker died", "type": "server_error"}})
                    if i == 0 and outer.gate is not None:
                        outer.gate_opened = outer.gate.wait(10)
                self._event(chunk({}, "stop"))
                self._event("[DONE]")

        super().__init__(Handler, port)


class Recorder(io.StringIO):
    """A writer that keeps each write apart; `on_write` runs after each one."""

    def __init__(self, on_write=None):
        super().__init__()
        self.writes: list[str] = []
        self.on_write = on_write

    def write(self, text: str) -> int:
        self.writes.append(text)
        if self.on_write:
            self.on_write(text)
        return super().write(text)


@pytest.fixture
def endpoint():
    server = StreamingEndpoint()
    yield server
    server.close()


def make_chat(base_url: str, **kw) -> Chat:
    return Chat(base_url, out=Recorder(), err=io.StringIO(), **kw)


def test_history_is_sent_with_each_turn(endpoint):
    chat = make_chat(endpoint.base_url, system="Be brief.", temperature=0.2, max_tokens=50)
    assert chat.handle("What is A?") and chat.handle("And B?")
    first, second = endpoint.requests
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is A?"}]
    assert second["messages"] == first["messages"] + [
        {"role": "assistant", "content": "Answer 1 to <What is A?>."}, {"role": "user", "content": "And B?"}]
    assert (second["stream"], second["temperature"], second["max_tokens"]) == (True, 0.2, 50)
    assert chat.out.getvalue() == "Answer 1 to <What is A?>.\nAnswer 2 to <And B?>.\n"
    assert chat.err.getvalue() == ""


def test_chunks_are_written_in_order_as_they_arrive(endpoint):
    endpoint.gate = threading.Event()
    out = Recorder(on_write=lambda text: endpoint.gate.set())
    chat = Chat(endpoint.base_url, out=out, err=io.StringIO())
    assert chat.ask("Q")
    # The server held back the rest of the answer until the first chunk was written.
    assert endpoint.gate_opened is True
    assert out.writes == ["Answer 1", " to", " <Q>", ".", "\n"]


def test_reset_forgets_the_conversation_but_not_the_system_prompt(endpoint):
    chat = make_chat(endpoint.base_url, system="S")
    chat.handle("one")
    chat.handle("two")
    assert len(chat.history) == 4
    chat.handle("/reset")
    assert chat.history == []
    chat.handle("three")
    assert endpoint.requests[-1]["messages"] == [{"role": "system", "content": "S"},
                                                 {"role": "user", "content": "three"}]
    assert chat.out.getvalue().endswith("Answer 1 to <three>.\n")


def test_exit_quit_and_end_of_input_end_the_chat(endpoint):
    chat = make_chat(endpoint.base_url)
    assert run(chat, io.StringIO("first\n/exit\nnever asked\n")) == 0
    assert [r["messages"][-1]["content"] for r in endpoint.requests] == ["first"]
    assert make_chat(endpoint.base_url).handle("/quit") is False
    chat = make_chat(endpoint.base_url)
    assert run(chat, io.StringIO("second\n\n/help\nthird")) == 0  # no newline at the end: still asked
    assert [r["messages"][-1]["content"] for r in endpoint.requests] == ["first", "second", "third"]
    assert "/reset" in chat.out.getvalue() and len(chat.history) == 4


def test_default_model_is_promoted_when_served_else_the_first():
    for models, expected in [(["smollm2-135m-instruct", "promoted"], "promoted"), (["a", "b"], "a")]:
        server = StreamingEndpoint(models=models)
        try:
            chat = make_chat(server.base_url)
            assert chat.connect().startswith(f"{expected} at {server.base_url}")
            chat.handle("hi")
            assert server.requests[0]["model"] == expected
        finally:
            server.close()


def test_unknown_model_names_the_served_ones_and_the_chat_goes_on(endpoint):
    chat = make_chat(endpoint.base_url, model="nope")
    with pytest.raises(Exception, match="does not serve the model 'nope'; it serves: scripted"):
        chat.connect()
    assert chat.handle("hi") is True
    assert chat.err.getvalue().strip() == (f"error: {endpoint.base_url} does not serve the model 'nope'; it serves: "
                                           "scripted. Switch with /model NAME or pass MODEL")
    chat.handle("/model also-nope")
    assert chat.model == "nope"
    chat.handle("/model scripted")
    chat.handle("/retry")
    assert [r["messages"] for r in endpoint.requests] == [[{"role": "user", "content": "hi"}]]
    assert chat.out.getvalue() == "Answer 1 to <hi>.\n"


def test_unreachable_endpoint_then_it_comes_back():
    port = free_port()
    chat = make_chat(f"http://127.0.0.1:{port}/v1", model="scripted")
    assert chat.ask("first") is False
    error = chat.err.getvalue().strip()
    assert error.startswith(f"error: cannot reach http://127.0.0.1:{port}/v1 (")
    assert "start it with `doctune serve`" in error and "\n" not in error
    assert chat.history == [] and chat.out.getvalue() == ""
    server = StreamingEndpoint(port=port)
    try:
        chat.handle("/retry")
        chat.handle("second")
        assert [r["messages"][-1]["content"] for r in server.requests] == ["first", "second"]
        assert len(server.requests[0]["messages"]) == 1 and len(server.requests[1]["messages"]) == 3
        assert chat.out.getvalue() == "Answer 1 to <first>.\nAnswer 2 to <second>.\n"
    finally:
        server.close()


def test_unreachable_endpoint_without_a_model_recovers_too():
    port = free_port()
    chat = make_chat(f"http://127.0.0.1:{port}/v1")
    chat.handle("hi")
    assert "cannot reach" in chat.err.getvalue() and chat.model is None
    server = StreamingEndpoint(models=["m1"], port=port)
    try:
        chat.handle("hi")
        assert chat.model == "m1" and chat.out.getvalue() == "Answer 1 to <hi>.\n"
    finally:
        server.close()


def test_error_mid_answer_leaves_the_history_as_it_was(endpoint):
    chat = make_chat(endpoint.base_url)
    chat.handle("one")
    endpoint.fail_mid_stream = True
    assert chat.ask("two") is False
    assert "failed mid-answer: the model worker died" in chat.err.getvalue()
    assert len(chat.history) == 2
    chat.handle("three")
    assert [m["content"] for m in endpoint.requests[-1]["messages"]] == ["one", "Answer 1 to <one>.", "three"]
    assert chat.out.getvalue() == "Answer 1 to <one>.\nAnswer 2\nAnswer 2 to <three>.\n"


def test_a_connection_dropped_mid_answer_is_explained_and_retried(endpoint):
    chat = make_chat(endpoint.base_url)
    endpoint.drop_mid_stream = True
    assert chat.ask("one") is False
    error = chat.err.getvalue().strip()
    assert error.startswith(f"error: the connection to {endpoint.base_url} broke mid-answer (")
    assert error.endswith("/retry asks again") and chat.history == []
    chat.handle("/retry")
    assert chat.history[-1]["content"] == "Answer 1 to <one>."
    assert chat.out.getvalue() == "Answer\nAnswer 1 to <one>.\n"


def test_refused_key_names_the_env_var(monkeypatch):
    server = StreamingEndpoint(api_key="right")
    try:
        monkeypatch.setenv("CHAT_TEST_KEY", "wrong")
        chat = make_chat(server.base_url, model="scripted", api_key_env="CHAT_TEST_KEY")
        chat.handle("hi")
        assert "refused the API key (401): set $CHAT_TEST_KEY" in chat.err.getvalue()
        monkeypatch.setenv("CHAT_TEST_KEY", "right")
        chat = make_chat(server.base_url, api_key_env="CHAT_TEST_KEY")
        assert chat.ask("hi") and server.requests
    finally:
        server.close()


def test_remote_endpoint_needs_the_key_env_set(monkeypatch):
    monkeypatch.delenv("CHAT_TEST_KEY", raising=False)
    with pytest.raises(Exception, match=r"--api-key-env: \$CHAT_TEST_KEY is not set"):
        make_chat("https://api.example.com/v1", api_key_env="CHAT_TEST_KEY")


def test_endpoint_that_ignores_stream_still_answers(scripted):
    chat = make_chat(scripted.base_url)
    chat.handle("hi")
    assert chat.out.getvalue() == "Hello.\n" and chat.err.getvalue() == ""
    assert scripted.requests[0]["stream"] is True


def test_against_our_own_server(tiny_model):
    """Our server's SSE, read by the chat, gives the same greedy answer as a non-streamed request."""
    import openai

    from doctune.serving import create_app

    with serving_in_thread(create_app(tiny_model, served_name="tiny")) as srv:
        base_url = f"{srv.url}/v1"
        chat = make_chat(base_url, temperature=0, max_tokens=6)
        assert chat.ask("Hello") and chat.ask("Again")
        assert chat.model == "tiny" and len(chat.history) == 4
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        replay = client.chat.completions.create(model="tiny", messages=chat.history[:3], temperature=0, max_tokens=6)
        assert chat.history[3]["content"] == replay.choices[0].message.content
        assert chat.out.getvalue() == chat.history[1]["content"] + "\n" + chat.history[3]["content"] + "\n"
        assert len(chat.out.writes) > 2  # streamed in pieces, not in one write per answer
        assert "cut at the token limit" in chat.err.getvalue()  # 6 tokens of a random model: finish_reason=length


def test_cli_answers_piped_questions_and_exits_0(endpoint):
    proc = subprocess.run([*CLI, "--base-url", endpoint.base_url, "--system", "Be brief."], cwd=ROOT,
                          input="What is A?\nAnd B?\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Answer 1 to <What is A?>.\nAnswer 2 to <And B?>.\n"
    assert [len(r["messages"]) for r in endpoint.requests] == [2, 4]


def test_cli_piped_into_a_dead_endpoint_exits_1():
    port = free_port()
    proc = subprocess.run([*CLI, "m", "--base-url", f"http://127.0.0.1:{port}/v1"], cwd=ROOT,
                          input="hi\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: cannot reach http://127.0.0.1:{port}/v1")


def _wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_in_tmux(endpoint, tmp_path):
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    # A private tmux server: it inherits this environment, and other tmux users are left alone.
    base = [tmux, "-S", str(tmp_path / "tmux.sock")]
    status = tmp_path / "status"
    command = f"{' '.join(CLI)} --base-url {endpoint.base_url}; echo $? > {status}"

    def pane() -> str:
        return subprocess.run([*base, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout

    def alive() -> bool:
        return subprocess.run([*base, "has-session", "-t", "chat"], capture_output=True).returncode == 0

    subprocess.run([*base, "new-session", "-d", "-s", "chat", "-x", "120", "-y", "30", "-c", str(ROOT), command],
                   check=True)
    try:
        _wait_for(lambda: "/help lists the commands" in pane(), "the greeting")
        subprocess.run([*base, "send-keys", "-t", "chat", "What is tmux?", "Enter"], check=True)
        _wait_for(lambda: "Answer 1 to <What is tmux?>." in pane(), "the answer")
        subprocess.run([*base, "send-keys", "-t", "chat", "/exit", "Enter"], check=True)
        _wait_for(lambda: not alive(), "the session to end", timeout=30)
        assert status.read_text().strip() == "0"
        assert [r["messages"] for r in endpoint.requests] == [[{"role": "user", "content": "What is tmux?"}]]
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True)
