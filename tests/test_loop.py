"""The closed loop's rounds (doctune/loop.py) and its material (tasks/loop.py)."""

from __future__ import annotations

import json

from doctune.loop import LoopSettings, after_evaluation, close_without_training, loop_targets, missed, read_loop
from doctune.records import Chunk
from doctune.settings import DedupSettings, LLMSettings
from tasks.dedup import jaccard, normalize, shingles
from tasks.loop import LoopTarget, away_from_exam, framed, make_material
from tests.endpoints import ScriptedEndpoint

EXAM = [  # two documents, three facts
    {"id": "e1", "doc_id": "A", "chunk_id": "A:0", "path": "a.md", "language": "en", "question": "When does Brekke open?",
     "answer": "The Brekke office opens at 7:45 every weekday."},
    {"id": "e2", "doc_id": "A", "chunk_id": "A:0", "path": "a.md", "language": "en",
     "question": "How many desks does Brekke have?", "answer": "The Brekke office has 23 desks for visitors."},
    {"id": "e3", "doc_id": "B", "chunk_id": "B:0", "path": "b.md", "language": "en",
     "question": "What does the Vindel lamp cost?", "answer": "The Vindel lamp costs 349 crowns."},
]


def examples(recalls: dict[str, float], side: str = "tuned") -> list[dict]:
    return [{"set": "exam", "id": i, side: {"fact_recall": r, "missing_facts": [] if r == 1 else ["x"]}}
            for i, r in recalls.items()] + [{"set": "gold", "id": "g1", side: {"fact_recall": 0.0}}]


def test_misses_are_the_candidates_exam_questions_below_full_recall():
    got = missed(examples({"e1": 1.0, "e2": 0.5, "e3": 0.0}), EXAM, "tuned")
    assert [(m["id"], m["fact"], m["chunk_id"]) for m in got] == [
        ("e2", EXAM[1]["answer"], "A:0"), ("e3", EXAM[2]["answer"], "B:0")]  # the gold row is not the exam's
    assert missed(examples({"e1": 0.0}, side="current"), EXAM) == []  # the served model's replies do not count


def test_a_perfect_exam_opens_no_round(tmp_path):
    assert LoopSettings().max_rounds == 0  # off by default until the bench shows it helps
    rows = after_evaluation(tmp_path, [], EXAM, "run1", "sha", LoopSettings(max_rounds=2))
    assert rows == [] and loop_targets(tmp_path) == []
    assert json.loads((tmp_path / "misses.json").read_text())["misses"] == []


def test_rounds_open_close_on_the_gain_and_stop(tmp_path):
    s = LoopSettings(max_rounds=2)
    # Night 1: e2 and e3 missed: a round for each document, with exactly those facts.
    after_evaluation(tmp_path, missed(examples({"e1": 1, "e2": 0, "e3": 0}), EXAM, "tuned"), EXAM, "run1", "sha", s)
    targets = loop_targets(tmp_path)
    assert sorted((t["doc_id"], t["fact"], t["round"], tuple(t["exam_ids"])) for t in targets) == [
        ("A", EXAM[1]["answer"], 1, ("e2",)), ("B", EXAM[2]["answer"], 1, ("e3",))]
    # Night 2: A's fact is now answered, e1 slipped; B gained nothing and stops; A opens round 2 for e1.
    rows = after_evaluation(tmp_path, missed(examples({"e1": 0, "e2": 1, "e3": 0}), EXAM, "tuned"), EXAM, "run2",
                            "sha", s)
    docs = read_loop(tmp_path)["documents"]
    assert docs["A"]["rounds"][0]["result"]["gained"] == 1 and docs["A"]["stopped"] is None
    assert [f["fact"] for f in docs["A"]["rounds"][1]["facts"]] == [EXAM[0]["answer"]]
    assert docs["B"]["stopped"] == "round 1 gained nothing" and len(docs["B"]["rounds"]) == 1
    assert {(r["document"], r["round"], r["status"]) for r in rows} == {
        ("a.md", 1, "continues"), ("a.md", 2, "open"), ("b.md", 1, "round 1 gained nothing")}
    # Every round's facts stay targets (their material stays in the dataset).
    assert len(loop_targets(tmp_path)) == 3
    # Night 3: round 2 gained e1, e2 slipped again: max_rounds reached, no round 3.
    after_evaluation(tmp_path, missed(examples({"e1": 1, "e2": 0, "e3": 0}), EXAM, "tuned"), EXAM, "run3", "sha", s)
    docs = read_loop(tmp_path)["documents"]
    assert docs["A"]["stopped"] == "loop.max_rounds (2) reached" and len(docs["A"]["rounds"]) == 2
    targets = loop_targets(tmp_path)
    # Night 4, the same misses: nothing moves, so the next build makes the same material.
    after_evaluation(tmp_path, missed(examples({"e1": 1, "e2": 0, "e3": 0}), EXAM, "tuned"), EXAM, "run3", "sha", s)
    assert loop_targets(tmp_path) == targets
    # Document A edited (a new doc_id in the exam): its old rounds are gone, the new version starts over.
    edited = [{**e, "doc_id": "A2", "chunk_id": "A2:0"} if e["doc_id"] == "A" else e for e in EXAM]
    after_evaluation(tmp_path, missed(examples({"e1": 0, "e2": 1, "e3": 0}), edited, "tuned"), edited, "run4", "sha", s)
    docs = read_loop(tmp_path)["documents"]
    assert "A" not in docs and docs["A2"]["rounds"][0]["round"] == 1 and docs["B"]["stopped"]


