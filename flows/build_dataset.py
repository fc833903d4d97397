"""build_dataset: document folder → chunks → synthesized Q&A → dedup → dataset folder.

Only orchestration lives here; every stage is a cached, retryable task in tasks/."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from doctune.logs import our_loggers_at_info
from doctune import artifacts
from doctune.llm import EndpointError, preflight, scrub
from doctune.prefect_utils import synthesis_runner, with_network_retries
from doctune.records import Dropped
from doctune.quality import check_stage, keep_rate_rows
from doctune.settings import BuildSettings
from tasks.dataset import write_dataset_task
from tasks.dedup import dedup_task
from tasks.ingest import discover
from tasks.prepare import prepare_batch_task
from tasks.synthesize import SynthResult, choose_mode_task, faq_chunks, probe_sample, synthesize_document_task
from tasks.cloze import cloze_task
from tasks.passages import passage_task
from tasks.replay import replay_task
from tasks.translate import translate_task

HUMAN_FIRST = {"faq": 0, "instruction": 1, "synthesized": 2, "translated": 3}


@task(task_run_name="preflight {llm.base_url}")
def preflight_task(llm) -> str:
    return preflight(llm)


def _usage(stage: str, result, state, reused: int = 0) -> dict:
    """A token-usage row: the calls and tokens `result` cost this run (none when `state` says it came
    from the cache), and how many task results were reused."""
    cached = state is not None and state.name == "Cached"
    cost = (lambda name: 0) if cached else (lambda name: getattr(result, name, 0))
    return {"stage": stage, "calls": cost("calls"), "failed_calls": cost("failed_calls"),
            "prompt_tokens": cost("prompt_tokens"), "completion_tokens": cost("completion_tokens"),
            "from_cache": reused + cached}


def _failure(stage: str, what: str, state) -> dict:
    # The task's message quotes the endpoint's reply, which may quote the key it was sent.
    return {"stage": stage, "document": what, "error": scrub(str(state.message))[:500]}


@flow(name="build_dataset", log_prints=True)
def build_dataset(folder: str = "data/docs", settings: BuildSettings = BuildSettings()) -> str:
    """Build a deduplicated, split Q&A dataset from a document folder; returns the dataset folder."""
    our_loggers_at_info()
    log = get_run_logger()
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folder={folder!r}: not a directory (resolved to {root})")
    out = Path(settings.output_dir).resolve()

    # 1-2. Ingest and chunk, a batch of files per task run, each file cached on its own content.
    refs = discover(root, settings.ingest)
    n = settings.ingest.files_per_task
    ingest_progress = create_progress_artifact(0.0, key="ingest-progress", description="Files ingested and chunked")
    prepared, from_cache = [], 0
    for i in range(0, len(refs), n):
        batch = prepare_batch_task(str(root), refs[i:i + n], settings.ingest, settings.chunk)
        prepared += batch.files
        from_cache += batch.from_cache
        update_progress_artifact(ingest_progress, 100.0 * min(i + n, len(refs)) / len(refs))
    update_progress_artifact(ingest_progress, 100.0)
    docs = [d for f in prepared for d in f.ingested.documents]
    given = [p for f in prepared for p in f.ingested.pairs]
    skipped = [s for f in prepared for s in f.ingested.skipped]
    chunks = {d.path: cs for f in prepared for d, cs in zip(f.ingested.documents, f.chunks)}
    all_chunks = [c for cs in chunks.values() for c in cs]
    artifacts.skipped_files(skipped, len(refs))
    artifacts.ingest_summary({"files": len(refs), "from the cache": from_cache, "read now": len(refs) - from_cache,
                              "documents": len(docs), "chunks": len(all_chunks), "ready-made pairs": len(given),
                              "skipped": len(skipped), "task runs": -(-len(refs) // n)})
    log.info("ingested %d files (%d from the cache): %d documents, %d chunks, %d ready-made pairs, %d skipped",
             len(refs), from_cache, len(docs), len(all_chunks), len(given), len(skipped))

    # 3. Synthesize, one cached task per document; the flow goes on when one fails. A FAQ export's
    #    answers get more questions too (fact mode): one wording per answer teaches the wording only.
    llm = settings.llm
    log.info(with_network_retries(preflight_task, llm)(llm))
    faq = faq_chunks(given) if settings.synth.faq_questions else []
    probed = with_network_retries(choose_mode_task, llm)(probe_sample(all_chunks + faq), llm, settings.synth,
                                                          return_state=True)
    choice = probed.result()
    artifacts.synthesis_mode(choice.mode, choice.reason, choice.skip_languages)
    log.info("synthesis mode %s: %s", choice.mode, choice.reason)
    for language, why in choice.skip_languages.items():
        log.warning("language %s skipped: %s", language, why)
    # Chunks of a language the endpoint cannot write are kept in dropped.jsonl, with the reason.
    not_synthesized = [Dropped(stage="synthesize", reason=f"language_not_written_by_endpoint:{c.language}",
                               record={"path": c.path, "chunk_id": c.chunk_id, "language": c.language,
                                       "text": c.text[:300]})
                       for c in all_chunks + faq if c.language in choice.skip_languages]
    jobs = [(path, cs, choice.mode) for path, cs in chunks.items()]
    faq_by_path: dict[str, list] = {}
    for c in faq:
        faq_by_path.setdefault(c.path, []).append(c)
    jobs += [(path, cs, "fact") for path, cs in faq_by_path.items()]
    jobs = [(path, [c for c in cs if c.language not in choice.skip_languages], mode) for path, cs, mode in jobs]
    jobs = [job for job in jobs if job[1]]
    progress = create_progress_artifact(0.0, key="synthesis-progress", description="Documents synthesized")
    synth, failures = SynthResult(), []
    made, reused = SynthResult(), 0  # what this run asked the endpoint; results taken from the cache
    # documents_at_once documents at a time, on threads or Dask; merged in document order, so the
    # dataset does not depend on which finished first.
    synthesize = with_network_retries(synthesize_document_task, llm)
    with synthesis_runner(settings.runner, settings.documents_at_once, settings.dask_address) as runner:
        futures = [runner.submit(synthesize, {"path": path, "chunks": cs, "llm": llm, "settings": settings.synth,
                                              "mode": mode})
                   for path, cs, mode in jobs]
        for i, _ in enumerate(as_completed(futures), start=1):
            update_progress_artifact(progress, 100.0 * i / len(futures))
        for (path, _, _), future in zip(jobs, futures):
            future.wait()  # sets the final state; before it, .state may still read Pending
            if future.state.is_completed():
                synth = synth.merge(future.result())
                if future.state.name == "Cached":
                    reused += 1
                else:
                    made = made.merge(future.result())
            else:
                failures.append(_failure("synthesize", path, future.state))
    update_progress_artifact(progress, 100.0)
    artifacts.failures(failures)
    if jobs and len(failures) == len(jobs):
        # An outage, not an empty folder: say so, and what a re-run will do.
        raise EndpointError(
            f"synthesis failed for all {len(jobs)} documents at the endpoint (base_url={llm.base_url!r}, "
            f"model={llm.model!r}), after {llm.max_retries} retries per call and {llm.task_retries} per document; "
            f"the documents are not the problem. First error: {failures[0]['error']}\n"
            "Fix: make the endpoint answer again (the error says what failed), then re-run: every document that "
            "finishes is cached, so a re-run synthesizes only the ones still missing.")
    n_returned = len(synth.pairs) + len(synth.dropped)
    rates = keep_rate_rows("synthesize", n_returned, synth.dropped)
    if all_chunks:
        check_stage("synthesize", n_returned, len(synth.pairs), synth.dropped, settings.synth, llm, failures)
    # Calls made by this run; a cached result cost nothing tonight ("from_cache" counts them).
    usage = [_usage("mode probe", choice, probed), _usage("synthesize", made, None, reused)]

    # 4. Translate (optional); originals are kept.
    pairs = sorted(given, key=lambda p: HUMAN_FIRST[p.source]) + synth.pairs
    dropped = list(synth.dropped) + not_synthesized
    # Translation and replay add to the dataset; when the endpoint fails them, the run goes on
    # without them (listed in failures) rather than throwing away what synthesis made.
    n_failures = len(failures)
    if settings.translate.enabled:
        state = with_network_retries(translate_task, llm)(pairs, llm, settings.translate, return_state=True)
        if state.is_completed():
            tr = state.result()
            pairs += tr.pairs
            dropped += tr.dropped
            rates += keep_rate_rows("translate", len(tr.pairs) + len(tr.dropped), tr.dropped)
            usage.append(_usage("translate", tr, state))
        else:
            failures.append(_failure("translate", f"all {len(pairs)} pairs", state))
            log.warning("translation failed; the dataset is built without it: %s", failures[-1]["error"])

    # 5. Replay: the model's own answers to general prompts, a settable share of the dataset.
    if settings.synth.replay_share > 0:
        n = round(len(pairs) * settings.synth.replay_share / (1 - settings.synth.replay_share))
        state = with_network_retries(replay_task, llm)(llm, sorted({p.language for p in pairs}), return_state=True)
        if state.is_completed():
            rp = state.result()
            pairs += rp.pairs[:n]
            dropped += rp.dropped
            usage.append(_usage("replay", rp, state))
        else:
            failures.append(_failure("replay", "replay prompts", state))
            log.warning("replay failed; the dataset is built without it: %s", failures[-1]["error"])
    if len(failures) > n_failures:
        artifacts.failures(failures)

    # 6. Passage pairs: each chunk's text, asked for by document and section (no LLM; any language).
    passages = passage_task(all_chunks, settings.synth.passage_questions)
    pairs += passages
    if passages:
        log.info("%d passage pairs from %d chunks", len(passages), len(all_chunks))

    # 7. Cloze questions: a value of each fact sentence replaced by a question word (no LLM; any mode).
    cloze = cloze_task(all_chunks + faq) if settings.synth.cloze_questions else []
    pairs += cloze
    if cloze:
        log.info("%d cloze questions from %d chunks", len(cloze), len(all_chunks + faq))

    # 8. Deduplicate: human-written sources come first, so they win over synthesized copies.
    dd = with_network_retries(dedup_task, llm)(pairs, settings.dedup, llm if settings.dedup.semantic else None)
    dropped += dd.dropped
    rates += keep_rate_rows("dedup", len(pairs), dd.dropped)
    check_stage("dedup", len(pairs), len(dd.kept), dd.dropped, settings.synth, llm)
    artifacts.dedup_counts(dd.counts)
    artifacts.keep_rates(rates)
    artifacts.dropped_examples(dropped)
    artifacts.usage(usage)
    artifacts.sample_pairs(dd.kept)

    # 9. Dataset folder, named after its content.
    counts = {"files": len(refs), "skipped_files": len(skipped), "documents": len(docs), "chunks": len(all_chunks),
              "given_pairs": len(given), "synthesized_pairs": len(synth.pairs), "passage_pairs": len(passages),
              "cloze_pairs": len(cloze),
              "after_dedup": len(dd.kept),
              "failed_documents": len(failures), "mode": choice.mode,
              "skipped_languages": sorted(choice.skip_languages), "chunks_not_synthesized": len(not_synthesized), **{f"dedup_{k}": v for k, v in dd.counts.items()}}
    path = write_dataset_task(dd.kept, dropped, counts, settings.dataset, str(out))
    artifacts.dataset_summary(path, (Path(path) / "card.md").read_text(encoding="utf-8"))
    print(f"dataset: {path}")
    return path
