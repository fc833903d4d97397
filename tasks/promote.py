"""Promotion: does tonight's candidate replace the model being served? Decided on the gold set when the
folder has gold questions, else on the exam the build made from the documents. Every comparison is paired
(the same questions, answered by both models) with a 95% interval from a bootstrap over the questions:

- against the base model (nothing promoted yet): the interval's lower end must reach promotion_margin;
- against the current model, scored on tonight's questions beside the candidate: questions about documents
  new or changed since the current model was trained must be answered better (lower end above 0), and on
  the other documents the candidate must not be worse by more than noninferiority_tolerance. A night without
  new or changed documents promotes only a clearly better candidate (lower end reaching promotion_margin), so
  reshuffling does not churn the served model.

On the exam, questions about the facts the closed loop gave material to in the candidate's dataset are left out
(drilled_exam_ids): the loop drills exactly those facts, so they would reward drilling, not learning the documents.

A candidate that forgot the base model's general answers (the forgetting check in tasks/evaluate.py) is not
promoted whatever it learned. Every decision is kept in the registry with its reason, and shown in the
Prefect UI."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from doctune.loop import LOOP_MODE
from doctune.records import read_jsonl
from doctune.registry import append_decision, read_current, write_current
from tasks.evaluate import EvalReport, MetricRow, in_prefect_run

RESAMPLES = 2000


class Part(BaseModel):
    """A paired comparison on some questions: mean gain of the candidate and its 95% bootstrap interval."""
    name: str
    n: int
    gain: float
    low: float
    high: float
    passed: bool
    rule: str

    def text(self) -> str:
        return (f"{self.name}: {self.gain:+.3f} [95% {self.low:+.3f}, {self.high:+.3f}] on {self.n} questions, "
                f"{'passes' if self.passed else 'fails'} ({self.rule})")


class Decision(BaseModel):
    promoted: bool
    reason: str
    compared_to: str = Field(description="'current:<run_dir>' or 'base:<model>'; '' when nothing was comparable.")
    candidate: str
    metric: str
    candidate_score: float | None
    reference_score: float | None
    margin: float
    eval_dir: str
    decided_at: str
    set: str | None = Field(None, description="'gold' or 'exam': the questions the decision was made on.")
    parts: list[Part] = Field(default_factory=list)
    # What the candidate was trained on and how (from its run.json), so the registry can tell
    # "documents unchanged" apart from "new data", and its scores on every set and language.
    dataset_dir: str | None = None
    dataset_sha256: str | None = None
    settings_sha256: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)


def paired_interval(diffs: list[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of paired differences (resampling questions)."""
    d = np.asarray(diffs, dtype=float)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(examples: list[dict], metric: str, reference: str, name: str, threshold: float, rule: str,
            strict: bool = False) -> Part:
    """Candidate minus `reference` ('base' or 'current') on the examples; passes when the interval's lower end
    reaches `threshold` (is above it, `strict`); `rule` says so in words."""
    diffs = [e["tuned"][metric] - e[reference][metric] for e in examples]
    low, high = paired_interval(diffs)
    gain = sum(diffs) / len(diffs)
    return Part(name=name, n=len(diffs), gain=round(gain, 4), low=round(low, 4), high=round(high, 4),
                passed=round(low, 9) > threshold if strict else round(low, 9) >= threshold, rule=rule)


def trained_documents(run_dir: str | Path) -> set[str] | None:
    """doc_ids of every document in the dataset a run was trained on (its chunk ids start with them), or
    None when that dataset folder is gone."""
    run_json = Path(run_dir) / "run.json"
    dataset = json.loads(run_json.read_text(encoding="utf-8")).get("dataset_dir") if run_json.exists() else None
    files = sorted(Path(dataset).glob("*.messages.jsonl")) if dataset and Path(dataset).is_dir() else []
    if not files:
        return None
    return {str(r.get("chunk_id") or "").split(":")[0] for f in files for r in read_jsonl(f)} - {""}


def drilled_exam_ids(report: EvalReport) -> set[str]:
    """The exam questions about facts the candidate's dataset holds closed-loop material for (rows of mode 'loop',
    in any split): empty when the dataset or the exam is gone or the loop made nothing."""
    hf = Path(report.dataset_dir) / "hf" if report.dataset_dir else None
    if not (report.exam_path and Path(report.exam_path).is_file() and hf and hf.is_dir()):
        return set()
    from datasets import load_from_disk

    facts = set()
    for split in load_from_disk(str(hf)).values():
        if "mode" in split.column_names:
            facts |= {(c, a) for m, c, a in zip(split["mode"], split["chunk_id"], split["answer"]) if m == LOOP_MODE}
    if not facts:
        return set()
    return {i["id"] for i in read_jsonl(report.exam_path) if (i.get("chunk_id"), i.get("answer")) in facts}


