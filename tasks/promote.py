"""Promotion: does tonight's candidate replace the model being served? Only when it beats it (or, while
none is promoted, the base model) on the gold set by a margin; every decision is kept in the registry
with its reason, and shown in the Prefect UI."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from doctune.registry import append_decision, read_current, write_current
from tasks.evaluate import EvalReport, in_prefect_run


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
    # What the candidate was trained on and how (from its run.json), so the registry can tell
    # "documents unchanged" apart from "new data", and its scores on every set and language.
    dataset_dir: str | None = None
    dataset_sha256: str | None = None
    settings_sha256: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)


def decide_promotion(report: EvalReport, registry_dir: str | Path, margin: float | None = None) -> Decision:
    """Promote the candidate only if it beats the current promoted model (or, when none, the base
    model in this report) on the gold set by at least `margin`. Every decision is appended to
    decisions.jsonl; a promotion rewrites current.json atomically."""
    registry = Path(registry_dir)
    metric = report.settings.promotion_metric
    margin = report.settings.promotion_margin if margin is None else margin
    row = report.get(metric, "gold")
    current = read_current(registry)
    candidate_score = row.tuned if row else None
    reference_score, compared_to = None, ""
    if row is None:
        promoted, reason = False, (f"no gold-set {metric} in {report.eval_dir}: nothing to compare; add questions "
                                   "with facts to the gold file")
    elif current and current["run_dir"] == report.candidate:
        # Evaluating the current model again (say, on an edited gold file) refreshes its scores,
        # which is how a registry becomes comparable again after the gold set changed.
        promoted, reason = False, (f"{report.candidate} is already the current model; its scores in "
                                   f"{registry / 'current.json'} now come from {report.eval_dir}")
    elif current and current.get("gold_sha256") != report.gold_sha256:
        promoted, reason = False, (
            f"the current model {current['run_dir']} was scored on another gold file (sha256 "
            f"{str(current.get('gold_sha256'))[:12]} vs {str(report.gold_sha256)[:12]}), so its {metric} is not "
            f"comparable; evaluate {current['run_dir']} on this gold file and decide on that report (it updates "
            f"{registry / 'current.json'}), or delete that file to compare against the base model again")
        compared_to = f"current:{current['run_dir']}"
    elif current and current.get("scores", {}).get(f"gold/all/{metric}") is None:
        promoted, reason = False, (f"the current model {current['run_dir']} has no gold {metric} score in "
                                   f"{registry / 'current.json'}; promote by another metric or re-evaluate it")
        compared_to = f"current:{current['run_dir']}"
    else:
        if current:
            reference_score, compared_to = current["scores"][f"gold/all/{metric}"], f"current:{current['run_dir']}"
        else:
            reference_score, compared_to = row.base, f"base:{report.base_model}"
        gain = round(candidate_score - reference_score, 9)  # 0.35 - 0.30 must count as 0.05
        promoted = gain >= margin
        reason = (f"gold {metric}: candidate {candidate_score:.3f} vs {compared_to.split(':')[0]} "
                  f"{reference_score:.3f} ({gain:+.3f}); promotion needs at least +{margin:.3f}")
    run_json = Path(report.candidate) / "run.json"
    trained = json.loads(run_json.read_text(encoding="utf-8")) if run_json.exists() else {}
    decision = Decision(
        promoted=promoted, reason=reason, compared_to=compared_to, candidate=report.candidate, metric=metric,
        candidate_score=candidate_score, reference_score=reference_score, margin=margin, eval_dir=report.eval_dir,
        decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dataset_dir=trained.get("dataset_dir"), dataset_sha256=trained.get("dataset_sha256"),
        settings_sha256=trained.get("settings_sha256"),
        scores={f"{m.set}/{m.language}/{m.metric}": m.tuned for m in report.metrics},
    )
    append_decision(registry, decision.model_dump(mode="json"))
    rescored = bool(current and current["run_dir"] == report.candidate and row is not None)
    if promoted or rescored:
        record = {
            "run_dir": report.candidate, "base_model": report.base_model, "metric": metric, "score": candidate_score,
            "gold_sha256": report.gold_sha256, "eval_dir": report.eval_dir,
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
        f"- compared to: `{decision.compared_to or '–'}`\n- evaluation: `{decision.eval_dir}`\n",
        key="promotion-decision", description="Did the candidate replace the current model?",
    )


# Never cached: the answer depends on the registry, which other runs change.
@task(cache_policy=NO_CACHE)
def promote_task(report: EvalReport, registry_dir: str, margin: float | None = None) -> Decision:
    decision = decide_promotion(report, registry_dir, margin)
    publish_decision_artifact(decision)
    return decision
