"""build_dataset while the endpoint fails: every call 500, 429 with Retry-After, hangs, malformed
replies, an endpoint that dies mid-run. Retry delays are set to fractions of a second so the real
Prefect retries run in seconds; what is asserted are counts and states, not durations."""

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from datasets import load_from_disk
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from doctune.llm import EndpointError
from doctune.settings import BuildSettings, LLMSettings, SynthSettings, TranslateSettings
from flows.build_dataset import build_dataset
from tests.endpoints import ScriptedEndpoint
from tests.flows.test_build_dataset import latest_table, task_states, write_docs

pytestmark = pytest.mark.usefixtures("prefect_server")

# One retry of each call by the client, one Prefect retry of each task, both quick.
FAST = dict(concurrency=2, max_retries=1, timeout_s=2.0, task_retries=1, retry_delays_s=[0.2], retry_jitter=0.5)


def endpoint(**kw) -> ScriptedEndpoint:
    # A model name of its own: no other test's cached results can answer for this endpoint.
    return ScriptedEndpoint(model=kw.pop("model", None) or f"m-{uuid.uuid4().hex[:8]}", **kw)


def settings_for(server, out, **llm) -> BuildSettings:
    return BuildSettings(
        llm=LLMSettings(base_url=server.base_url, model=server.model, **{**FAST, **llm}),
        synth=SynthSettings(mode="fact", questions_per_fact=2, min_pairs=3, min_questions_per_fact=0),
        output_dir=str(out), documents_at_once=1,  # one after another: which document a fault hits is known
    )


def pairs_of(path) -> list[tuple]:
    ds = load_from_disk(f"{path}/hf")
    return sorted((r["question"], r["answer"], r["source"], r["path"] or "") for split in ds.values() for r in split)


async def task_runs(flow_run_id) -> list:
    await task_states(flow_run_id)  # every task run in its final state first
    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


