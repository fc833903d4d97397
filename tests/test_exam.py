"""The exam of a folder (tasks/exam.py, doctune/exam.py): questions about every document, worded apart from
training, stable for an unchanged document, and never a near twin of a training question."""

from __future__ import annotations

import json

import pytest

from doctune.exam import ExamItem, ExamSettings, exam_table, write_exam
from doctune.llm import EndpointError
from doctune.metrics import facts_found
from doctune.records import Document, QAPair
from doctune.settings import ChunkSettings, DedupSettings, LLMSettings
from tasks.chunk import chunk_document
from doctune.prompts import load_prompt
from tasks.exam import hold_out, make_exam, zh_asking
from tests.endpoints import ScriptedEndpoint

EN = ("# Price sheet\n\nThe Kestrel K4 survey drone costs 8,950 euros. The Heron H2 costs 12,400 euros. "
      "The Kestrel K4 flies for 42 minutes on one battery. Orders of five or more drones get a 7 percent discount. "
      "The prices are valid until 31 March 2026. Support for the Heron H2 ends in 2029. "
      "Repairs are done in Skarvhamn within 10 working days.\n")
ZH = "# 售后政策\n\n特萨林FjordCell电池的保修期为12个月。红隼K4老用户以旧换新可抵扣900元。深圳办事处共有员工37人。\n"


def chunks(text: str, path: str, language: str = "en"):
    doc = Document(doc_id=path.replace(".", "")[:16].ljust(16, "0"), path=path, sha256="0" * 64, format="md",
                   title=path, text=text, language=language)
    return chunk_document(doc, ChunkSettings())


def rule_only(**kw) -> ExamSettings:
    return ExamSettings(tries=0, **kw)


def test_rule_made_exam_asks_every_document_in_proportion_to_its_facts_in_its_language():
    llm = LLMSettings(base_url="http://127.0.0.1:9/v1")  # never called: tries=0
    en = make_exam(chunks(EN, "prices.md"), llm, rule_only(), [])
    assert 2 <= len(en.items) <= 3  # 7 facts, one question per 3
    zh = make_exam(chunks(ZH, "售后政策.md", "zh"), llm, rule_only(), [])
    assert len(zh.items) == 1 and zh.items[0].language == "zh" and zh.items[0].question.endswith("？")
    for item in en.items + zh.items:
        assert item.source == "rule" and item.facts and item.answer
        assert not any(facts_found(item.question, item.facts))  # the question never gives its answer away
        assert item.chunk_id.startswith(item.doc_id)
    assert make_exam(chunks(EN, "prices.md"), llm, rule_only(facts_per_question=1, max_per_document=4), []).items
    assert len(make_exam(chunks(EN, "prices.md"), llm, rule_only(facts_per_question=1, max_per_document=4),
                         []).items) == 4


def test_an_unchanged_document_keeps_its_questions_and_the_seed_is_the_exams_own():
    llm = LLMSettings(base_url="http://127.0.0.1:9/v1")
    first = make_exam(chunks(EN, "prices.md"), llm, rule_only(), [])
    assert make_exam(chunks(EN, "prices.md"), llm, rule_only(), []) == first
    others = [make_exam(chunks(EN, "prices.md"), llm, rule_only(seed=s), []).items for s in range(6)]
    assert any([i.answer for i in o] != [i.answer for i in first.items] for o in others)


def test_the_endpoint_writes_the_questions_with_the_exams_prompt_and_rules_step_in_where_it_cannot():
    good, bad = ScriptedEndpoint(), ScriptedEndpoint(behaviour="garbage")
    try:
        settings = ExamSettings(tries=2)
        made = make_exam(chunks(EN, "prices.md"), LLMSettings(base_url=good.base_url, model=good.model), settings, [])
        assert made.items and {i.source for i in made.items} == {"llm"}
        assert all(i.prompt_version == "exam-en-1" for i in made.items)
        assert good.calls["exam"] == made.calls and good.calls["fact"] == 0  # the training prompt is not used
        # An endpoint that writes no usable question: each fact tries twice, then gets a rule-made one.
        poor = make_exam(chunks(EN, "prices.md"), LLMSettings(base_url=bad.base_url, model=bad.model), settings, [])
        assert poor.items and {i.source for i in poor.items} == {"rule"}
        assert poor.calls == 2 * len(poor.items) == len(poor.dropped)
        assert {d.reason for d in poor.dropped} and all(d.stage == "exam" for d in poor.dropped)
        # A language the endpoint cannot write costs no call.
        calls = good.calls["exam"]
        zh = make_exam(chunks(ZH, "售后政策.md", "zh"), LLMSettings(base_url=good.base_url, model=good.model),
                       settings, ["zh"])
        assert zh.items and zh.items[0].source == "rule" and good.calls["exam"] == calls
    finally:
        good.close()
        bad.close()


