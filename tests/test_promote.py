"""The promotion rule: a candidate replaces the current model only when it beats it (or the base model,
while none is promoted) on the gold set by the margin; every decision is kept in the registry."""

from __future__ import annotations

import json
from pathlib import Path

from doctune.model_settings import EvalSettings
from tasks.evaluate import EvalReport, MetricRow
from doctune.records import write_jsonl
from tasks.promote import decide_promotion, paired_interval


def make_report(tmp_path: Path, candidate: str, base: float, tuned: float, gold_sha: str = "g1") -> EvalReport:
    """A gold-set report whose 10 examples all score `base` and `tuned` (a constant paired gain)."""
    row = MetricRow(set="gold", language="all", metric="fact_recall", n=10, base=base, tuned=tuned,
                    delta=round(tuned - base, 4), better=0, worse=0)
    eval_dir = tmp_path / "evals" / candidate
    write_jsonl(eval_dir / "examples.jsonl", [{"set": "gold", "id": f"g{i}", "language": "en",
                                               "base": {"fact_recall": base}, "tuned": {"fact_recall": tuned}}
                                              for i in range(10)])
    return EvalReport(
        name=candidate, eval_dir=str(eval_dir), created="now", fingerprint="f",
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
    assert not d.promoted and "another gold set" in d.reason
    # The fix the reason names: evaluate the current model on the new gold file, which re-scores it ...
    d = decide_promotion(make_report(tmp_path, "runs/r1", base=0.2, tuned=0.4, gold_sha="new"), registry, margin=0.05)
    assert not d.promoted and "already the current model" in d.reason
    current = json.loads((registry / "current.json").read_text())
    assert (current["run_dir"], current["score"], current["gold_sha256"]) == ("runs/r1", 0.4, "new")
    # ... after which candidates are compared with it again.
    assert decide_promotion(make_report(tmp_path, "runs/r2", base=0.2, tuned=0.9, gold_sha="new"), registry,
                            margin=0.05).promoted


# ----------------------------------------------------------------------------- the exam, and the current model
# scored beside the candidate on tonight's questions


def test_paired_interval_brackets_the_mean_and_is_zero_wide_for_a_constant_gain():
    low, high = paired_interval([0.0, 1.0] * 20)
    assert low < 0.5 < high and high - low < 0.4
    assert paired_interval([0.25] * 7) == (0.25, 0.25)


def current_run(tmp_path: Path, name: str, trained_docs: list[str]) -> str:
    """A run folder whose dataset holds chunks of `trained_docs`."""
    dataset, run = tmp_path / "datasets" / f"ds-{name}", tmp_path / "models" / name
    write_jsonl(dataset / "train.messages.jsonl", [{"chunk_id": f"{d}:0", "messages": []} for d in trained_docs])
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"dataset_dir": str(dataset)}))
    return str(run)


def exam_report(tmp_path: Path, candidate: str, rows: list[tuple[str, float, float, float]],
                current: str | None = None) -> EvalReport:
    """An exam-only report; rows: (doc_id, base, current, tuned) fact recall per question."""
    examples = [{"set": "exam", "id": f"e{i}", "language": "en", "doc_id": doc, "base": {"fact_recall": b},
                 "tuned": {"fact_recall": t}, **({"current": {"fact_recall": c}} if current else {})}
                for i, (doc, b, c, t) in enumerate(rows)]
    eval_dir = tmp_path / "evals" / Path(candidate).name
    write_jsonl(eval_dir / "examples.jsonl", examples)
    mean = lambda k: round(sum(r[k] for r in rows) / len(rows), 4)  # noqa: E731
    row = MetricRow(set="exam", language="all", metric="fact_recall", n=len(rows), base=mean(1), tuned=mean(3),
                    delta=round(mean(3) - mean(1), 4), better=0, worse=0, current=mean(2) if current else None)
    return EvalReport(name=Path(candidate).name, eval_dir=str(eval_dir), created="now", fingerprint="f",
                      base_model="base", candidate=candidate, gold_path=None, gold_sha256=None,
                      exam_path="exam.jsonl", exam_sha256="x", current=current, dataset_dir=None,
                      settings=EvalSettings(), counts={"gold": 0, "exam": len(rows), "test": 0, "dropped": 0},
                      dropped=[], metrics=[row])


