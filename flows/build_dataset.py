"""build_dataset: document folder → chunks → synthesized Q&A → dedup → dataset folder.

Only orchestration lives here; every stage is a cached, retryable task in tasks/, and the steps that
take more than one call (batches, per-document synthesis, failure policy) are in flows/build_steps.py."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from doctune import artifacts
from doctune.exam import ExamSettings, exam_table, write_exam
from doctune.key_names import check_key_names
from doctune.llm import preflight
from doctune.loop import LoopSettings
from doctune.logs import our_loggers_at_info
from doctune.prefect_utils import with_network_retries
from doctune.quality import check_stage, keep_rate_rows
from doctune.records import Dropped
from doctune.settings import BuildSettings
from flows.build_steps import (exam_documents, ingest_folder, loop_material, optional_stage, rewrite_documents,
                               stop_if_every_document_failed, synthesis_jobs, synthesize_documents, usage_row)
from tasks.cloze import cloze_task
from tasks.dataset import text_rows, write_dataset_task
from tasks.variants import variant_rows
from tasks.dedup import dedup_task
from tasks.exam import hold_out
from tasks.passages import passage_task
from tasks.replay import replay_task
from tasks.synthesize import choose_mode_task, faq_chunks, probe_sample
from tasks.translate import translate_task

HUMAN_FIRST = {"faq": 0, "instruction": 1, "synthesized": 2, "translated": 3}


@task(task_run_name="preflight {llm.base_url}")
def preflight_task(llm) -> str:
    return preflight(llm)


@flow(name="build_dataset", log_prints=True)
def build_dataset(folder: str = "data/docs", settings: BuildSettings = BuildSettings(),
                  exam: ExamSettings = ExamSettings(), loop: LoopSettings = LoopSettings(),
                  loop_registry: str | None = None) -> str:
    """Build a deduplicated, split Q&A dataset from a document folder, and the exam beside it; returns the
    dataset folder. loop_registry: a model's registry folder whose loop.json names the facts its served model
    missed on the exam (the nightly passes it): they get more questions, none near an exam question."""
    our_loggers_at_info()
    log = get_run_logger()
    check_key_names(settings)  # a key pasted where its variable's name belongs: refused before anything runs
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folder={folder!r}: not a directory (resolved to {root})")
    out = Path(settings.output_dir).resolve()

    # 0. The endpoint first: a wrong base_url or key fails in seconds, not after the folder is read.
    llm = settings.llm
    log.info(with_network_retries(preflight_task, llm)(llm))

    # 1-2. Ingest and chunk, a batch of files per task run, each file cached on its own content.
    prep = ingest_folder(root, settings)
    all_chunks = prep.all_chunks

    # 3. Synthesize, one cached task per document; the flow goes on when one fails. A FAQ export's
    #    answers get more questions too (fact mode): one wording per answer teaches the wording only.
    faq = faq_chunks(prep.given) if settings.synth.faq_questions else []
    if len(faq) > settings.synth.faq_max_answers:
        log.warning("FAQ exports: %d answers; the first %d get more questions (synth.faq_max_answers), the rest "
                    "keep only their own pair", len(faq), settings.synth.faq_max_answers)
        faq = faq[:settings.synth.faq_max_answers]
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
    jobs = synthesis_jobs(prep.chunks, faq, choice.mode, choice.skip_languages)
    synthesized = synthesize_documents(jobs, llm, settings)
    synth, failures = synthesized.result, synthesized.failures
    artifacts.failures(failures)
    stop_if_every_document_failed(jobs, synthesized, llm)
    n_returned = len(synth.pairs) + len(synth.dropped)
    rates = keep_rate_rows("synthesize", n_returned, synth.dropped)
    if all_chunks:
        check_stage("synthesize", n_returned, len(synth.pairs), synth.dropped, settings.synth, llm, failures)
    # Calls made by this run; a cached result cost nothing tonight ("from_cache" counts them).
    usage = [usage_row("mode probe", choice, probed),
             usage_row("synthesize", synthesized.made, None, synthesized.reused)]

    # 3b. The exam: questions about every document, worded apart from training (tasks/exam.py). Only a
    #     whole exam is written: a document whose exam failed would leave it silently smaller.
    made = exam_documents(prep.chunks, faq, llm, exam, sorted(choice.skip_languages)) if exam.enabled else None
    if made is not None:
        usage.append(usage_row("exam", made.made, None, made.reused))
        failures += made.failures
        if made.failures:
            log.warning("no exam tonight: %d documents failed (see the failures artifact)", len(made.failures))
            artifacts.failures(failures)
            made = None

    # 3c. The loop: more questions for the facts the served model missed on the exam (tasks/loop.py).
    looped = None
    if loop_registry and made is not None:
        # the reserves too: any of them may be asked tonight in place of an exam question
        looped = loop_material(loop_registry, prep.chunks, faq, made.items + made.reserves, llm, loop, settings.dedup,
                               sorted(choice.skip_languages))
        if looped is not None:
            usage.append(usage_row("loop", looped.made, None, looped.reused))
            if looped.failures:
                failures += looped.failures
                artifacts.failures(failures)
            artifacts.loop_material(looped.rows, loop_registry)

    # 3d. Rewrites: each chunk retold by the endpoint in rewrite.styles, as more text rows (tasks/rewrite.py).
    #     They only add to the dataset: a document whose rewrites failed is a failure row, and the build goes on.
    rewritten = None
    if settings.dataset.text_rows and settings.rewrite.styles:
        rewritten = rewrite_documents(prep.chunks, llm, settings.rewrite, sorted(choice.skip_languages))
        usage.append(usage_row("rewrite", rewritten.made, None, rewritten.reused))
        if rewritten.failures:
            failures += rewritten.failures
            artifacts.failures(failures)

    # 4. Translate (optional); originals are kept. Translation and replay only add to the dataset:
    #    when the endpoint fails them, the run goes on without them (listed in failures).
    pairs = sorted(prep.given, key=lambda p: HUMAN_FIRST[p.source]) + synth.pairs
    dropped = list(synth.dropped) + not_synthesized
    if rewritten is not None:
        dropped += rewritten.result.dropped
        rates += keep_rate_rows("rewrite", len(rewritten.result.rows) + len(rewritten.result.dropped),
                                rewritten.result.dropped)
    n_failures = len(failures)
    if settings.translate.enabled:
        tr = optional_stage("translate", f"all {len(pairs)} pairs", translate_task, llm, pairs, llm,
                            settings.translate, failures=failures, usage=usage)
        if tr is not None:
            pairs += tr.pairs
            dropped += tr.dropped
            rates += keep_rate_rows("translate", len(tr.pairs) + len(tr.dropped), tr.dropped)

    # 5. Replay: the model's own answers to general prompts, a settable share of the dataset.
    if settings.synth.replay_share > 0:
        n = round(len(pairs) * settings.synth.replay_share / (1 - settings.synth.replay_share))
        rp = optional_stage("replay", "replay prompts", replay_task, llm, llm, sorted({p.language for p in pairs}),
                            failures=failures, usage=usage)
        if rp is not None:
            pairs += rp.pairs[:n]
            dropped += rp.dropped
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

    if looped is not None:
        pairs += looped.result.pairs
        dropped += looped.result.dropped

    # 8. Deduplicate: human-written sources come first, so they win over synthesized copies.
    dd = with_network_retries(dedup_task, llm)(pairs, settings.dedup, llm if settings.dedup.semantic else None)
    dropped += dd.dropped
    rates += keep_rate_rows("dedup", len(pairs), dd.dropped)
    check_stage("dedup", len(pairs), len(dd.kept), dd.dropped, settings.synth, llm)
    kept, exam_items = dd.kept, []
    if made is not None:  # no exam question was seen in training
        held = hold_out(made.items, dd.kept, settings.dedup, made.reserves)
        kept, exam_items, dropped = held.pairs, held.items, dropped + made.dropped + held.dropped
        rates += keep_rate_rows("exam", len(dd.kept), [d for d in held.dropped if d.reason == "held_out_for_exam"])
    artifacts.dedup_counts(dd.counts)
    artifacts.keep_rates(rates)
    artifacts.dropped_examples(dropped)
    artifacts.usage(usage)
    artifacts.sample_pairs(kept)

    # 9. Dataset folder, named after its content.
    counts = {"files": prep.files, "skipped_files": len(prep.skipped), "documents": len(prep.documents),
              "chunks": len(all_chunks), "given_pairs": len(prep.given), "synthesized_pairs": len(synth.pairs),
              "passage_pairs": len(passages), "cloze_pairs": len(cloze), "after_dedup": len(dd.kept),
              **({"loop_pairs": len(looped.result.pairs)} if looped is not None else {}),
              "exam_questions": len(exam_items), "held_out_for_exam": len(dd.kept) - len(kept),
              "failed_documents": len(failures), "mode": choice.mode,
              "skipped_languages": sorted(choice.skip_languages), "chunks_not_synthesized": len(not_synthesized),
              **{f"dedup_{k}": v for k, v in dd.counts.items()}}
    texts = text_rows(all_chunks) if settings.dataset.text_rows else []
    if texts and settings.dataset.variants:
        texts += variant_rows(all_chunks, prep.given, settings.dataset.permutations, settings.dataset.seed)
    if rewritten is not None:
        texts += rewritten.result.rows
    counts["text_rows"] = len(texts)
    path = write_dataset_task(kept, dropped, counts, settings.dataset, str(out), texts)
    artifacts.dataset_summary(path, (Path(path) / "card.md").read_text(encoding="utf-8"))
    if made is not None:
        exam_file, written = write_exam(path, exam_items)
        log.info("exam: %s (%s)", exam_file, f"{len(exam_items)} questions" if written else
                 "kept as it was: delete it to have it written again")
        documents = list(dict.fromkeys([*prep.chunks, *(c.path for c in faq)]))
        artifacts.exam(exam_table(exam_items, documents), str(exam_file), choice.skip_languages,
                       len(dd.kept) - len(kept))
    print(f"dataset: {path}")
    return path