def test_an_endpoint_error_fails_the_exam_instead_of_caching_a_smaller_one():
    down = ScriptedEndpoint(always="500")
    try:
        with pytest.raises(EndpointError):
            make_exam(chunks(EN, "prices.md"), LLMSettings(base_url=down.base_url, model=down.model, max_retries=0),
                      ExamSettings(tries=1), [])
    finally:
        down.close()


def item(question: str, answer: str = "The Kestrel K4 costs 8,950 euros.") -> ExamItem:
    return ExamItem(id=f"exam-{len(question)}", question=question, answer=answer, facts=["8,950"], language="en",
                    path="prices.md", doc_id="d", chunk_id="d:0", source="rule", prompt_version="cloze-3")


def test_a_training_twin_leaves_the_dataset_unless_a_person_wrote_it():
    exam = [item("How much does the Kestrel K4 cost?"), item("What does the Heron H2 cost?")]
    pairs = [QAPair(question="How much does the Kestrel K4 cost ?", answer="8,950 euros.", source="cloze"),
             QAPair(question="The Kestrel K4 costs how much?", answer="8,950 euros.", source="cloze"),
             QAPair(question="what does the heron h2 cost", answer="12,400 euros.", source="faq")]
    held = hold_out(exam, pairs, DedupSettings())
    assert [i.question for i in held.items] == ["How much does the Kestrel K4 cost?"]
    assert [p.question for p in held.pairs] == ["The Kestrel K4 costs how much?", "what does the heron h2 cost"]
    reasons = {d.reason: d for d in held.dropped}
    assert set(reasons) == {"held_out_for_exam", "exam_question_seen_in_training"}
    assert reasons["held_out_for_exam"].duplicate_of == exam[0].id
    assert reasons["exam_question_seen_in_training"].duplicate_of == pairs[2].pair_id


def test_exam_file_is_written_once_and_a_hand_edit_wins(tmp_path):
    path, written = write_exam(tmp_path, [item("How much does the Kestrel K4 cost?")])
    assert written and json.loads(path.read_text(encoding="utf-8"))["facts"] == ["8,950"]
    path.write_text('{"question": "mine", "answer": "mine"}\n', encoding="utf-8")
    assert write_exam(tmp_path, [item("How much?")]) == (path, False) and "mine" in path.read_text()
    rows = exam_table([item("How much does the Kestrel K4 cost?")], ["prices.md", "empty.md"])
    assert rows[0]["questions"] == 1 and rows[0]["by rule"] == 1 and rows[1]["questions"] == 0
    assert "8,950" in rows[0]["example"] and "no fact sentence" in rows[1]["example"]


def test_an_exam_question_never_takes_a_facts_only_training_question():
    exam = [item("Who is the chief executive of Tessarine?", "The chief executive of Tessarine is Jonas Villemo."),
            item("How much does the Kestrel K4 cost?")]
    pairs = [QAPair(question="Who is the chief executive of Tessarine?", answer="The chief executive of Tessarine is "
                    "Jonas Villemo.", source="cloze"),
             QAPair(question="What does the handbook say about the company?", answer="The chief executive of "
                    "Tessarine is Jonas Villemo.", source="passage"),
             QAPair(question="How much does the Kestrel K4 cost?", answer="The Kestrel K4 costs 8,950 euros.",
                    source="cloze"),
             QAPair(question="The Kestrel K4 costs how much?", answer="The Kestrel K4 costs 8,950 euros.", source="cloze")]
    held = hold_out(exam, pairs, DedupSettings())
    # the CEO's one question stays in training (its passage does not count) and the exam asks the price only
    assert [i.question for i in held.items] == ["How much does the Kestrel K4 cost?"]
    assert [p.question for p in held.pairs] == [p.question for p in pairs if p.question != "How much does the Kestrel K4 cost?"]
    assert sorted(d.reason for d in held.dropped) == ["exam_question_is_a_facts_only_training_question",
                                                     "held_out_for_exam"]