def test_the_exam_decides_without_gold_and_the_first_promotion_needs_the_interval_above_the_margin(tmp_path):
    registry = tmp_path / "registry"
    noisy = [("d1", 0.0, 0.0, 1.0), ("d1", 0.0, 0.0, 0.0), ("d2", 1.0, 0.0, 0.0), ("d2", 0.0, 0.0, 0.0)]
    d = decide_promotion(exam_report(tmp_path, "runs/noise", noisy), registry, margin=0.05)
    assert not d.promoted and d.set == "exam" and "95%" in d.reason and d.parts[0].n == 4
    clear = [("d1", 0.0, 0.0, 1.0)] * 12 + [("d2", 0.0, 0.0, 0.5)] * 8
    d = decide_promotion(exam_report(tmp_path, "runs/clear", clear), registry, margin=0.05)
    assert d.promoted and d.parts[0].low >= 0.05
    current = json.loads((registry / "current.json").read_text())
    assert (current["set"], current["exam_sha256"]) == ("exam", "x")


def test_one_new_document_among_twenty_can_promote_and_a_reshuffle_cannot(tmp_path):
    registry = tmp_path / "registry"
    old_docs = [f"d{i}" for i in range(20)]
    first = current_run(tmp_path, "first", old_docs)
    registry.mkdir()
    (registry / "current.json").write_text(json.dumps({"run_dir": first, "promoted_at": "then", "previous": None,
                                                       "scores": {}}))
    unchanged = [(d, 0.0, 1.0, 1.0) for d in old_docs for _ in range(3)]
    # Tonight adds d20; the candidate knows it, the current model cannot.
    added = unchanged + [("d20", 0.0, 0.0, 1.0)] * 3
    d = decide_promotion(exam_report(tmp_path, "runs/grown", added, current=first), registry, margin=0.05)
    assert d.promoted, d.reason
    assert [p.name for p in d.parts] == ["new or changed documents", "unchanged documents"]
    assert d.parts[0].n == 3 and d.parts[1].n == 60 and "not worse" in d.reason
    # The same documents again, retrained with no gain: the served model stays.
    grown = json.loads((registry / "current.json").read_text())["run_dir"]
    assert grown == "runs/grown"
    (registry / "current.json").write_text(json.dumps({"run_dir": first, "promoted_at": "then", "previous": None,
                                                       "scores": {}}))
    d = decide_promotion(exam_report(tmp_path, "runs/reshuffled", unchanged, current=first), registry, margin=0.05)
    assert not d.promoted and "no question is about a document new or changed" in d.reason


def test_a_candidate_that_forgets_unchanged_documents_is_not_promoted_for_a_new_one(tmp_path):
    registry = tmp_path / "registry"
    first = current_run(tmp_path, "first", ["a", "b"])
    registry.mkdir()
    (registry / "current.json").write_text(json.dumps({"run_dir": first, "promoted_at": "then", "previous": None,
                                                       "scores": {}}))
    rows = [("a", 0.0, 1.0, 0.0)] * 5 + [("b", 0.0, 1.0, 1.0)] * 5 + [("c", 0.0, 0.0, 1.0)] * 4
    d = decide_promotion(exam_report(tmp_path, "runs/forgetful", rows, current=first), registry, margin=0.05)
    assert not d.promoted and d.parts[0].passed and not d.parts[1].passed
    assert d.parts[1].text().startswith("unchanged documents: -0.500")


