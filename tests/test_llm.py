import time

import pytest

from doctune.llm import EndpointError, chat, make_client, preflight
from doctune.settings import LLMSettings
from tests.endpoints import FaultyEndpoint, ScriptedEndpoint


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
    t0 = time.monotonic()
    result = chat(make_client(llm), llm, [{"role": "user", "content": "hi"}])
    assert result.text == "What is the answer?"
    assert faulty.seen == ["429", "500", "malformed", "ok"]
    assert time.monotonic() - t0 >= 1.0  # the 429's Retry-After: 1 was honoured


@pytest.mark.parametrize("faulty", [["hang", "hang", "hang"]], indirect=True)
def test_hanging_endpoint_is_bounded(faulty):
    llm = _llm(faulty, max_retries=1, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="no answer within 0.5 s"):
        chat(make_client(llm), llm, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10
    assert len(faulty.seen) == 2  # first try + one retry, then it gives up


@pytest.mark.parametrize("faulty", [["malformed"] * 10], indirect=True)
def test_always_malformed_gives_up_after_max_retries(faulty):
    llm = _llm(faulty, max_retries=2)
    with pytest.raises(EndpointError, match="malformed after 3 attempts"):
        chat(make_client(llm), llm, [{"role": "user", "content": "hi"}])
    assert len(faulty.seen) == 3


def test_preflight_names_base_url_and_fix_when_unreachable():
    llm = LLMSettings(base_url="http://127.0.0.1:9/v1", model="m")
    t0 = time.monotonic()
    with pytest.raises(EndpointError) as err:
        preflight(llm, timeout_s=2)
    assert "base_url='http://127.0.0.1:9/v1'" in str(err.value) and "doctune serve" in str(err.value)
    assert time.monotonic() - t0 < 15


def test_preflight_unknown_model_lists_served_ones(scripted):
    with pytest.raises(EndpointError, match="does not serve model='nope'.*scripted"):
        preflight(LLMSettings(base_url=scripted.base_url, model="nope"))
    assert "serves scripted" in preflight(_llm(scripted))
    assert sum(scripted.calls.values()) == 0  # preflight lists models, it generates nothing


def test_api_key_comes_from_the_named_env_var(monkeypatch, scripted):
    from doctune.llm import resolve_api_key

    monkeypatch.setenv("MY_KEY", "sk-test-123")
    assert resolve_api_key(LLMSettings(api_key_env="MY_KEY")) == "sk-test-123"
    assert "sk-test" not in LLMSettings(api_key_env="MY_KEY").model_dump_json()


def test_preflight_wrong_key_names_where_the_key_comes_from(monkeypatch):
    server = ScriptedEndpoint(api_key="sk-right")
    try:
        monkeypatch.setenv("SCRIPTED_KEY", "sk-wrong")
        llm = LLMSettings(base_url=server.base_url, model=server.model, api_key_env="SCRIPTED_KEY")
        with pytest.raises(EndpointError, match=r"refused \(401\). Put a valid key in \$SCRIPTED_KEY"):
            preflight(llm)
        monkeypatch.setenv("SCRIPTED_KEY", "sk-right")
        assert "serves scripted" in preflight(llm)
    finally:
        server.close()