def zh_item(question: str, answer: str, doc_id: str = "z") -> ExamItem:
    return ExamItem(id=f"exam-{doc_id}-{len(question)}-{question[-4:]}", question=question, answer=answer,
                    facts=["x"], language="zh", path="售后政策.md", doc_id=doc_id, chunk_id=f"{doc_id}:0",
                    source="rule", prompt_version="cloze-7")


def test_a_chinese_exam_question_takes_its_question_word_swaps_out_of_training():
    fact = "中国旅行团人数满15人可享受九折团体优惠。"
    exam = [zh_item("中国旅行团人数满多少人可享受九折团体优惠？", fact)]
    pairs = [QAPair(question="中国旅行团人数满几人可享受九折团体优惠？", answer=fact, source="cloze", language="zh"),
             QAPair(question="中国旅行团人数满15人可享受几折团体优惠？", answer=fact, source="cloze", language="zh"),
             QAPair(question="船上商店出售晕船药，每盒几欧元？", answer="船上商店出售晕船药，每盒6欧元。", source="cloze",
                    language="zh")]
    held = hold_out(exam, pairs, DedupSettings())
    # the swap of 多少 for 几 is the exam's own question; the question about the discount (another value) teaches
    # the fact on, and a question about another fact is no twin even with the question words left out
    assert [i.question for i in held.items] == [exam[0].question]
    assert [p.question for p in held.pairs] == [pairs[1].question, pairs[2].question]
    (d,) = held.dropped
    assert d.reason == "held_out_for_exam" and "without the question words" in d.detail
    # an English exam question keeps its siblings: only the shingle twins leave
    en = hold_out([item("How much does the Kestrel K4 cost?")],
                  [QAPair(question="How many euros does the Kestrel K4 cost?", answer="The Kestrel K4 costs 8,950 euros.",
                          source="cloze"),
                   QAPair(question="The Kestrel K4 costs how much?", answer="The Kestrel K4 costs 8,950 euros.",
                          source="cloze")], DedupSettings())
    assert len(en.pairs) == 2 and not en.dropped


def test_the_question_words_left_out_are_the_cloze_prompts_own():
    cloze = load_prompt("cloze", required=("version", "en", "zh"))
    asking = zh_asking(cloze)
    # every Chinese wording the rules ask with, its unit filled in, is left out whole
    for key, wording in cloze["zh"].items():
        if isinstance(wording, str):
            assert asking.sub("", "保修" + wording.replace("{{ unit }}", "个月") + "？") == "保修？", key
    # a wording added to the prompt is left out too, with no second list to keep in step
    more = {**cloze, "zh": {**cloze["zh"], "how_far": "多远"}}
    assert zh_asking(more).sub("", "码头离市中心多远？") == "码头离市中心？"
    assert asking.sub("", "码头离市中心多远？") == "码头离市中心多远？"


