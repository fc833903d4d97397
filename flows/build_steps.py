"""The steps of the build_dataset flow that are more than one task call: ingest in batches, plan and run
the per-document synthesis, the policy when every document failed, and the optional stages that may
fail without failing the run. flows/build_dataset.py reads as the list of stages; this is how each runs.

No task is defined here, so no cache key depends on this file: moving a line here re-synthesizes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from doctune import artifacts
from doctune.llm import EndpointError, scrub
from doctune.prefect_utils import synthesis_runner, with_network_retries
from doctune.records import Chunk, Document, QAPair, SkippedFile
from doctune.exam import ExamItem, ExamSettings
from doctune.loop import LoopSettings, loop_targets
from doctune.settings import BuildSettings, DedupSettings, LLMSettings, RewriteSettings
from tasks.exam import ExamResult, exam_document_task
from tasks.ingest import discover_all
from tasks.loop import LoopTarget, away_from_exam, loop_material_task
from tasks.prepare import prepare_batch_task
from tasks.rewrite import RewriteResult, rewrite_document_task
from tasks.synthesize import SynthResult, synthesize_document_task


def usage_row(stage: str, result, state, reused: int = 0) -> dict:
    """A token-usage row: the calls and tokens `result` cost this run (none when `state` says it came
    from the cache), and how many task results were reused."""
    cached = state is not None and state.name == "Cached"
    cost = (lambda name: 0) if cached else (lambda name: getattr(result, name, 0))
    return {"stage": stage, "calls": cost("calls"), "failed_calls": cost("failed_calls"),
            "prompt_tokens": cost("prompt_tokens"), "completion_tokens": cost("completion_tokens"),
            "from_cache": reused + cached}


def failure_row(stage: str, what: str, state) -> dict:
    # The task's message quotes the endpoint's reply, which may quote the key it was sent.
    return {"stage": stage, "document": what, "error": scrub(str(state.message))[:500]}


@dataclass
class Gathered:
    results: list = field(default_factory=list)  # every completed task's result, in submission order
    made: list = field(default_factory=list)  # those this run computed (not from the cache)
    reused: int = 0
    failures: list[dict] = field(default_factory=list)


def gather(stage: str, futures: list[tuple[str, object]]) -> Gathered:
    """Wait for (name, future) pairs: what each completed task returned, which of those cost calls tonight,
    and a failure row for each task that failed (the others go on)."""
    out = Gathered()
    for name, future in futures:
        future.wait()  # sets the final state; before it, .state may still read Pending
        if not future.state.is_completed():
            out.failures.append(failure_row(stage, name, future.state))
            continue
        out.results.append(future.result())
        if future.state.name == "Cached":
            out.reused += 1
        else:
            out.made.append(out.results[-1])
    return out


# ----------------------------------------------------------------------------- 1-2. ingest and chunk


@dataclass
class Prepared:
    files: int
    documents: list[Document]
    given: list[QAPair]  # ready-made pairs (FAQ exports, Alpaca, chat logs)
    skipped: list[SkippedFile]
    chunks: dict[str, list[Chunk]]  # by document path, in folder order

    @property
    def all_chunks(self) -> list[Chunk]:
        return [c for cs in self.chunks.values() for c in cs]


def ingest_folder(root: Path, settings: BuildSettings) -> Prepared:
    """Ingest and chunk a batch of files per task run (each file cached on its own content), with a
    progress bar and the skipped-files and ingest artifacts."""
    refs, not_read = discover_all(root, settings.ingest)  # links out of the folder, special files
    n = settings.ingest.files_per_task
    progress = create_progress_artifact(0.0, key="ingest-progress", description="Files ingested and chunked")
    prepared, from_cache = [], 0
    for i in range(0, len(refs), n):
        batch = prepare_batch_task(str(root), refs[i:i + n], settings.ingest, settings.chunk)
        prepared += batch.files
        from_cache += batch.from_cache
        update_progress_artifact(progress, 100.0 * min(i + n, len(refs)) / len(refs))
    update_progress_artifact(progress, 100.0)
    out = Prepared(
        files=len(refs),
        documents=[d for f in prepared for d in f.ingested.documents],
        given=[p for f in prepared for p in f.ingested.pairs],
        skipped=not_read + [s for f in prepared for s in f.ingested.skipped],
        chunks={d.path: cs for f in prepared for d, cs in zip(f.ingested.documents, f.chunks)},
    )
    n_chunks = len(out.all_chunks)
    artifacts.skipped_files(out.skipped, len(refs) + len(not_read))
    artifacts.ingest_summary({"files": len(refs), "from the cache": from_cache, "read now": len(refs) - from_cache,
                              "documents": len(out.documents), "chunks": n_chunks,
                              "ready-made pairs": len(out.given), "skipped": len(out.skipped),
                              "task runs": -(-len(refs) // n)})
    get_run_logger().info("ingested %d files (%d from the cache): %d documents, %d chunks, %d ready-made pairs, "
                          "%d skipped", len(refs), from_cache, len(out.documents), n_chunks, len(out.given),
                          len(out.skipped))
    return out


# ----------------------------------------------------------------------------- 3. synthesize


def synthesis_jobs(chunks: dict[str, list[Chunk]], faq: list[Chunk], mode: str,
                   skip_languages: dict[str, str]) -> list[tuple[str, list[Chunk], str]]:
    """(document path, its chunks, mode) per synthesis task: every document in the chosen mode, each FAQ
    export's answers in fact mode, chunks of a skipped language left out, empty jobs dropped."""
    jobs = [(path, cs, mode) for path, cs in chunks.items()]
    faq_by_path: dict[str, list[Chunk]] = {}
    for c in faq:
        faq_by_path.setdefault(c.path, []).append(c)
    jobs += [(path, cs, "fact") for path, cs in faq_by_path.items()]
    jobs = [(path, [c for c in cs if c.language not in skip_languages], m) for path, cs, m in jobs]
    return [job for job in jobs if job[1]]


