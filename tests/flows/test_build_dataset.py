"""The build_dataset flow on a real Prefect server (session harness) against a scripted endpoint."""

import asyncio
import json
import os
from pathlib import Path

import pytest
from datasets import load_from_disk
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from doctune.records import read_jsonl
from doctune.settings import BuildSettings, LLMSettings, RewriteSettings, SynthSettings
from flows.build_dataset import build_dataset
from tasks.dedup import normalize
from tests.endpoints import ScriptedEndpoint

DOCS = {
    "handbook.md": "# Handbook\n\n## Office\n\nThe Brekke office opens at 7:45 every weekday. "
                   "The Brekke office has 23 desks for visitors.\n\n## Parking\n\nThe Brekke garage has 40 spaces "
                   "for staff cars. Parking in the Brekke garage costs 12 crowns per day.\n",
    "products.md": "# Products\n\nThe Vindel lamp costs 349 crowns. The Vindel lamp is made of recycled oak. "
                   "The Fjord kettle holds 1.7 litres of water.\n",
    "faq.csv": "Question,Answer\nHow do I reset my badge?,Ask reception for a new badge.\n"
               "Where is the canteen?,The canteen is on floor 2.\n",
}


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def settings_for(server, out: Path, mode="fact") -> BuildSettings:
    return BuildSettings(
        llm=LLMSettings(base_url=server.base_url, model=server.model, concurrency=4, max_retries=1),
        # No second round for facts short of questions: the call counts below stay exact.
        synth=SynthSettings(mode=mode, questions_per_fact=2, min_pairs=3, min_questions_per_fact=0),
        output_dir=str(out),
    )


async def task_states(flow_run_id, wait_s: float = 30.0) -> dict[str, str]:
    """Each task run's final state name. Task run states reach the server as events, written a moment after
    the flow returns: wait until every task run has a final state."""
    deadline = asyncio.get_running_loop().time() + wait_s
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs):
                return {r.name: r.state.name for r in runs}
            if asyncio.get_running_loop().time() > deadline:
                pending = sorted(r.name for r in runs if r.state is None or not r.state.is_final())
                raise AssertionError(f"task runs without a final state after {wait_s:.0f} s: {pending}")
            await asyncio.sleep(0.5)