def test_a_reserve_of_the_same_document_takes_the_place_of_an_exam_question_that_must_go():
    one = "步行旅客应在开船前20分钟到达登船口。"
    two = "船上商店出售晕船药，每盒6欧元。"
    exam = [zh_item("步行旅客应在开船前多少分钟到达登船口？", one)]
    reserves = [zh_item("其他文件的问题多少？", "其他文件的问题3个。", doc_id="other"),
                zh_item("船上商店出售晕船药，每盒多少钱？", two), zh_item("第三个问题多少？", "第三个问题5个。")]
    pairs = [QAPair(question="步行旅客应在开船前几分钟到达登船口？", answer=one, source="cloze", language="zh"),
             QAPair(question="船上商店出售晕船药，每盒多少欧元？", answer=two, source="cloze", language="zh"),
             QAPair(question="船上商店出售什么？", answer=two, source="synthesized", language="zh")]
    held = hold_out(exam, pairs, DedupSettings(), reserves)
    # the walk-on fact has one training question, a swap of the exam's: it stays and the exam asks the next fact of
    # the same document, once (the document had one question); another document's reserve is not asked
    assert [i.question for i in held.items] == ["船上商店出售晕船药，每盒多少钱？"]
    assert [p.question for p in held.pairs] == [pairs[0].question, pairs[2].question]
    assert sorted(d.reason for d in held.dropped) == ["exam_question_is_a_facts_only_training_question",
                                                     "held_out_for_exam"]
    assert hold_out(exam, pairs, DedupSettings()).items == []  # without reserves the exam just gets smaller


def test_the_exam_keeps_rule_made_reserves_and_a_chinese_answer_without_its_glued_heading():
    llm = LLMSettings(base_url="http://127.0.0.1:9/v1")
    made = make_exam(chunks(EN, "prices.md"), llm, rule_only(), [])
    assert made.reserves and made.calls == 0
    assert {r.answer for r in made.reserves}.isdisjoint({i.answer for i in made.items})
    assert all(r.source == "rule" and r.doc_id == made.items[0].doc_id for r in made.reserves)
    glued = "售后政策 ==== 一、保修 特萨林FjordCell电池的保修期为12个月。深圳办事处共有员工37人。红隼K4老用户以旧换新可抵扣900元。\n"
    zh = make_exam(chunks(glued, "售后政策.txt", "zh"), llm, rule_only(facts_per_question=1), [])
    assert zh.items and not any("====" in i.answer or "一、" in i.answer for i in zh.items + zh.reserves)


def test_a_table_cells_exam_question_asks_its_row_and_column_and_scores_only_its_value():
    table = ("# Timetable\n\nDepartures from Aldermouth (daily)\n\n| Destination | First sailing | Vessel |\n"
             "| --- | --- | --- |\n| Tollan | 07:25 | MV Harrowgate |\n| Brisk Isle | 06:10 | MV Solvig |\n")
    llm = LLMSettings(base_url="http://127.0.0.1:9/v1")  # never called: tries=0
    made = make_exam(chunks(table, "timetable.md"), llm, rule_only(facts_per_question=1, max_per_document=4), [])
    assert len(made.items) == 4
    for item in made.items:
        assert item.answer.startswith("Departures from Aldermouth (daily): the ")
        # The caption's "Aldermouth" is in the answer, never among the facts a reply must hold.
        assert item.facts == [item.answer.rsplit(" is ", 1)[1].rstrip(".")], item
        row = "Tollan" if "Tollan" in item.answer else "Brisk Isle"
        assert row in item.question and not facts_found(item.question, item.facts)[0]


def test_a_big_table_takes_turns_with_the_documents_prose_in_the_exam():
    rows = "".join(f"| Isle {chr(65 + i)} | 0{i}:15 | {20 + i}.50 |\n" for i in range(8))
    text = ("# Timetable\n\nThe winter timetable is valid from 2 November 2026 to 28 March 2027. All departures "
            "leave from Pier 3. The ticket office opens at 05:30. Passengers with cars check in 30 minutes before "
            "sailing.\n\nDepartures from Aldermouth (daily)\n\n| Destination | First sailing | Fare |\n"
            "| --- | --- | --- |\n" + rows)
    document = chunks(text, "timetable.md")
    llm = LLMSettings(base_url="http://127.0.0.1:9/v1")  # never called: tries=0
    for seed in range(3):
        made = make_exam(document, llm, rule_only(facts_per_question=1, max_per_document=6, seed=seed), [])
        cells = [i for i in made.items if i.answer.startswith("Departures from Aldermouth")]
        # 16 cells and 4 prose facts: drawn uniformly, most seeds would ask cells only
        assert len(made.items) == 6 and len(cells) == 3, [i.question for i in made.items]