def test_gold_decides_when_the_folder_has_both(tmp_path):
    report = make_report(tmp_path, "runs/r1", base=0.0, tuned=0.0)
    exam = exam_report(tmp_path, "runs/r1", [("d1", 0.0, 0.0, 1.0)] * 10)
    both = report.model_copy(update={"metrics": report.metrics + exam.metrics, "exam_sha256": "x"})
    d = decide_promotion(both, tmp_path / "registry", margin=0.05)
    assert not d.promoted and d.set == "gold"


def test_a_candidate_that_forgot_the_general_prompts_is_not_promoted_whatever_it_learned(tmp_path):
    report = make_report(tmp_path, "runs/r1", base=0.0, tuned=0.9)
    rows = [{"prompt": "What is 27 plus 38?", "shift": 2.5}, {"prompt": "什么是光合作用？", "shift": 0.4}]
    general = {"prompts": 2, "mean_shift": 1.45, "tolerance": 1.0, "passed": False, "rows": rows}
    d = decide_promotion(report.model_copy(update={"general": general}), tmp_path / "registry", margin=0.05)
    assert not d.promoted and "forgot" in d.reason and "'What is 27 plus 38?' (+2.50)" in d.reason
    kept = {**general, "mean_shift": 0.2, "passed": True}
    assert decide_promotion(make_report(tmp_path, "runs/r2", base=0.0, tuned=0.9).model_copy(
        update={"general": kept}), tmp_path / "registry", margin=0.05).promoted


def drilled_dataset(tmp_path: Path, n: int, drilled: range) -> tuple[Path, Path]:
    """A dataset whose hf/ holds loop rows for the facts of exam questions e<i>, i in `drilled`, and the exam."""
    from datasets import Dataset, DatasetDict

    rows = [{"chunk_id": f"d1:{i}", "answer": f"Fact {i}.", "mode": "loop" if i in drilled else "fact"}
            for i in range(n)]
    dataset = tmp_path / "datasets" / "ds-looped"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(dataset / "hf"))
    exam = dataset / "exam.jsonl"
    write_jsonl(exam, [{"id": f"e{i}", "chunk_id": f"d1:{i}", "answer": f"Fact {i}."} for i in range(n)])
    return dataset, exam


def test_exam_questions_about_facts_the_loop_drilled_do_not_decide(tmp_path):
    # The candidate answers the 8 drilled facts' questions and none of the 12 others better than the base.
    rows = [("d1", 0.0, 0.0, 1.0)] * 8 + [("d1", 0.5, 0.0, 0.5)] * 12
    dataset, exam = drilled_dataset(tmp_path, 20, range(8))
    report = exam_report(tmp_path, "runs/drilled", rows).model_copy(
        update={"dataset_dir": str(dataset), "exam_path": str(exam)})
    d = decide_promotion(report, tmp_path / "registry", margin=0.05)
    assert not d.promoted and d.parts[0].n == 12 and d.parts[0].gain == 0
    assert "8 exam questions about facts the closed loop drilled left out; 12 decide" in d.reason
    assert d.candidate_score == 0.5 and d.reference_score == 0.5
    # Without loop rows in the dataset, every question counts, and the drilled gain would have promoted.
    plain, exam = drilled_dataset(tmp_path / "plain", 20, range(0))
    d = decide_promotion(report.model_copy(update={"dataset_dir": str(plain), "exam_path": str(exam)}),
                         tmp_path / "registry2", margin=0.05)
    assert d.promoted and d.parts[0].n == 20 and "drilled" not in d.reason
    # Every question drilled: nothing can decide on the exam, and the reason says what to do.
    everything, exam = drilled_dataset(tmp_path / "all", 20, range(20))
    d = decide_promotion(report.model_copy(update={"dataset_dir": str(everything), "exam_path": str(exam)}),
                         tmp_path / "registry3", margin=0.05)
    assert not d.promoted and "every exam question is about a fact the closed loop drilled" in d.reason