def without_drilled(row: MetricRow | None, examples: list[dict], metric: str) -> MetricRow | None:
    """The exam row recomputed over `examples` (the drilled questions already left out); None when none is left."""
    kept = [e for e in examples if e["set"] == "exam" and e.get("tuned", {}).get(metric) is not None]
    if row is None or not kept:
        return None
    mean = lambda side: round(sum(e[side][metric] for e in kept) / len(kept), 4)  # noqa: E731
    current = mean("current") if row.current is not None and all(e.get("current", {}).get(metric) is not None
                                                                  for e in kept) else None
    return row.model_copy(update={"n": len(kept), "base": mean("base"), "tuned": mean("tuned"), "current": current,
                                  "delta": round(mean("tuned") - mean("base"), 4)})


def _scored(examples: list[dict], set_name: str, metric: str, who: tuple[str, ...]) -> list[dict]:
    return [e for e in examples if e["set"] == set_name and all(e.get(w, {}).get(metric) is not None for w in who)]


def against_current(examples: list[dict], set_name: str, metric: str, current_run: str, margin: float,
                    tolerance: float) -> tuple[bool, list[Part], str]:
    scored = _scored(examples, set_name, metric, ("current", "tuned"))
    trained = trained_documents(current_run) if set_name == "exam" else None
    new = [e for e in scored if trained is not None and e.get("doc_id") and e["doc_id"] not in trained]
    old = [e for e in scored if e not in new]
    if not scored:
        return False, [], f"no {set_name} question with a {metric} for both models"
    if not new:
        why = ("no question is about a document new or changed since it was trained" if trained is not None else
               "which documents it was trained on is unknown (its dataset folder is gone)" if set_name == "exam" else
               "gold questions are not tied to documents")
        part = compare(old, metric, "current", "all questions", margin,
                       f"without new documents, the lower end must reach +{margin:.3f}")
        return part.passed, [part], why
    parts = [compare(new, metric, "current", "new or changed documents", 0.0, "better: the lower end must be above 0",
                     strict=True)]
    if old:
        parts.append(compare(old, metric, "current", "unchanged documents", -tolerance,
                             f"not worse: the lower end must reach -{tolerance:.3f}"))
    return all(p.passed for p in parts), parts, f"{len(new)} questions about new or changed documents"


def forgotten(general: dict, n: int = 3) -> str:
    """Why the forgetting check fails, naming the prompts that changed most."""
    worst = ", ".join(f"{r['prompt']!r} ({r['shift']:+.2f})" for r in general["rows"][:n] if r["shift"] is not None)
    return (f"but it forgot the base model's general answers: mean loss shift {general['mean_shift']:+.3f} "
            f"nats/token on them, tolerance {general['tolerance']:.3f} (forgetting_tolerance); most changed: {worst}. "
            "More replay (synth.replay_share) or fewer steps keep them")


