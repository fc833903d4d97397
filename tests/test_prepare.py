"""Batched ingest + chunk: the same records as one file at a time, a cache entry per file (an edited
file is read again alone), and one Prefect task run per batch."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from prefect import flow
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from doctune.settings import ChunkSettings, IngestSettings
from tasks.chunk import chunk_document
from tasks.ingest import discover, ingest_file
from tasks.prepare import file_key, prepare_batch_task, prepare_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INGEST, CHUNK = IngestSettings(), ChunkSettings(chunk_tokens=40, overlap_tokens=5)


def write_folder(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc-{i}.md").write_text(
            f"# Product {i}\n\nThe product {i} costs {100 + i} euros. " + "It ships in a box. " * 20, encoding="utf-8")
    (folder / "faq.csv").write_text("question,answer\nHow long is the warranty?,Two years.\n", encoding="utf-8")
    (folder / "broken.pdf").write_bytes(b"PK\x03\x04 not a pdf")
    return folder


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")))


def test_batch_gives_what_ingest_and_chunk_give_one_file_at_a_time(tmp_path):
    folder = write_folder(tmp_path / "docs")
    refs = discover(folder, INGEST)
    batch = prepare_files(folder, refs, INGEST, CHUNK)
    assert [f.relpath for f in batch.files] == [r.relpath for r in refs] and batch.from_cache == 0
    for ref, prepared in zip(refs, batch.files):
        one = ingest_file(folder, ref, INGEST)
        assert prepared.ingested == one
        assert prepared.chunks == [chunk_document(d, CHUNK) for d in one.documents]
    by_name = {f.relpath: f for f in batch.files}
    assert len(by_name["faq.csv"].ingested.pairs) == 1
    assert by_name["broken.pdf"].ingested.skipped and not by_name["broken.pdf"].ingested.documents
    assert all(len(f.chunks[0]) > 1 for n, f in by_name.items() if n.startswith("doc-"))


def test_cache_is_per_file(tmp_path, store):
    folder = write_folder(tmp_path / "docs")
    refs = discover(folder, INGEST)
    first = prepare_files(folder, refs, INGEST, CHUNK, store)
    assert first.from_cache == 0

    again = prepare_files(folder, refs, INGEST, CHUNK, store)
    assert again.from_cache == len(refs) and again.files == first.files

    # Batched differently, other files excluded: each file's entry still fits.
    regrouped = IngestSettings(files_per_task=1, exclude=["*.csv"])
    assert prepare_files(folder, refs[:3], regrouped, CHUNK, store).from_cache == 3

    (folder / "doc-2.md").write_text("# Product 2\n\nThe product 2 now costs 150 euros.\n", encoding="utf-8")
    edited = discover(folder, INGEST)
    batch = prepare_files(folder, edited, INGEST, CHUNK, store)
    assert batch.from_cache == len(refs) - 1
    doc2 = next(f for f in batch.files if f.relpath == "doc-2.md")
    assert "150 euros" in doc2.ingested.documents[0].text

    # Settings that change a result miss every file.
    assert prepare_files(folder, edited, INGEST, ChunkSettings(chunk_tokens=60, overlap_tokens=5), store).from_cache == 0
    assert prepare_files(folder, edited, IngestSettings(max_file_mb=1), CHUNK, store).from_cache == 0


def test_file_key_follows_path_content_and_settings(tmp_path):
    folder = write_folder(tmp_path / "docs", n=1)
    ref = discover(folder, INGEST)[0]
    key = file_key(ref, INGEST, CHUNK)
    assert key == file_key(ref.model_copy(), IngestSettings(files_per_task=7, exclude=[]), CHUNK)
    assert key != file_key(ref.model_copy(update={"sha256": "0" * 64}), INGEST, CHUNK)
    assert key != file_key(ref.model_copy(update={"relpath": "moved/" + ref.relpath}), INGEST, CHUNK)
    assert key != file_key(ref, INGEST, ChunkSettings(chunk_tokens=41, overlap_tokens=5))


def test_file_changed_after_discovery_is_not_cached_under_the_old_hash(tmp_path, store):
    folder = write_folder(tmp_path / "docs", n=1)
    refs = discover(folder, INGEST)
    (folder / "doc-0.md").write_text("# Other\n\nOther text.\n", encoding="utf-8")
    batch = prepare_files(folder, refs, INGEST, CHUNK, store)
    doc0 = next(f for f in batch.files if f.relpath == "doc-0.md")
    assert "changed since it was discovered" in doc0.ingested.skipped[0].reason
    [ref] = [r for r in refs if r.relpath == "doc-0.md"]
    assert not store.exists(file_key(ref, INGEST, CHUNK))


@pytest.mark.usefixtures("prefect_server")
def test_task_run_per_batch_and_reuse_in_prefects_result_storage(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    folder = write_folder(tmp_path / "docs")
    refs = discover(folder, INGEST)

    @flow
    def two_batches():
        return [prepare_batch_task(str(folder), refs[:4], INGEST, CHUNK),
                prepare_batch_task(str(folder), refs[4:], INGEST, CHUNK)]

    async def run_names(flow_run_id) -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return sorted(r.name for r in runs)

    state = two_batches(return_state=True)
    first = state.result()
    names = asyncio.run(run_names(state.state_details.flow_run_id))
    assert names == sorted([f"prepare {refs[0].relpath} … {refs[3].relpath} (4 files)",
                            f"prepare {refs[4].relpath} … {refs[-1].relpath} ({len(refs) - 4} files)"])
    again = two_batches()
    assert [b.from_cache for b in again] == [4, len(refs) - 4]
    assert [b.files for b in again] == [b.files for b in first]


def test_unreadable_cache_entry_is_read_again_from_the_file(tmp_path, store):
    folder = write_folder(tmp_path / "docs", n=2)
    refs = discover(folder, INGEST)
    first = prepare_files(folder, refs, INGEST, CHUNK, store)
    [ref] = [r for r in refs if r.relpath == "doc-1.md"]
    (tmp_path / "results" / file_key(ref, INGEST, CHUNK)).write_bytes(b"{torn")
    fresh = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")))  # no memory cache
    again = prepare_files(folder, refs, INGEST, CHUNK, fresh)
    assert again.from_cache == len(refs) - 1 and again.files == first.files
    assert ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results"))).read(
        file_key(ref, INGEST, CHUNK)).result == first.files[refs.index(ref)]