async def latest_artifact(key: str):
    """The data of the newest artifact with this key: markdown text, or a table as stored."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           sort=ArtifactSort.CREATED_DESC, limit=1)
    return arts[0].data


async def latest_table(key: str) -> list[dict]:
    data = await latest_artifact(key)
    return json.loads(data) if isinstance(data, str) else data


def run(folder, settings):
    state = build_dataset(str(folder), settings, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id


@pytest.mark.usefixtures("prefect_server")
def test_build_then_cached_then_only_the_edited_document(tmp_path, scripted):
    folder = write_docs(tmp_path / "docs")
    settings = settings_for(scripted, tmp_path / "out")

    path, _ = run(folder, settings)
    first_calls = scripted.calls["fact"]
    assert first_calls == (7 + 2) * 2  # 7 fact sentences and 2 FAQ answers, 2 questions each
    ds = load_from_disk(str(Path(path) / "hf"))
    rows = list(ds["train"]) + list(ds["validation"]) + list(ds["test"])
    chunk_ids = {c for c in (r["chunk_id"] for r in rows) if c}
    assert {r["source"] for r in rows} == {"faq", "synthesized", "replay", "passage", "cloze"}
    faq_answers = {r["answer"] for r in rows if r["source"] == "faq"}
    assert faq_answers & {r["answer"] for r in rows if r["source"] == "synthesized" and r["path"] == "faq.csv"}
    passages = [r for r in rows if r["source"] == "passage"]
    doc_chunks = {r["chunk_id"] for r in rows if r["chunk_id"] and r["path"] != "faq.csv"}
    assert {r["chunk_id"] for r in passages} == doc_chunks  # every chunk taught as a passage too ...
    assert all(r["pair_id"] in set(ds["train"]["pair_id"]) for r in passages)  # ... in training only
    cloze = {r["question"]: r for r in rows if r["source"] == "cloze"}
    assert cloze["How many crowns does the Vindel lamp cost?"]["answer"] == "The Vindel lamp costs 349 crowns."
    assert all(r["pair_id"] in set(ds["train"]["pair_id"]) for r in cloze.values())
    replay = [r for r in rows if r["source"] == "replay"]
    assert 0 < len(replay) <= 0.15 * len(rows) and all(r["path"] == "prompts/replay.yaml" for r in replay)
    for r in rows:
        if r["source"] == "replay":
            continue
        assert r["path"] in DOCS  # every pair links back to a file ...
        assert r["source"] == "faq" or r["chunk_id"].startswith(r["doc_id"])  # ... and a chunk
        assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
    keys = [(normalize(r["question"]), normalize(r["answer"])) for r in rows]
    assert len(keys) == len(set(keys)), "exact duplicates remain"
    assert chunk_ids
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["counts"]["files"] == 3 and (Path(path) / "card.md").exists()
    # Text-completion rows: every chunk as the document has it, and the variants made by rule.
    texts = read_jsonl(Path(path) / "text.jsonl")
    assert {c for c in chunk_ids if ":faq" not in c} <= {t["chunk_id"] for t in texts if t["kind"] == "document"}
    assert {"document", "restated", "permuted", "faq"} <= set(manifest["text_rows_by_kind"])
    for split in ("train", "validation", "test"):
        assert (Path(path) / f"{split}.messages.jsonl").exists() and (Path(path) / f"{split}.alpaca.jsonl").exists()
    dropped = read_jsonl(Path(path) / "dropped.jsonl")
    assert all(d["reason"] for d in dropped)
    # The exam beside the dataset: every document asked about, worded by the exam's own prompt, in no split.
    exam = read_jsonl(Path(path) / "exam.jsonl")
    assert {"handbook.md", "products.md"} <= {e["path"] for e in exam}
    assert all(e["facts"] and e["answer"] and e["chunk_id"].startswith(e["doc_id"]) for e in exam)
    assert {e["source"] for e in exam} == {"llm"} and scripted.calls["exam"] >= len(exam)
    assert not {normalize(e["question"]) for e in exam} & {normalize(r["question"]) for r in rows}
    assert manifest["counts"]["exam_questions"] == len(exam)
    exam_calls = scripted.calls["exam"]
    table = {row["document"]: row for row in asyncio.run(latest_table("exam"))}
    assert table["handbook.md"]["questions"] >= 1 and table["handbook.md"]["by endpoint"] >= 1

    # Unchanged folder: no LLM call at all, every synthesis task Cached.
    path2, run_id = run(folder, settings)
    assert scripted.calls["fact"] == first_calls and path2 == path and scripted.calls["exam"] == exam_calls
    states = asyncio.run(task_states(run_id))
    synth_states = {n: s for n, s in states.items() if n.startswith(("synthesize ", "exam "))}
    assert len(synth_states) == 6 and set(synth_states.values()) == {"Cached"}, states
    assert read_jsonl(Path(path) / "exam.jsonl") == exam
    ingest = {row["what"]: row["count"] for row in asyncio.run(latest_table("ingest"))}
    assert ingest["from the cache"] == 3 and ingest["read now"] == 0 and ingest["task runs"] == 1
    usage = {row["stage"]: row for row in asyncio.run(latest_table("token-usage"))}
    assert usage["synthesize"]["calls"] == 0 and usage["synthesize"]["from_cache"] == 3  # tonight's cost: none
    assert usage["replay"]["calls"] == 0 and usage["replay"]["from_cache"] == 1

    # Edit one document: only its facts go to the LLM again.
    (folder / "products.md").write_text(DOCS["products.md"] + "\nThe Fjord kettle comes in 4 colours.\n")
    scripted.facts.clear()
    path3, run_id = run(folder, settings)
    assert path3 != path
    assert scripted.calls["fact"] == first_calls + 4 * 2
    assert scripted.facts and all(("Vindel" in f or "Fjord" in f) for f in scripted.facts)
    states = asyncio.run(task_states(run_id))
    assert states["synthesize handbook.md"] == "Cached" and states["synthesize products.md"] != "Cached"
    assert states["exam handbook.md"] == "Cached" and states["exam products.md"] != "Cached"
    exam3 = read_jsonl(Path(path3) / "exam.jsonl")
    assert [e for e in exam3 if e["path"] == "handbook.md"] == [e for e in exam if e["path"] == "handbook.md"]
    ingest = {row["what"]: row["count"] for row in asyncio.run(latest_table("ingest"))}
    assert ingest["from the cache"] == 2 and ingest["read now"] == 1  # only the edited file was read again


@pytest.mark.usefixtures("prefect_server")
def test_rewrites_are_checked_text_rows_made_once(tmp_path, scripted):
    # The scripted endpoint's notes keep every value; its relations add a year no document has.
    folder = write_docs(tmp_path / "docs")
    settings = settings_for(scripted, tmp_path / "out").model_copy(
        update={"rewrite": RewriteSettings(styles=["notes", "relations"])})
    path, _ = run(folder, settings)
    texts = read_jsonl(Path(path) / "text.jsonl")
    chunks = {t["chunk_id"]: t["path"] for t in texts if t["kind"] == "document"}
    assert set(chunks.values()) == {"handbook.md", "products.md"}
    assert scripted.calls["rewrite"] == 2 * len(chunks)
    notes = {t["chunk_id"]: t for t in texts if t["kind"] == "rewrite:notes"}
    assert set(notes) == set(chunks) and not [t for t in texts if t["kind"] == "rewrite:relations"]
    assert "- Products: The Vindel lamp costs 349 crowns." in next(t["text"] for t in notes.values()
                                                                   if t["path"] == "products.md")
    dropped = [d for d in read_jsonl(Path(path) / "dropped.jsonl") if d["stage"] == "rewrite"]
    assert {d["reason"] for d in dropped} == {"invented_value"} and len(dropped) == len(chunks)
    assert all("1887" in d["detail"] for d in dropped)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["text_rows_by_kind"]["rewrite:notes"] == len(chunks)
    usage = {row["stage"]: row for row in asyncio.run(latest_table("token-usage"))}
    assert usage["rewrite"]["calls"] == 2 * len(chunks) and usage["rewrite"]["from_cache"] == 0
    rates = [r for r in asyncio.run(latest_table("keep-rates")) if r["stage"] == "rewrite"]
    assert {r["filter"]: r["dropped"] for r in rates} == {"invented_value": len(chunks), "(all)": len(chunks)}

    path2, run_id = run(folder, settings)  # unchanged: no rewrite call, the same rows
    assert path2 == path and scripted.calls["rewrite"] == 2 * len(chunks)
    states = asyncio.run(task_states(run_id))
    assert states["rewrite handbook.md"] == states["rewrite products.md"] == "Cached"
    usage = {row["stage"]: row for row in asyncio.run(latest_table("token-usage"))}
    assert usage["rewrite"]["calls"] == 0 and usage["rewrite"]["from_cache"] == 2


@pytest.mark.usefixtures("prefect_server")
def test_endpoint_whose_output_all_fails_stops_before_training(tmp_path):
    from doctune.quality import DatasetQualityError

    bad = ScriptedEndpoint(behaviour="garbage")
    try:
        folder = write_docs(tmp_path / "docs")
        with pytest.raises(DatasetQualityError) as err:
            build_dataset(str(folder), settings_for(bad, tmp_path / "out", mode="auto"))
    finally:
        bad.close()
    message = str(err.value)
    assert "stage 'synthesize' kept 0 of" in message and "model='scripted'" in message
    assert "likely fix" in message and "dropped (" in message


@pytest.mark.usefixtures("prefect_server")
def test_chinese_documents_are_skipped_loudly_for_an_english_only_endpoint(tmp_path):
    folder = write_docs(tmp_path / "docs")
    (folder / "规定.md").write_text("# 停车规定\n\n布雷克车库共有四十个员工车位。在布雷克车库停车每天收费十二克朗。\n",
                                   encoding="utf-8")
    english_only = ScriptedEndpoint(behaviour="english_only")
    try:
        state = build_dataset(str(folder), settings_for(english_only, tmp_path / "out"), return_state=True)
        path = state.result()
        zh_fact_calls = [f for f in english_only.facts if "布雷克" in f]
    finally:
        english_only.close()
    assert len(zh_fact_calls) <= 6  # the probe only; no synthesis calls for the skipped language
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["counts"]["skipped_languages"] == ["zh"] and manifest["counts"]["chunks_not_synthesized"] == 1
    dropped = [d for d in read_jsonl(Path(path) / "dropped.jsonl")
               if d["reason"] == "language_not_written_by_endpoint:zh"]
    assert len(dropped) == 1 and dropped[0]["record"]["path"] == "规定.md"
    ds = load_from_disk(str(Path(path) / "hf"))
    # No question was synthesized for it; its text is still taught as a passage (no LLM needed).
    assert {r["source"] for split in ds.values() for r in split if r["path"] == "规定.md"} == {"passage"}

    async def mode_artifact():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["synthesis-mode"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        return [a.data for a in found]

    [text] = asyncio.run(mode_artifact())
    assert "Languages not synthesized" in text and "Chinese" in text and "Qwen" in text


@pytest.mark.usefixtures("prefect_server")
def test_unreachable_endpoint_fails_in_preflight(tmp_path):
    from doctune.llm import EndpointError

    folder = write_docs(tmp_path / "docs")
    settings = BuildSettings(llm=LLMSettings(base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=2,
                                             task_retries=0),
                             output_dir=str(tmp_path / "out"))
    with pytest.raises(EndpointError, match="connection refused: nothing listens on 127.0.0.1:9"):
        build_dataset(str(folder), settings)


@pytest.mark.usefixtures("prefect_server")
def test_bad_files_are_listed_and_nothing_else_is_lost(tmp_path, scripted):
    import random

    folder = write_docs(tmp_path / "docs")
    (folder / "broken.pdf").write_bytes(random.Random(0).randbytes(4000))
    (folder / "empty.md").write_text("")
    (folder / "junk.txt").write_bytes(random.Random(1).randbytes(5000))
    (folder / "售后_gbk.txt").write_bytes("# 售后政策\n\n星河三号无人机的保修期为24个月。维修中心通常在9个工作日内修好无人机。\n".encode("gb18030"))
    with open(folder / "huge.txt", "wb") as f:  # 50 MB: over the default ingest.max_file_mb=20
        f.write(b"The Brekke office is large. " * (50 * 1024 * 1024 // 28))
    # A hostile folder: a link to a file outside it, a linked folder, a FIFO, a name that is not UTF-8.
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash. The vault key is hunter2 and nobody may know it.\n")
    os.symlink(secret, folder / "users.txt")
    os.symlink(tmp_path, folder / "linked")
    os.mkfifo(folder / "pipe.txt")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.md"), "wb") as f:  # as old Windows shares name files
        f.write(b"# Cafe\n\nThe Brekke cafe sells 140 coffees a day.\n")
    path, _ = run(folder, settings_for(scripted, tmp_path / "out"))
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["counts"]["files"] == 9 and manifest["counts"]["skipped_files"] == 7
    assert manifest["counts"]["documents"] == 4  # handbook, products, the GBK text and caf\xe9.md
    assert set(manifest["by_file"]) >= {"handbook.md", "products.md", "faq.csv", "caf\\xe9.md"}
    assert any("星河三号" in f for f in scripted.facts)  # the GBK text was decoded and synthesized
    skipped = {row["file"]: row["reason"] for row in asyncio.run(latest_table("skipped-files"))}
    assert set(skipped) == {"broken.pdf", "empty.md", "junk.txt", "huge.txt", "users.txt", "linked/", "pipe.txt"}
    assert "max_file_mb" in skipped["huge.txt"] and "empty" in skipped["empty.md"]
    assert "outside the folder" in skipped["users.txt"] and str(secret) in skipped["users.txt"]
    assert "not followed" in skipped["linked/"] and "not a regular file" in skipped["pipe.txt"]
    assert not any("hunter2" in f or "root:x" in f for f in scripted.facts)  # nothing outside was read
    written = "".join(p.read_text(encoding="utf-8") for p in Path(path).glob("*.jsonl"))
    assert "hunter2" not in written and "caf\\\\xe9.md" in written  # escaped in every output (JSON-escaped here)


@pytest.mark.usefixtures("prefect_server")
def test_documents_fanned_out_on_a_local_dask_cluster_give_the_same_dataset(tmp_path, scripted):
    """runner: dask (prefect-dask, an in-process local cluster): documents are synthesized side by side
    and the dataset is the one the thread runner writes, pair for pair."""
    folder = write_docs(tmp_path / "docs")
    threads = settings_for(scripted, tmp_path / "threads")
    dask = threads.model_copy(update={"runner": "dask", "documents_at_once": 3, "output_dir": str(tmp_path / "dask")})
    # Another seed, so the dask run cannot take the thread run's cached results.
    dask.synth = dask.synth.model_copy(update={"seed": 1})
    threads.synth = threads.synth.model_copy(update={"seed": 1})
    path_dask, run_id = run(folder, dask)
    states = asyncio.run(task_states(run_id))
    synth = {n: s for n, s in states.items() if n.startswith("synthesize ")}
    assert synth == {"synthesize handbook.md": "Completed", "synthesize products.md": "Completed",
                     "synthesize faq.csv": "Completed"}, states
    calls = scripted.calls["fact"]
    path_threads, _ = run(folder, threads)
    assert scripted.calls["fact"] == calls  # same inputs: the thread run is served from the cache
    assert Path(path_dask).name == Path(path_threads).name  # named after content: the same dataset
    for split in ("train", "validation", "test"):
        assert (Path(path_dask) / f"{split}.messages.jsonl").read_text() == \
               (Path(path_threads) / f"{split}.messages.jsonl").read_text()


@pytest.mark.usefixtures("prefect_server")
def test_documents_side_by_side_share_the_endpoints_concurrency(tmp_path):
    """Three documents at once, each with more calls than llm.concurrency: the endpoint gets
    exactly llm.concurrency requests at a time, never three documents' worth."""
    server = ScriptedEndpoint(model="shared-slots", delay_s=0.05)
    try:
        settings = settings_for(server, tmp_path / "out")
        settings.llm = settings.llm.model_copy(update={"concurrency": 3})
        settings.documents_at_once = 3
        run(write_docs(tmp_path / "docs"), settings)
    finally:
        server.close()
    assert server.calls["fact"] == (7 + 2) * 2
    assert server.max_in_flight == 3


@pytest.mark.usefixtures("prefect_server")
def test_a_key_typed_into_api_key_env_fails_the_run_before_anything_is_read(tmp_path):
    key = "sk-proj-" + "Zq7" * 12  # made up
    settings = BuildSettings(llm=LLMSettings(base_url="http://127.0.0.1:9/v1", api_key_env=key),
                             output_dir=str(tmp_path / "out"))
    state = build_dataset(str(write_docs(tmp_path / "docs")), settings, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "llm.api_key_env must name the environment variable" in message and "revoke" in message
    assert key not in message and not (tmp_path / "out").exists()  # nothing was ingested or written