def test_max_facts_caps_a_night_and_a_round_without_training_stops(tmp_path):
    after_evaluation(tmp_path, missed(examples({"e1": 0, "e2": 0, "e3": 0}), EXAM, "tuned"), EXAM, "r", "sha",
                     LoopSettings(max_rounds=2, max_facts=2))
    assert len(loop_targets(tmp_path)) == 2  # A's two facts; B waits
    rows = close_without_training(tmp_path, "the dataset is the one already evaluated")
    assert read_loop(tmp_path)["documents"]["A"]["stopped"].startswith("round 1 trained nothing")
    assert rows[0]["gained"] == "0 of 2"
    assert after_evaluation(tmp_path, [], EXAM, "r", "sha", LoopSettings(max_rounds=0)) == rows


CHUNK = Chunk(chunk_id="A:0", doc_id="A", path="a.md", index=0, title="Staff handbook", heading_path=["Office"],
              text="The Brekke office opens at 7:45 every weekday. The Brekke office has 23 desks for visitors.",
              start=0, end=90, n_tokens=25)
ZH = Chunk(chunk_id="Z:0", doc_id="Z", path="z.md", index=0, title="员工手册", heading_path=["假期"],
           text="年假为每年15天。", start=0, end=9, n_tokens=9, language="zh")


def test_material_asks_the_endpoint_only_about_the_missed_facts_and_stays_away_from_the_exam():
    server = ScriptedEndpoint()
    try:
        llm = LLMSettings(base_url=server.base_url, model=server.model, max_retries=0, concurrency=2)
        targets = [LoopTarget(doc_id="A", chunk_id="A:0", path="a.md", fact=EXAM[1]["answer"], language="en",
                              round=1, exam_ids=["e2"]),
                   LoopTarget(doc_id="Z", chunk_id="Z:0", path="z.md", fact="年假为每年15天。", language="zh", round=1)]
        settings = LoopSettings(questions_per_fact=3)
        raw = make_material(targets, [CHUNK, ZH], llm, settings, ["zh"])
        assert raw.calls == server.calls["fact"] == 3  # the English fact only: the endpoint writes no Chinese here
        assert all(EXAM[1]["answer"] in f for f in server.facts)
        assert {p.answer for p in raw.pairs} == {EXAM[1]["answer"], "年假为每年15天。"}
        assert any(p.question.startswith("According to the Staff handbook > Office, ") for p in raw.pairs)
        assert any(p.question.startswith("根据《员工手册·假期》，") for p in raw.pairs)
        assert {p.mode for p in raw.pairs} == {"loop"}
        # The same round on the same chunk: the very same requests (seeded), so the cache key holds.
        before = list(server.requests)
        make_material(targets, [CHUNK, ZH], llm, settings, ["zh"])
        assert [r["seed"] for r in server.requests[len(before):]] == [r["seed"] for r in before]
        # Round 2 asks with other seeds and another frame.
        make_material([targets[0].model_copy(update={"round": 2})], [CHUNK], llm, settings, ["zh"])
        assert not {r["seed"] for r in server.requests[len(before) * 2:]} & {r["seed"] for r in before}
    finally:
        server.close()
    # An exam question that one of the new questions nearly repeats: that question is dropped, with the reason.
    near = raw.pairs[0].question.rstrip("?") + " exactly?"
    dedup = DedupSettings()
    kept, rows = away_from_exam(raw, targets, [near, "什么是完全无关的问题？"], settings, dedup)
    assert len(kept.pairs) < len(raw.pairs)
    assert all(jaccard(shingles(normalize(p.question), 5), shingles(normalize(near), 5)) < 0.5 for p in kept.pairs)
    reasons = [d.reason for d in kept.dropped]
    assert "near_exam_question" in reasons
    row = next(r for r in rows if r["fact"] == EXAM[1]["answer"])
    made = [p for p in raw.pairs if p.answer == EXAM[1]["answer"]] + \
        [d for d in raw.dropped if d.record["answer"] == EXAM[1]["answer"]]
    assert row["dropped near the exam"] >= 1
    assert row["new questions"] + row["dropped near the exam"] + row["dropped by the checks"] == len(made)


def test_framing_puts_the_question_in_its_documents_context():
    assert framed("How many desks does the Brekke office have?", CHUNK, 1) == \
        "According to the Staff handbook > Office, how many desks does the Brekke office have?"
    assert framed("Brekke opens when?", CHUNK, 2) == "Brekke opens when? (Staff handbook > Office)"
    assert framed("年假每年多少天？", ZH, 3) == "关于员工手册·假期，年假每年多少天？"
    assert framed("Q?", CHUNK.model_copy(update={"title": "", "heading_path": []}), 1) is None