async def state_history(task_run_id) -> list:
    async with get_client() as client:
        return sorted(await client.read_task_run_states(task_run_id), key=lambda s: s.timestamp)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same folder through a healthy endpoint: its pairs and the calls it took."""
    tmp = tmp_path_factory.mktemp("reference")
    server = endpoint()
    try:
        path = build_dataset(str(write_docs(tmp / "docs")), settings_for(server, tmp / "out"))
        handbook = [s for _, _, s in server.log if "Brekke" in s and "new employee" not in s]  # its synthesis
        return {"pairs": pairs_of(path), "calls": len(server.log), "handbook_calls": len(handbook)}
    finally:
        server.close()


def test_every_call_failing_stops_with_the_endpoint_named_after_real_retries(tmp_path):
    server = endpoint(always="500")
    settings = settings_for(server, tmp_path / "out", task_retries=2, retry_delays_s=[0.3, 0.6])
    try:
        state = build_dataset(str(write_docs(tmp_path / "docs")), settings, return_state=True)
    finally:
        server.close()
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    message = str(error)
    assert isinstance(error, EndpointError), message
    assert "synthesis failed for all 3 documents" in message and f"base_url='{server.base_url}'" in message
    assert "HTTP 500" in message and "not the problem" in message and "re-run" in message
    assert "add documents" not in message

    failures = asyncio.run(latest_table("failures"))
    assert sorted(row["document"] for row in failures) == ["faq.csv", "handbook.md", "products.md"]
    assert all("HTTP 500" in row["error"] for row in failures)

    # Every request went out (client retries + 1) x (task retries + 1) times: both retry layers ran.
    per_request = {}
    for _, fault, signature in server.log:
        per_request[signature] = per_request.get(signature, 0) + 1
    assert per_request and set(per_request.values()) == {(1 + 1) * (2 + 1)}

    runs = [r for r in asyncio.run(task_runs(state.state_details.flow_run_id)) if r.name.startswith("synthesize ")]
    assert len(runs) == 3 and {r.run_count for r in runs} == {3}
    delays = []
    for run in runs:
        waits = [s for s in asyncio.run(state_history(run.id)) if s.name == "AwaitingRetry"]
        assert len(waits) == 2, [s.name for s in asyncio.run(state_history(run.id))]
        for nominal, s in zip([0.3, 0.6], waits):
            delay = (s.state_details.scheduled_time - s.timestamp).total_seconds()
            assert 0 <= delay <= nominal * 1.5 + 0.05, (nominal, delay)  # retry_jitter 0.5 bounds it
            delays.append((nominal, delay))
    assert any(abs(delay - nominal) > 0.005 for nominal, delay in delays), delays  # jittered, not fixed


def test_429_retry_after_is_waited_for_and_nothing_is_lost(tmp_path, reference):
    server = endpoint(faults=["429"], retry_after="3")
    try:
        path = build_dataset(str(write_docs(tmp_path / "docs")), settings_for(server, tmp_path / "out"))
    finally:
        server.close()
    (t_429, fault, signature), *rest = server.log
    assert fault == "429"
    t_again = next(t for t, _, s in rest if s == signature)
    assert t_again - t_429 >= 2.9  # Retry-After: 3, not the client's own sub-second backoff
    assert pairs_of(path) == reference["pairs"]
    assert asyncio.run(latest_table("failures"))[0]["error"] == "no failures"


@pytest.mark.parametrize("faults", [["hang", "hang"], ["malformed"] * 3, ["500", "429", "malformed"]],
                         ids=["hang past the timeout", "malformed JSON", "mixed"])
def test_transient_faults_are_retried_and_the_dataset_is_as_without_them(tmp_path, reference, faults):
    server = endpoint(faults=faults, retry_after="0", hang_s=4.0)
    try:
        path = build_dataset(str(write_docs(tmp_path / "docs")), settings_for(server, tmp_path / "out", max_retries=3,
                                                                              timeout_s=1.0))
    finally:
        server.close()
    failed = [s for _, fault, s in server.log if fault != "ok"]
    assert len(failed) == len(faults)
    assert all(any(s == f and fault == "ok" for _, fault, s in server.log) for f in failed)  # each asked again
    assert pairs_of(path) == reference["pairs"]
    usage = {row["stage"]: row for row in asyncio.run(latest_table("token-usage"))}
    assert usage["synthesize"]["failed_calls"] == 0


def test_an_endpoint_dying_mid_run_loses_nothing_and_the_rerun_makes_only_the_missing_calls(tmp_path, reference):
    folder = write_docs(tmp_path / "docs")
    # Documents go one at a time (handbook.md, products.md, then faq.csv's answers): the endpoint
    # dies at the first products.md request, after handbook.md is done.
    dying = endpoint(die_when=lambda body: "Vindel" in body["messages"][-1]["content"])
    model, port = dying.model, dying.port
    try:
        state = build_dataset(str(folder), settings_for(dying, tmp_path / "out"), return_state=True)
    finally:
        dying.close()
    assert state.is_completed(), state.message  # what finished is kept; the rest is listed
    failures = {(row["stage"], row["document"]): row for row in asyncio.run(latest_table("failures"))}
    # The exam comes after synthesis: every document's is missing, and no exam is written from a part.
    assert set(failures) == {("synthesize", "products.md"), ("synthesize", "faq.csv"), ("replay", "replay prompts"),
                             ("exam", "handbook.md"), ("exam", "products.md"), ("exam", "faq.csv")}
    assert not (Path(state.result()) / "exam.jsonl").exists()
    assert all(f"base_url='{dying.base_url}'" in row["error"] and "cannot connect" in row["error"]
               for row in failures.values()), failures
    states = asyncio.run(task_states(state.state_details.flow_run_id))
    assert states["synthesize handbook.md"] == "Completed" and states["synthesize products.md"] == "Failed"

    back = endpoint(model=model, port=port)  # the endpoint recovers at the same address
    try:
        state = build_dataset(str(folder), settings_for(back, tmp_path / "out"), return_state=True)
    finally:
        back.close()
    assert state.is_completed(), state.message
    # handbook.md's synthesis came from the cache; only its exam, which failed, is asked again.
    assert not any("Brekke" in s and "new employee" not in s for _, _, s in back.log)
    assert any("Brekke" in s and "new employee" in s for _, _, s in back.log)
    assert len(back.log) == reference["calls"] - reference["handbook_calls"]
    states = asyncio.run(task_states(state.state_details.flow_run_id))
    assert states["synthesize handbook.md"] == "Cached" and states["synthesize products.md"] == "Completed"
    assert states["exam handbook.md"] == "Completed" and (Path(state.result()) / "exam.jsonl").exists()
    assert pairs_of(state.result()) == reference["pairs"]


def test_preflight_is_retried_and_a_refused_model_is_not(tmp_path):
    server = endpoint(get_faults=["500"])  # an outage: the task retries (the pre-flight's client does not)
    try:
        state = build_dataset(str(write_docs(tmp_path / "docs")), settings_for(server, tmp_path / "out"),
                              return_state=True)
        assert state.is_completed(), state.message
        assert server.gets[:2] == ["500", "ok"]
        runs = [r for r in asyncio.run(task_runs(state.state_details.flow_run_id)) if r.name.startswith("preflight")]
        assert [r.run_count for r in runs] == [2]

        wrong = settings_for(server, tmp_path / "out2")
        wrong.llm = wrong.llm.model_copy(update={"model": "not-served", "task_retries": 3})
        n_gets = len(server.gets)
        with pytest.raises(EndpointError, match="does not serve model='not-served'"):
            build_dataset(str(write_docs(tmp_path / "docs")), wrong)
        assert len(server.gets) == n_gets + 1  # no retry can make the endpoint serve another model
    finally:
        server.close()


def test_a_refused_connection_fails_before_the_folder_is_read_and_without_the_task_retries(tmp_path):
    server = endpoint()
    server.close()  # nothing listens on its port any more
    settings = settings_for(server, tmp_path / "out", task_retries=3, retry_delays_s=[5.0])
    state = build_dataset(str(write_docs(tmp_path / "docs")), settings, return_state=True)
    assert state.is_failed()
    assert "connection refused: nothing listens on" in state.message or "connection refused" in str(
        state.result(raise_on_failure=False))
    runs = asyncio.run(task_runs(state.state_details.flow_run_id))
    assert [r.name.split()[0] for r in runs] == ["preflight"]  # nothing was ingested
    assert [r.run_count for r in runs] == [1]  # a retry 5 s later could not help


def test_a_big_faq_sheet_is_synthesized_in_parts_and_a_failed_call_retries_its_part_only(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    rows = [f"What opens locker {i}?,Locker {i} opens with the code {1000 + 7 * i}." for i in range(12)]
    (folder / "lockers.csv").write_text("question,answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    failed = []

    def once(body):  # the first question asked about locker 7's answer fails, as one call of an outage would
        if "Locker 7 opens" in json.dumps(body["messages"]) and not failed:
            failed.append(body)
            return "500"
        return None

    whole_server, server = endpoint(), endpoint(fail_when=once)
    try:
        whole = build_dataset(str(folder), settings_for(whole_server, tmp_path / "whole", max_retries=0))
        settings = settings_for(server, tmp_path / "out", max_retries=0)
        settings.synth.chunks_per_task = 5
        state = build_dataset(str(folder), settings, return_state=True)
    finally:
        whole_server.close()
        server.close()
    assert state.is_completed(), state.message
    assert failed  # the fault was met
    runs = sorted((r.name, r.run_count) for r in asyncio.run(task_runs(state.state_details.flow_run_id))
                  if r.name.startswith("synthesize"))
    assert runs == [("synthesize lockers.csv [1-5 of 12]", 1), ("synthesize lockers.csv [11-12 of 12]", 1),
                    ("synthesize lockers.csv [6-10 of 12]", 2)]  # only locker 7's part ran again
    assert pairs_of(state.result()) == pairs_of(whole)  # the parts make what the whole sheet made


def test_a_failing_translation_is_listed_and_the_dataset_is_written_without_it(tmp_path, reference):
    def translation(body):
        return "500" if "Translate" in body["messages"][0]["content"] else None

    server = endpoint(fail_when=translation)
    settings = settings_for(server, tmp_path / "out")
    settings.translate = TranslateSettings(enabled=True)
    try:
        path = build_dataset(str(write_docs(tmp_path / "docs")), settings)
    finally:
        server.close()
    failures = asyncio.run(latest_table("failures"))
    assert [(row["stage"], "HTTP 500" in row["error"]) for row in failures] == [("translate", True)]
    assert pairs_of(path) == reference["pairs"]  # all that synthesis made, and no translated pair
