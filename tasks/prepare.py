"""Ingest and chunk a batch of files in one Prefect task, with the cache still keyed per file.

A task run costs Prefect a few API calls and events whatever it does; a company folder holds tens
of thousands of small files, so one task per file (and one more per document to chunk it) spends
more time on Prefect than on the files. A batch is one task run; inside it, each file's result is
read from or written to Prefect's result storage under a key of its own (its path and content hash,
the settings that change its result, the code that makes it), so an edited file is re-read alone
and a re-run with nothing changed reads every file from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.results import get_result_store
from pydantic import BaseModel, Field

from doctune import prefect_utils
from doctune.records import Chunk
from doctune.settings import ChunkSettings, IngestSettings
from tasks.chunk import chunk_document
from tasks.ingest import NOT_CACHED, FileRef, IngestResult, ingest_file
from tasks.reader_process import file_reader

log = logging.getLogger(__name__)


class PreparedFile(BaseModel):
    relpath: str
    ingested: IngestResult
    chunks: list[list[Chunk]] = Field(default_factory=list, description="Per document of `ingested`, in order.")


class PreparedBatch(BaseModel):
    files: list[PreparedFile] = Field(default_factory=list)
    from_cache: int = Field(0, description="Files whose result was read from the cache.")
    seconds: float = Field(0.0, description="Wall time of the batch.")


def file_key(ref: FileRef, ingest: IngestSettings, chunk: ChunkSettings) -> str:
    """The cache key of one file's result: what it is (path, content hash), the settings that change
    it, and the code that makes it (this module and everything it imports, ingest and chunk too)."""
    parts = {"ref": ref.model_dump(), "ingest": ingest.cache_view(), "chunk": chunk.model_dump(),
             "code": _code()}
    return "prepare-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _code() -> str:
    root = prefect_utils.ROOT  # read at call time: a test may point it at a copy of the code
    return prefect_utils.code_digest(root / "tasks" / "prepare.py", root)


def prepare_file(folder: Path, ref: FileRef, ingest: IngestSettings, chunk: ChunkSettings, read=None) -> PreparedFile:
    """Read one file (with `read`, see ingest_file) and chunk its documents. Never raises for a bad file."""
    ingested = ingest_file(folder, ref, ingest, read)
    return PreparedFile(relpath=ref.relpath, ingested=ingested,
                        chunks=[chunk_document(doc, chunk) for doc in ingested.documents])


def prepare_files(folder: Path, refs: list[FileRef], ingest: IngestSettings, chunk: ChunkSettings,
                  store=None) -> PreparedBatch:
    """`prepare_file` for each of `refs`, through `store` (a Prefect ResultStore) when given: a file
    whose key is stored is read back, any other is prepared and stored. A file whose content
    changed since discovery, or that hit a reading limit, is not stored (ingest_file says so in
    `skipped`). Files are read in a child process under the limits of `ingest` (tasks/reader_process.py),
    started at the first file not in the cache."""
    start, files, hits = time.perf_counter(), [], 0
    with file_reader(ingest) as read:
        for ref in refs:
            key = file_key(ref, ingest, chunk) if store is not None else None
            cached = _stored(store, key) if key is not None else None
            if cached is not None:
                files.append(cached)
                hits += 1
                continue
            one = prepare_file(folder, ref, ingest, chunk, read)
            files.append(one)
            again = any(marker in s.reason for s in one.ingested.skipped for marker in NOT_CACHED)
            if key is not None and ref.sha256 and not again:
                store.write(one, key=key)
    return PreparedBatch(files=files, from_cache=hits, seconds=time.perf_counter() - start)


def _stored(store, key: str) -> PreparedFile | None:
    """The stored result under `key`, or None when there is none or it cannot be read (a torn
    entry is prepared and stored anew). One read: ResultStore.exists would read and deserialize
    the whole record too, and storages differ in what a missing key raises."""
    try:
        return store.read(key).result
    except Exception as exc:
        log.debug("prepare: no usable entry %s (%s)", key, exc)
        return None


def _run_name() -> str:
    from prefect.runtime import task_run

    refs = task_run.parameters["refs"]
    if len(refs) == 1:
        return f"prepare {refs[0].relpath}"
    return f"prepare {refs[0].relpath} … {refs[-1].relpath} ({len(refs)} files)"


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name=_run_name, retries=1)
def prepare_batch_task(folder: str, refs: list[FileRef], ingest: IngestSettings, chunk: ChunkSettings) -> PreparedBatch:
    # Not cached as a batch: which files share a batch shifts when one is added, and each file's own
    # entry in the result store is what a re-run reuses.
    batch = prepare_files(Path(folder), refs, ingest, chunk, store=get_result_store())
    log.info("prepared %d files in %.1f s (%d from the cache)", len(refs), batch.seconds, batch.from_cache)
    return batch
