"""Artifacts a person reads in the Prefect UI. Keys are stable so the UI shows their history
across nightly runs. Nothing here may contain a secret: settings only name where keys live."""

from __future__ import annotations

from collections import Counter

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from doctune.records import Dropped, QAPair, SkippedFile


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def skipped_files(skipped: list[SkippedFile], n_files: int) -> None:
    rows = [{"file": s.path, "reason": s.reason} for s in skipped] or [{"file": "-", "reason": "none skipped"}]
    create_table_artifact(rows, key="skipped-files",
                          description=f"{len(skipped)} of {n_files} files skipped or partly unreadable")


def ingest_summary(counts: dict) -> None:
    create_table_artifact([{"what": k, "count": v} for k, v in counts.items()], key="ingest",
                          description="Files ingested and chunked; 'from the cache' were unchanged since a run before")


def synthesis_mode(mode: str, reason: str, skip_languages: dict[str, str] | None = None) -> None:
    text = f"## Synthesis mode: `{mode}`\n\n{reason}\n"
    if skip_languages:
        text += "\n### Languages not synthesized\n\n" + "".join(
            f"- **{language}**: {why}\n" for language, why in sorted(skip_languages.items()))
    create_markdown_artifact(text, key="synthesis-mode", description="Which synthesis mode ran and why")


def keep_rates(stage_rows: list[dict]) -> None:
    """stage_rows: {stage, filter, input, kept/dropped, keep_rate}."""
    create_table_artifact(stage_rows, key="keep-rates", description="Rows dropped and keep rate per filter")


def dropped_examples(dropped: list[Dropped], per_reason: int = 3) -> None:
    seen: Counter = Counter()
    rows = []
    for d in dropped:
        key = f"{d.stage}:{d.reason}"
        if seen[key] >= per_reason:
            continue
        seen[key] += 1
        rec = d.record
        rows.append({"stage": d.stage, "reason": d.reason, "question": _short(rec.get("question", rec.get("reply", rec.get("text", "")))),
                     "answer": _short(rec.get("answer", "")), "duplicate_of": d.duplicate_of or "",
                     "source": rec.get("chunk_id") or rec.get("path") or ""})
    create_table_artifact(rows or [{"stage": "-", "reason": "nothing dropped"}], key="dropped-examples",
                          description=f"Up to {per_reason} dropped rows per reason")


def sample_pairs(pairs: list[QAPair], n: int = 25) -> None:
    step = max(1, len(pairs) // n)
    rows = [{"question": _short(p.question), "answer": _short(p.answer), "source": p.source,
             "file": p.path or "", "chunk": p.chunk_id or "", "mode": p.mode or "", "model": p.model or ""}
            for p in pairs[::step][:n]]
    create_table_artifact(rows, key="sample-pairs", description=f"{len(rows)} of {len(pairs)} pairs, with sources")


def dedup_counts(counts: dict) -> None:
    create_table_artifact([{"what": k, "rows": v} for k, v in counts.items()], key="dedup-counts",
                          description="Deduplication counts per reason")


def usage(rows: list[dict]) -> None:
    create_table_artifact(rows, key="token-usage", description="LLM calls and tokens per stage")


def failures(rows: list[dict]) -> None:
    create_table_artifact(rows or [{"stage": "-", "document": "-", "error": "no failures"}], key="failures",
                          description="What failed at the endpoint after every retry; a re-run retries only these")


def dataset_summary(path: str, card: str) -> None:
    create_markdown_artifact(f"Dataset folder: `{path}`\n\n{card}", key="dataset", description="The dataset written")


def exam(rows: list[dict], path: str, skip_languages: dict[str, str], held_out: int) -> None:
    """The exam per document (doctune/exam.exam_table): a person sees what it asks about each file."""
    ruled = "".join(f" {language}: questions by rule, as the endpoint does not write it ({_short(why, 120)})."
                    for language, why in sorted(skip_languages.items()))
    create_table_artifact(rows, key="exam", description=f"{sum(r['questions'] for r in rows)} exam questions in "
                          f"{path}; {held_out} training questions held out as their twins.{ruled}")


def loop_material(rows: list[dict], registry: str) -> None:
    """Per missed fact: the round, the new questions kept, and those dropped near the exam or by the checks."""
    kept = sum(r["new questions"] for r in rows)
    create_table_artifact(rows, key="loop-material", description=f"{kept} new questions for {len(rows)} facts the "
                          f"last candidate missed on the exam ({registry}/loop.json); none near an exam question.")


def loop_rounds(rows: list[dict], registry: str, key: str = "loop-rounds") -> None:
    """The loop's rounds per document: facts, what each round gained, and whether the document goes on."""
    create_table_artifact(rows or [{"document": "-", "round": 0, "facts": 0, "gained": "-",
                                    "status": "no exam question missed: no round"}],
                          key=key, description=f"The closed loop's rounds ({registry}/loop.json): a "
                          "document stops when a round gained nothing or after loop.max_rounds rounds.")
