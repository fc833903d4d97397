import time

import pytest

from doctune.llm import EndpointError, chat, make_client, preflight
from doctune.settings import LLMSettings
from tests.endpoints import FaultyEndpoint, JSONHandler, LoopbackServer, ScriptedEndpoint


def _llm(server, **kw) -> LLMSettings:
    return LLMSettings(base_url=server.base_url, model=server.model, **kw)


@pytest.fixture
def faulty(request):
    server = FaultyEndpoint(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("faulty", [["429", "500", "malformed"]], indirect=True)
def test_transient_faults_are_retried_with_backoff(faulty):
    llm = _llm(faulty, max_retries=4, timeout_s=5)
    result = chat(make_client(llm), llm, [{"role": "user", "content": "hi"}])
    assert result.text == "What is the answer?"
    assert faulty.seen == ["429", "500", "malformed", "ok"]  # Retry-After: tests/flows/test_faults.py


@pytest.mark.parametrize("faulty", [["hang", "hang", "hang"]], indirect=True)
def test_hanging_endpoint_is_bounded(faulty):
    llm = _llm(faulty, max_retries=1, timeout_s=0.5)
    with pytest.raises(EndpointError, match="no answer within 0.5 s"):
        chat(make_client(llm), llm, [{"role": "user", "content": "hi"}])
    assert len(faulty.seen) == 2  # first try + one retry, then it gives up


@pytest.mark.parametrize("faulty", [["malformed"] * 10], indirect=True)
def test_always_malformed_gives_up_after_max_retries(faulty):
    llm = _llm(faulty, max_retries=2)
    with pytest.raises(EndpointError, match="malformed after 3 attempts"):
        chat(make_client(llm), llm, [{"role": "user", "content": "hi"}])
    assert len(faulty.seen) == 3


def _preflight_error(llm: LLMSettings, timeout_s: float = 5) -> tuple[EndpointError, float]:
    start = time.monotonic()
    with pytest.raises(EndpointError) as err:
        preflight(llm, timeout_s=timeout_s)
    return err.value, time.monotonic() - start


def test_preflight_fails_in_seconds_with_the_real_cause_when_no_retry_can_help():
    refused, took = _preflight_error(LLMSettings(base_url="http://127.0.0.1:9/v1", model="m"))
    assert "connection refused: nothing listens on 127.0.0.1:9" in str(refused) and "doctune serve" in str(refused)
    assert not refused.transient and took < 30  # tried for a few seconds (a restart), not the task's retries
    unknown, _ = _preflight_error(LLMSettings(base_url="http://no-such-host.invalid/v1", model="m"))
    assert "the host 'no-such-host.invalid' is unknown" in str(unknown) and not unknown.transient
    plain = ScriptedEndpoint()
    try:  # https to a port that speaks plain HTTP
        tls, _ = _preflight_error(LLMSettings(base_url=plain.base_url.replace("http:", "https:"), model="m"))
    finally:
        plain.close()
    assert "speaks plain HTTP; write http://" in str(tls) and not tls.transient


def test_preflight_names_the_timeout_it_used(request):
    server = ScriptedEndpoint(get_faults=["hang"], hang_s=4)
    request.addfinalizer(server.close)
    err, took = _preflight_error(_llm(server, timeout_s=600), timeout_s=1)
    assert "no answer to GET /models within 1 s (the pre-flight's limit" in str(err) and err.transient
    assert took < 4


class _V1Only(JSONHandler):
    """A server whose OpenAI routes all live under /v1 (as vLLM's, Ollama's and ours do)."""

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                                  "owned_by": "test"}]})
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        self._send(404, {"detail": "Not Found"})


def test_a_base_url_without_v1_is_named_with_the_fix(request):
    server = LoopbackServer(_V1Only)
    request.addfinalizer(server.close)
    root = server.base_url.removesuffix("/v1")
    err, _ = _preflight_error(LLMSettings(base_url=root, model="m"))
    assert f"set llm.base_url to '{root}/v1'" in str(err) and not err.transient
    assert "serves m" in preflight(LLMSettings(base_url=root + "/v1", model="m"))


def test_preflight_unknown_model_lists_served_ones(scripted):
    with pytest.raises(EndpointError, match="does not serve model='nope'.*scripted"):
        preflight(LLMSettings(base_url=scripted.base_url, model="nope"))
    assert "serves scripted" in preflight(_llm(scripted))
    assert sum(scripted.calls.values()) == 0  # preflight lists models, it generates nothing


def test_api_key_comes_from_the_named_env_var(monkeypatch, scripted):
    from doctune.llm import resolve_api_key

    monkeypatch.setenv("MY_KEY", "sk-test-123")
    assert resolve_api_key(LLMSettings(api_key_env="MY_KEY")) == "sk-test-123"


def test_preflight_wrong_key_names_where_the_key_comes_from(monkeypatch):
    server = ScriptedEndpoint(api_key="sk-right")
    try:
        monkeypatch.setenv("SCRIPTED_KEY", "sk-wrong")
        llm = LLMSettings(base_url=server.base_url, model=server.model, api_key_env="SCRIPTED_KEY")
        with pytest.raises(EndpointError, match=r"refused \(401\). Put a valid key in \$SCRIPTED_KEY") as err:
            preflight(llm)
        assert not err.value.transient  # Prefect does not retry what a retry cannot fix
        monkeypatch.setenv("SCRIPTED_KEY", "sk-right")
        assert "serves scripted" in preflight(llm)
    finally:
        server.close()


@pytest.mark.parametrize("text, shown", [
    ("Incorrect API key provided: sk-proj-AbC123xyz789.", "Incorrect API key provided: [redacted]."),
    ("upstream said (Bearer abc.def-123)", "upstream said (Bearer [redacted])"),
    ('{"api_key": "s3cr3tvalue"}', '{"api_key": "[redacted]"}'),
    ("token=hf_abcdefghij", "token=[redacted]"),
    ("HTTP 500: boom in outputs/datasets/ds-1a2b3c4d", "HTTP 500: boom in outputs/datasets/ds-1a2b3c4d"),
])
def test_scrub_hides_key_shaped_text_and_keeps_the_message(text, shown):
    from doctune.llm import scrub

    assert scrub(text) == shown


def test_scrub_hides_the_configured_key_whatever_its_shape():
    from doctune.llm import scrub

    assert scrub("refused key plainwords42 for model m", ("plainwords42",)) == "refused key [redacted] for model m"
