"""The promotion rule: a candidate replaces the current model only when it beats it (or the base model,
while none is promoted) on the gold set by the margin; every decision is kept in the registry."""

from __future__ import annotations

import json
from pathlib import Path

from doctune.model_settings import EvalSettings
from tasks.evaluate import EvalReport, MetricRow
from tasks.promote import decide_promotion


def make_report(tmp_path: Path, candidate: str, base: float, tuned: float, gold_sha: str = "g1") -> EvalReport:
    row = MetricRow(set="gold", language="all", metric="fact_recall", n=10, base=base, tuned=tuned,
                    delta=round(tuned - base, 4), better=0, worse=0)
    return EvalReport(
        name=candidate, eval_dir=str(tmp_path / "evals" / candidate), created="now", fingerprint="f",
        base_model="base", candidate=candidate, gold_path="gold.jsonl", gold_sha256=gold_sha, dataset_dir=None,
        settings=EvalSettings(), counts={"gold": 10, "test": 0, "dropped": 0}, dropped=[], metrics=[row],
    )


def decisions(registry: Path) -> list[dict]:
    return [json.loads(line) for line in (registry / "decisions.jsonl").read_text().splitlines()]


def test_promoted_over_base_when_no_current(tmp_path):
    registry = tmp_path / "registry"
    d = decide_promotion(make_report(tmp_path, "runs/r1", base=0.2, tuned=0.6), registry, margin=0.05)
    assert d.promoted and d.compared_to == "base:base"
    current = json.loads((registry / "current.json").read_text())
    assert current["run_dir"] == "runs/r1" and current["score"] == 0.6
    assert current["scores"]["gold/all/fact_recall"] == 0.6
    assert len(decisions(registry)) == 1 and not (registry / "current.json.tmp").exists()


def test_not_promoted_below_margin_and_reason_has_both_numbers(tmp_path):
    registry = tmp_path / "registry"
    d = decide_promotion(make_report(tmp_path, "runs/r1", base=0.30, tuned=0.33), registry, margin=0.05)
    assert not d.promoted
    assert "0.330" in d.reason and "0.300" in d.reason and "0.050" in d.reason
    assert not (registry / "current.json").exists()
    assert decisions(registry)[0]["promoted"] is False
    # Exactly the margin counts, despite 0.35 - 0.30 == 0.04999... in floating point.
    assert decide_promotion(make_report(tmp_path, "runs/r2", base=0.30, tuned=0.35), registry, margin=0.05).promoted


def test_not_promoted_when_current_model_is_better_than_base(tmp_path):
    registry = tmp_path / "registry"
    assert decide_promotion(make_report(tmp_path, "runs/r1", base=0.2, tuned=0.8), registry, margin=0.05).promoted
    # r2 beats the base by far, but not the current model r1.
    d = decide_promotion(make_report(tmp_path, "runs/r2", base=0.2, tuned=0.7), registry, margin=0.05)
    assert not d.promoted and d.compared_to == "current:runs/r1" and "0.800" in d.reason
    assert json.loads((registry / "current.json").read_text())["run_dir"] == "runs/r1"
    d3 = decide_promotion(make_report(tmp_path, "runs/r3", base=0.2, tuned=0.9), registry, margin=0.05)
    assert d3.promoted and json.loads((registry / "current.json").read_text())["previous"] == "runs/r1"
    assert [x["promoted"] for x in decisions(registry)] == [True, False, True]


def test_not_promoted_against_a_current_model_scored_on_another_gold_file(tmp_path):
    registry = tmp_path / "registry"
    decide_promotion(make_report(tmp_path, "runs/r1", base=0.2, tuned=0.5, gold_sha="old"), registry, margin=0.05)
    d = decide_promotion(make_report(tmp_path, "runs/r2", base=0.2, tuned=0.9, gold_sha="new"), registry, margin=0.05)
    assert not d.promoted and "another gold file" in d.reason
    # The fix the reason names: evaluate the current model on the new gold file, which re-scores it ...
    d = decide_promotion(make_report(tmp_path, "runs/r1", base=0.2, tuned=0.4, gold_sha="new"), registry, margin=0.05)
    assert not d.promoted and "already the current model" in d.reason
    current = json.loads((registry / "current.json").read_text())
    assert (current["run_dir"], current["score"], current["gold_sha256"]) == ("runs/r1", 0.4, "new")
    # ... after which candidates are compared with it again.
    assert decide_promotion(make_report(tmp_path, "runs/r2", base=0.2, tuned=0.9, gold_sha="new"), registry,
                            margin=0.05).promoted