def decide_promotion(report: EvalReport, registry_dir: str | Path, margin: float | None = None) -> Decision:
    """Promote the candidate only if it beats the current promoted model (or, when none, the base model in
    this report), as the module docstring says. Every decision is appended to decisions.jsonl; a promotion
    rewrites current.json atomically."""
    registry = Path(registry_dir)
    metric = report.settings.promotion_metric
    margin = report.settings.promotion_margin if margin is None else margin
    set_name = "gold" if report.get(metric, "gold") else "exam" if report.get(metric, "exam") else None
    row = report.get(metric, set_name) if set_name else None
    drilled = drilled_exam_ids(report) if set_name == "exam" else set()

    kept: list[dict] | None = None

    def examples() -> list[dict]:
        """examples.jsonl without the drilled questions, read once."""
        nonlocal kept
        if kept is None:
            kept = [e for e in read_jsonl(Path(report.eval_dir) / "examples.jsonl")
                    if not (e["set"] == "exam" and e["id"] in drilled)]
        return kept

    left_out = ""
    if drilled:
        row = without_drilled(row, examples(), metric)
        left_out = (f" ({len(drilled)} exam questions about facts the closed loop drilled left out; "
                    f"{row.n if row else 0} decide)")
    current = read_current(registry)
    candidate_score = row.tuned if row else None
    reference_score, compared_to, parts = None, "", []
    digest = {"gold": report.gold_sha256, "exam": report.exam_sha256}.get(set_name or "")
    if row is None and drilled:
        promoted, reason = False, (f"every exam question is about a fact the closed loop drilled{left_out}: the "
                                   "exam cannot tell what the candidate learnt; add gold questions to the folder's "
                                   "gold/*.jsonl, or turn the loop off (loop.max_rounds: 0)")
    elif row is None:
        promoted, reason = False, (f"no gold question and no exam question with a {metric} in {report.eval_dir}: "
                                   "nothing to compare; add gold questions to the folder's gold/*.jsonl, or build "
                                   "with the exam on (exam.enabled) so the documents make their own")
    elif current and current["run_dir"] == report.candidate:
        # Evaluating the current model again (say, on an edited gold file) refreshes its scores,
        # which is how a registry becomes comparable again after the gold set changed.
        promoted, reason = False, (f"{report.candidate} is already the current model; its scores in "
                                   f"{registry / 'current.json'} now come from {report.eval_dir}")
    elif current and report.current == current["run_dir"] and row.current is not None:
        reference_score, compared_to = row.current, f"current:{current['run_dir']}"
        promoted, parts, why = against_current(examples(), set_name, metric, current["run_dir"], margin,
                                               report.settings.noninferiority_tolerance)
        reason = (f"{set_name} {metric}: candidate {candidate_score:.3f} vs current {reference_score:.3f}, both "
                  f"answering tonight's questions ({why}); " + "; ".join(p.text() for p in parts))
    elif current and current.get(f"{set_name}_sha256") != digest:
        promoted, reason = False, (
            f"the current model {current['run_dir']} was scored on another {set_name} set (sha256 "
            f"{str(current.get(f'{set_name}_sha256'))[:12]} vs {str(digest)[:12]}) and not tonight, so its {metric} "
            f"is not comparable; evaluate with it as the current model (the evaluate flow does), or delete "
            f"{registry / 'current.json'} to compare against the base model again")
        compared_to = f"current:{current['run_dir']}"
    elif current and current.get("scores", {}).get(f"{set_name}/all/{metric}") is None:
        promoted, reason = False, (f"the current model {current['run_dir']} has no {set_name} {metric} score in "
                                   f"{registry / 'current.json'}; promote by another metric or re-evaluate it")
        compared_to = f"current:{current['run_dir']}"
    elif current:
        reference_score, compared_to = current["scores"][f"{set_name}/all/{metric}"], f"current:{current['run_dir']}"
        gain = round(candidate_score - reference_score, 9)  # 0.35 - 0.30 must count as 0.05
        promoted = gain >= margin
        reason = (f"{set_name} {metric}: candidate {candidate_score:.3f} vs current {reference_score:.3f} as "
                  f"recorded ({gain:+.3f}); promotion needs at least +{margin:.3f}")
    else:
        scored = _scored(examples(), set_name, metric, ("base", "tuned"))
        reference_score, compared_to = row.base, f"base:{report.base_model}"
        if not scored:
            raise ValueError(f"{report.eval_dir}/examples.jsonl holds no {set_name} example with a {metric} for both "
                             "models, though its report has one: the folder was changed by hand; evaluate again")
        parts = [compare(scored, metric, "base", "against the base", margin,
                         f"the lower end must reach +{margin:.3f}")]
        promoted = parts[0].passed
        reason = (f"{set_name} {metric}: candidate {candidate_score:.3f} vs base {reference_score:.3f}; "
                  + parts[0].text())
    reason += left_out if row is not None else ""
    if promoted and report.general and not report.general["passed"]:
        promoted, reason = False, reason + "; " + forgotten(report.general)
    run_json = Path(report.candidate) / "run.json"
    trained = json.loads(run_json.read_text(encoding="utf-8")) if run_json.exists() else {}
    decision = Decision(
        promoted=promoted, reason=reason, compared_to=compared_to, candidate=report.candidate, metric=metric,
        candidate_score=candidate_score, reference_score=reference_score, margin=margin, eval_dir=report.eval_dir,
        decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), set=set_name, parts=parts,
        dataset_dir=trained.get("dataset_dir"), dataset_sha256=trained.get("dataset_sha256"),
        settings_sha256=trained.get("settings_sha256"),
        scores={f"{m.set}/{m.language}/{m.metric}": m.tuned for m in report.metrics},
    )
    append_decision(registry, decision.model_dump(mode="json"))
    rescored = bool(current and current["run_dir"] == report.candidate and row is not None)
    if promoted or rescored:
        record = {
            "run_dir": report.candidate, "base_model": report.base_model, "metric": metric, "score": candidate_score,
            "set": set_name, "gold_sha256": report.gold_sha256, "exam_sha256": report.exam_sha256,
            "eval_dir": report.eval_dir,
            "dataset_sha256": decision.dataset_sha256, "settings_sha256": decision.settings_sha256,
            "promoted_at": decision.decided_at if promoted else current["promoted_at"],
            "previous": current["previous"] if rescored else (current["run_dir"] if current else None),
            "scores": decision.scores,
        }
        write_current(registry, record)
    return decision


def publish_decision_artifact(decision: Decision) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    verdict = "✅ promoted" if decision.promoted else "⛔ not promoted"
    create_markdown_artifact(
        f"## {verdict}: `{decision.candidate}`\n\n{decision.reason}\n\n"
        f"- compared to: `{decision.compared_to or '–'}`\n- decided on: {decision.set or '–'}\n"
        f"- evaluation: `{decision.eval_dir}/report.md`\n"
        + "".join(f"- {p.text()}\n" for p in decision.parts),
        key="promotion-decision", description="Did the candidate replace the current model?",
    )


# Never cached: the answer depends on the registry, which other runs change.
@task(cache_policy=NO_CACHE)
def promote_task(report: EvalReport, registry_dir: str, margin: float | None = None) -> Decision:
    decision = decide_promotion(report, registry_dir, margin)
    publish_decision_artifact(decision)
    return decision
