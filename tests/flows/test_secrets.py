"""A canary API key goes through build_dataset and doctune serve, including endpoints that quote the
key back in their errors; afterwards it is searched for in everything a person or a later run can
read: the logs, every artifact, the Prefect database, the result store, the dataset and output
folders, the captured output, the server's replies. Zero hits."""

import asyncio
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.settings import get_current_settings

from doctune.settings import BuildSettings, LLMSettings, SynthSettings
from flows.build_dataset import build_dataset
from tests.endpoints import ScriptedEndpoint
from tests.flows.test_build_dataset import write_docs

CANARY = f"sk-doctune-canary-{uuid.uuid4().hex}"


async def _artifacts_and_logs(flow_run_ids) -> list[str]:
    async with get_client() as client:
        runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
        artifacts = await client.read_artifacts(flow_run_filter=runs)
        logs, page = [], True
        while page:  # the server answers at most 200 at a time
            page = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)),
                                          limit=200, offset=len(logs))
            logs += page
        flow_runs = await client.read_flow_runs(flow_run_filter=runs)
    texts = [f"{a.key} {a.description} {a.data}" for a in artifacts] + [log.message for log in logs]
    texts += [f"{r.parameters} {r.state.message if r.state else ''}" for r in flow_runs]
    assert artifacts and logs
    return texts


def _files_under(*folders) -> list[Path]:
    return [p for folder in folders if folder and Path(folder).exists() for p in Path(folder).rglob("*") if p.is_file()]


def _hits(paths, needle: str) -> list[str]:
    return [str(p) for p in paths if needle.encode() in p.read_bytes()]


@pytest.mark.usefixtures("prefect_server")
def test_a_canary_key_leaves_no_trace_after_a_build(tmp_path, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CANARY_LLM_KEY", CANARY)
    folder = write_docs(tmp_path / "docs")
    fast = dict(api_key_env="CANARY_LLM_KEY", concurrency=2, max_retries=1, task_retries=1, retry_delays_s=[0.1])
    # handbook.md's 8 calls go first, each tried 2 x 2 times: all 32 fail with a 500 whose text quotes
    # the Authorization header, so its error reaches the failures artifact and the logs.
    server = ScriptedEndpoint(api_key=CANARY, model=f"m-{uuid.uuid4().hex[:8]}", faults=["500"] * 32)
    run_ids = []
    try:
        settings = BuildSettings(llm=LLMSettings(base_url=server.base_url, model=server.model, **fast),
                                 synth=SynthSettings(mode="fact", questions_per_fact=2, min_pairs=3),
                                 output_dir=str(tmp_path / "out"), documents_at_once=1)
        state = build_dataset(str(folder), settings, return_state=True)
        assert state.is_completed(), state.message
        run_ids.append(state.state_details.flow_run_id)
        # The preflight refused with the key quoted, no task retry: the traceback goes to the log.
        server.get_faults = ["500"] * 2
        failing = settings.model_copy(deep=True)
        failing.llm = failing.llm.model_copy(update={"task_retries": 0})
        failed = build_dataset(str(folder), failing, return_state=True)
        assert failed.is_failed()
        run_ids.append(failed.state_details.flow_run_id)
    finally:
        server.close()
    assert server.requests and sum(f == "500" for _, f, _ in server.log) == 32  # the key was used, and quoted

    texts = asyncio.run(_artifacts_and_logs(run_ids))
    assert any("[redacted]" in t for t in texts), "the quoted key never reached an artifact: the test proves nothing"
    assert [t for t in texts if CANARY in t] == []

    out, err = capfd.readouterr()
    assert CANARY not in out + err and CANARY not in caplog.text

    settings_now = get_current_settings()
    db = Path(settings_now.server.database.connection_url.get_secret_value().split("///", 1)[1])
    stores = [db.parent, settings_now.results.local_storage_path, tmp_path / "out", folder]
    files = _files_under(*stores)
    assert any(p.name.startswith(db.name) for p in files) and len(files) > 10
    assert _hits(files, CANARY) == []


def test_doctune_serve_never_echoes_or_logs_a_key(tiny_model, capfd, caplog):
    from doctune.serving import create_app
    from tests.endpoints import serving_in_thread

    caplog.set_level(logging.DEBUG)
    wrong = f"sk-doctune-wrong-{uuid.uuid4().hex}"
    app = create_app(tiny_model, served_name="tiny", api_key=CANARY, max_batch=4)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    replies = []
    with serving_in_thread(app) as srv:
        for key in (wrong, CANARY, f"{CANARY}x", CANARY[:-1]):
            for path, payload in (("/v1/chat/completions", body), ("/v1/embeddings", {"model": "tiny", "input": "x"}),
                                  ("/v1/models", None)):
                headers = {"Authorization": f"Bearer {key}"}
                resp = httpx.request("POST" if payload else "GET", srv.url + path, json=payload, headers=headers,
                                     timeout=60)
                replies.append((key == CANARY, resp.status_code, resp.text))
    assert {status for ok, status, _ in replies if ok} == {200}
    assert {status for ok, status, _ in replies if not ok} == {401}
    out, err = capfd.readouterr()
    for secret in (CANARY, wrong):
        assert secret not in out + err and secret not in caplog.text
        assert [text for _, _, text in replies if secret in text] == []