@dataclass
class Synthesized:
    result: SynthResult = field(default_factory=SynthResult)  # every document's, in document order
    made: SynthResult = field(default_factory=SynthResult)  # what this run asked the endpoint
    reused: int = 0  # task results taken from the cache
    tasks: int = 0  # task runs: a document of more than synth.chunks_per_task chunks is several
    failures: list[dict] = field(default_factory=list)


def synthesis_parts(jobs: list[tuple[str, list[Chunk], str]], per_task: int) -> list[tuple[str, list[Chunk], str, str]]:
    """(path, chunks, mode, task run name) per task: a job of more than `per_task` chunks (a huge FAQ sheet, a
    book) in consecutive parts. Calls are planned per chunk, with seeds from the chunk, so the parts make
    exactly what the whole would."""
    parts = []
    for path, chunks, mode in jobs:
        if len(chunks) <= per_task:
            parts.append((path, chunks, mode, f"synthesize {path}"))
            continue
        for start in range(0, len(chunks), per_task):
            part = chunks[start:start + per_task]
            parts.append((path, part, mode, f"synthesize {path} [{start + 1}-{start + len(part)} of {len(chunks)}]"))
    return parts


def synthesize_documents(jobs: list[tuple[str, list[Chunk], str]], llm: LLMSettings,
                         settings: BuildSettings) -> Synthesized:
    """documents_at_once tasks at a time (a document, or a part of a long one), on threads or Dask, with a
    progress bar and a log line every tenth; merged in document order, so the dataset does not depend on
    which finished first. A failed task is a failure row; the others go on."""
    parts = synthesis_parts(jobs, settings.synth.chunks_per_task)
    out = Synthesized(tasks=len(parts))
    progress = create_progress_artifact(0.0, key="synthesis-progress", description="Synthesis tasks done")
    synthesize = with_network_retries(synthesize_document_task, llm)
    log = get_run_logger()
    with synthesis_runner(settings.runner, settings.documents_at_once, settings.dask_address) as runner:
        futures = [runner.submit(synthesize.with_options(task_run_name=name) if name != f"synthesize {path}"
                                 else synthesize,
                                 {"path": path, "chunks": cs, "llm": llm, "settings": settings.synth, "mode": mode})
                   for path, cs, mode, name in parts]
        step = max(1, len(futures) // 10)  # a line per task for a small folder, every tenth for a big one
        for i, _ in enumerate(as_completed(futures), start=1):
            update_progress_artifact(progress, 100.0 * i / len(futures))
            if i % step == 0 or i == len(futures):
                log.info("synthesis: %d of %d tasks done (%d documents)", i, len(futures), len(jobs))
        done = gather("synthesize", [(name.removeprefix("synthesize "), f) for (*_, name), f in zip(parts, futures)])
    out.result = reduce(SynthResult.merge, done.results, SynthResult())
    out.made = reduce(SynthResult.merge, done.made, SynthResult())
    out.reused, out.failures = done.reused, done.failures
    update_progress_artifact(progress, 100.0)
    return out


def stop_if_every_document_failed(jobs: list, synthesized: Synthesized, llm: LLMSettings) -> None:
    """An outage, not an empty folder: say so, and what a re-run will do."""
    failures = synthesized.failures
    if jobs and len(failures) == synthesized.tasks:
        raise EndpointError(
            f"synthesis failed for all {len(jobs)} documents at the endpoint (base_url={llm.base_url!r}, "
            f"model={llm.model!r}), after {llm.max_retries} retries per call and {llm.task_retries} per task; "
            f"the documents are not the problem. First error: {failures[0]['error']}\n"
            "Fix: make the endpoint answer again (the error says what failed), then re-run: every document that "
            "finishes is cached, so a re-run synthesizes only the ones still missing.")


# ----------------------------------------------------------------------------- 3b. the exam


@dataclass
class Exam:
    items: list[ExamItem] = field(default_factory=list)  # every document's, in folder order
    reserves: list[ExamItem] = field(default_factory=list)  # rule-made stand-ins, asked where an item must go
    dropped: list = field(default_factory=list)
    made: ExamResult = field(default_factory=ExamResult)  # what this run asked the endpoint
    reused: int = 0
    failures: list[dict] = field(default_factory=list)


def exam_documents(chunks: dict[str, list[Chunk]], faq: list[Chunk], llm: LLMSettings, settings: ExamSettings,
                   skip_languages: list[str]) -> Exam:
    """One cached exam task per document (a FAQ export's answers count as its document), all submitted at
    once: the endpoint's concurrency bound keeps the calls in check. A failed document is a failure row."""
    docs = {path: list(cs) for path, cs in chunks.items() if cs}
    for c in faq:
        docs.setdefault(c.path, []).append(c)
    task = with_network_retries(exam_document_task, llm)
    done = gather("exam", [(path, task.submit(path, cs, llm, settings, sorted(skip_languages)))
                           for path, cs in docs.items()])
    return Exam(items=[i for r in done.results for i in r.items], reserves=[i for r in done.results for i in r.reserves],
                dropped=[d for r in done.results for d in r.dropped],
                made=ExamResult(**{k: sum(getattr(r, k) for r in done.made)
                                   for k in ("calls", "prompt_tokens", "completion_tokens")}),
                reused=done.reused, failures=done.failures)


# ----------------------------------------------------------------------------- 3c. the loop


@dataclass
class Looped:
    result: SynthResult  # after the exam filter
    rows: list[dict]  # per target fact, for the artifact
    made: SynthResult  # what this run asked the endpoint
    reused: int
    failures: list[dict]


def loop_material(registry: str, chunks: dict[str, list[Chunk]], faq: list[Chunk], exam_items: list[ExamItem],
                  llm: LLMSettings, settings: LoopSettings, dedup: DedupSettings,
                  skip_languages: list[str]) -> Looped | None:
    """More questions for the facts the last candidate missed (the rounds in `registry`/loop.json), one cached task
    per document, then the exam filter. None when no round names a fact of tonight's documents. A document whose
    task failed is a failure row, and the build goes on without its material."""
    by_chunk = {c.chunk_id: c for cs in chunks.values() for c in cs} | {c.chunk_id: c for c in faq}
    targets = [t for t in map(LoopTarget.model_validate, loop_targets(registry)) if t.chunk_id in by_chunk]
    if not targets:
        return None
    by_path: dict[str, list[LoopTarget]] = {}
    for t in targets:
        by_path.setdefault(t.path, []).append(t)
    task = with_network_retries(loop_material_task, llm)
    done = gather("loop", [(path, task.submit(path, ts, list({t.chunk_id: by_chunk[t.chunk_id] for t in ts}.values()),
                                              llm, settings, skip_languages))
                           for path, ts in by_path.items()])
    result, rows = away_from_exam(reduce(SynthResult.merge, done.results, SynthResult()), targets,
                                  [i.question for i in exam_items], settings, dedup)
    get_run_logger().info("loop: %d new questions for %d missed facts in %d documents (%d dropped near the exam)",
                          len(result.pairs), len(targets), len(by_path),
                          sum(d.reason == "near_exam_question" for d in result.dropped))
    return Looped(result=result, rows=rows, made=reduce(SynthResult.merge, done.made, SynthResult()),
                  reused=done.reused, failures=done.failures)


# ----------------------------------------------------------------------------- 3d. rewrites


@dataclass
class Rewritten:
    result: RewriteResult  # every document's, in folder order
    made: RewriteResult  # what this run asked the endpoint
    reused: int
    failures: list[dict]


def rewrite_documents(chunks: dict[str, list[Chunk]], llm: LLMSettings, settings: RewriteSettings,
                      skip_languages: list[str]) -> Rewritten:
    """One cached rewrite task per document, all submitted at once (the endpoint's concurrency bound keeps the
    calls in check). A failed document is a failure row; the build goes on without its rewrites."""
    task = with_network_retries(rewrite_document_task, llm)
    done = gather("rewrite", [(path, task.submit(path, cs, llm, settings, skip_languages))
                              for path, cs in chunks.items() if cs])
    result = reduce(RewriteResult.merge, done.results, RewriteResult())
    get_run_logger().info("rewrites: %d kept, %d dropped by the checks, from %d calls (%d documents from the cache)",
                          len(result.rows), len(result.dropped), result.calls, done.reused)
    return Rewritten(result=result, made=reduce(RewriteResult.merge, done.made, RewriteResult()),
                     reused=done.reused, failures=done.failures)


# ----------------------------------------------------------------------------- 4-5. optional stages


def optional_stage(stage: str, what: str, task, llm: LLMSettings, *args, failures: list[dict], usage: list[dict]):
    """Run a stage that only adds to the dataset (translation, replay): its result, or None when the
    endpoint failed it, listed in `failures`, so the run goes on with what synthesis made."""
    state = with_network_retries(task, llm)(*args, return_state=True)
    if not state.is_completed():
        failures.append(failure_row(stage, what, state))
        get_run_logger().warning("%s failed; the dataset is built without it: %s",
                                 "translation" if stage == "translate" else stage, failures[-1]["error"])
        return None
    result = state.result()
    usage.append(usage_row(stage, result, state))
    return result
