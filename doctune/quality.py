"""Keep rates per filter, and the loud stop when a stage keeps too little to train on.

The second most common complaint in this field is "the filters silently dropped everything and
training then failed": here the flow stops before training with a message that names the stage,
the endpoint, a few dropped examples and the likely fix."""

from __future__ import annotations

from collections import Counter

from doctune.records import Dropped
from doctune.settings import LLMSettings, SynthSettings

FIXES = {
    "unparseable_reply": "the model does not return JSON; use synth.mode='fact' or a more capable model",
    "not_grounded": "answers are not found in the chunks; lower synth.min_groundedness or use a more capable model",
    "off_topic": "questions are about something else; try a more capable model or fewer questions_per_fact",
    "form_not_a_question": "replies are not questions; check the prompt template matches the model (chat template)",
    "wrong_language": "replies are in the wrong language; use an endpoint that writes this language "
                      "(the 135M default cannot write Chinese)",
    "echo_of_fact": "the model repeats the fact; lower synth.temperature or use a more capable model",
    "near_duplicate": "questions repeat each other; raise synth.temperature or dedup.near_threshold",
    "exact_duplicate": "the same pairs appear repeatedly; check for duplicated files",
    "conflicting_answers": "one question is asked of several different facts; a more capable model writes "
                           "more specific questions",
    "answer_leak": "questions already contain their answer; use a more capable model or fewer questions_per_fact",
    "wrong_question_type": "questions ask for something the fact does not say (how many people for a number "
                           "of days); use a more capable model",
}


class DatasetQualityError(RuntimeError):
    pass


def keep_rate_rows(stage: str, n_in: int, dropped: list[Dropped]) -> list[dict]:
    by_reason = Counter(d.reason for d in dropped if d.stage == stage)
    kept = n_in - sum(by_reason.values())
    rows = [{"stage": stage, "filter": r, "input": n_in, "dropped": c, "keep_rate": round(1 - c / n_in, 3) if n_in else 0}
            for r, c in by_reason.most_common()]
    rows.append({"stage": stage, "filter": "(all)", "input": n_in, "dropped": n_in - kept,
                 "keep_rate": round(kept / n_in, 3) if n_in else 0})
    return rows


def check_stage(stage: str, n_in: int, n_kept: int, dropped: list[Dropped], synth: SynthSettings,
                llm: LLMSettings, failures: list[dict] | None = None, examples: int = 3) -> None:
    """Raise DatasetQualityError when a stage kept too little; `failures`: documents whose calls
    failed at the endpoint (they returned nothing, so the fix is the endpoint, not the filters)."""
    share = n_kept / n_in if n_in else 0.0
    if n_in and share >= synth.min_keep_share and n_kept >= synth.min_pairs:
        return
    mine = [d for d in dropped if d.stage == stage]
    top = Counter(d.reason for d in mine).most_common(3)
    lines = [
        f"stage {stage!r} kept {n_kept} of {n_in} rows ({share:.0%}); the minimum is "
        f"{synth.min_keep_share:.0%} (synth.min_keep_share) and {synth.min_pairs} pairs (synth.min_pairs).",
        f"endpoint: base_url={llm.base_url!r}, model={llm.model!r}",
        "most common drop reasons: " + (", ".join(f"{r} ×{c}" for r, c in top) or "none (nothing came in)"),
    ]
    for d in mine[:examples]:
        q = d.record.get("question") or d.record.get("reply") or ""
        lines.append(f"  dropped ({d.reason}): {q[:120]!r}")
    fixes = [FIXES[r] for r, _ in top if r in FIXES]
    if failures:
        lines.append(f"{len(failures)} documents returned nothing because the endpoint failed (the failures "
                     f"artifact lists them); first: {failures[0]['document']}: {failures[0]['error'][:300]}")
        fixes.insert(0, "make the endpoint answer again and re-run (finished documents are cached)")
    lines.append("likely fix: " + ("; ".join(fixes) if fixes else
                                   "add documents, or check that the folder has readable text"))
    raise DatasetQualityError("\n".join(lines))
