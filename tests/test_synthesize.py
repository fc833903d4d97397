import pytest

from doctune.records import Chunk, QAPair
from doctune.settings import LLMSettings, SynthSettings
from tasks.synthesize import (
    asks_for,
    check_pair,
    check_question,
    choose_mode,
    clean_question,
    extract_facts,
    is_vague,
    fact_messages,
    faq_chunks,
    groundedness,
    SynthResult,
    parse_pairs,
    plan_calls,
    probe_languages,
    question_targets,
    restore_subject,
    retry_calls,
    synthesize_chunks,
    target_for,
)
from tests.endpoints import ScriptedEndpoint

EN_TEXT = (
    "The Nimbus X2 drone costs 1,490 euros. The Nimbus X2 flies for 38 minutes on one battery. "
    "It weighs 870 grams. Contact us."
)
ZH_TEXT = "星河三号无人机的售价为2999元。星河三号的电池可以飞行40分钟。"


def chunk(text=EN_TEXT, language="en", heading=("Products", "Nimbus X2"), cid="d1:0"):
    return Chunk(chunk_id=cid, doc_id="d1", path="docs/products.md", index=0, text=text,
                 heading_path=list(heading), start=0, end=len(text), n_tokens=len(text) // 4,
                 language=language, title="Products")


def llm_for(server) -> LLMSettings:
    return LLMSettings(base_url=server.base_url, model=server.model, concurrency=4, max_retries=1)


def test_facts_are_sentences_with_subject_restored():
    facts = extract_facts(chunk())
    assert facts == ["The Nimbus X2 drone costs 1,490 euros.",
                     "The Nimbus X2 flies for 38 minutes on one battery.",
                     "Nimbus X2 weighs 870 grams."]  # "It" got its subject; "Contact us." is too short


def test_titles_captions_and_signatures_are_no_facts_but_list_items_and_labels_are():
    text = ("# Lumenholm Ferries Winter Timetable 2026/27\n\nSkarvhamn Test Field - Safety Notice\n"
            "Tobias Quenell, managing director - 14 January 2026\n\n"
            "The winter timetable is valid from 2 November 2026.\n\n- Deck crew work rotations of 7 days\n"
            "- Night crossings pay 38 euros a shift\n\nCustomer service phone: +44 1632 960 418\n\n"
            "Departures from Aldermouth (daily)\n")
    assert extract_facts(chunk(text, heading=("Timetable",))) == [
        "The winter timetable is valid from 2 November 2026.", "Deck crew work rotations of 7 days",
        "Night crossings pay 38 euros a shift", "Customer service phone: +44 1632 960 418"]


def test_restore_subject_possessive_and_chinese():
    assert restore_subject("Its battery lasts 2 hours.", chunk()) == "Nimbus X2's battery lasts 2 hours."
    # "This" before a noun is a determiner: the noun is the subject, the heading is not put in front of it
    assert restore_subject("This fare and refund policy was approved on 12 February 2026.", chunk()) == \
        "The fare and refund policy was approved on 12 February 2026."
    assert restore_subject("These rules apply to all routes.", chunk()) == "The rules apply to all routes."
    assert restore_subject("This is rated IP54.", chunk()) == "Nimbus X2 is rated IP54."
    assert restore_subject("This costs 1,490 euros.", chunk()) == "Nimbus X2 costs 1,490 euros."
    zh = chunk(ZH_TEXT, "zh", heading=("星河三号",))
    assert restore_subject("它的电池可以飞行40分钟。", zh) == "星河三号的电池可以飞行40分钟。"
    assert len(extract_facts(zh)) == 2


@pytest.mark.parametrize("question,reason", [
    ("How much does the Nimbus X2 drone cost?", None),
    ("Does the Nimbus X2 cost 1,490 euros?", None),  # the whole number is the yes/no question itself
    ("What is the capital of France?", "off_topic"),
    ("According to the text, what does the Nimbus X2 cost?", "meta_question"),
    ("The Nimbus X2 drone costs 1,490 euros.", "form_not_a_question"),
    ("The Nimbus X2 drone costs 1,490 euros?", "echo_of_fact"),
    ("Is it?", "form_length"),
    # Every name and number of the answer is in the question: nothing left to recall.
    ("What is the Nimbus X2 that costs 1,490 euros?", "answer_leak"),
    ("What does the Nimbus X2 drone cost?", None),
])
def test_check_question(question, reason):
    assert check_question(question, "The Nimbus X2 drone costs 1,490 euros.", "en") == reason


def test_a_number_inside_a_name_is_no_leak_but_the_asked_value_is():
    fact = "SkyLedger 3.2 raised the maximum number of drones per fleet account to 250."
    assert check_question("How many drones can a SkyLedger 3.2 fleet account hold?", fact, "en") is None
    targets = ["SkyLedger 3.2", "250"]
    assert check_question("What is the SkyLedger 3.2 limit of 250 drones?", fact, "en", targets) == "answer_leak"
    # The fact's value (its last one) in the question gives the answer away, whatever else is asked.
    assert check_question("Which SkyLedger version allows 250 drones per account?", fact, "en", targets) == "answer_leak"
    assert check_question("Which limit did SkyLedger 3.2 raise?", fact, "en", targets) is None
    fact = "The chief executive of Tessarine is Jonas Villemo."  # in the Tessarine handbook
    assert check_question("Who is Jonas Villemo?", fact, "en", ["Jonas Villemo"]) == "answer_leak"
    assert check_question("Who runs Tessarine as chief executive?", fact, "en", ["Jonas Villemo"]) is None


@pytest.mark.parametrize("question, fact, vague", [
    ("What is the Kestrel K4 survey drone?", "The Kestrel K4 survey drone has a flight time of 52 minutes.", True),
    ("What's the Heron H2?", "The Heron H2 inspection drone costs 12,400 euros.", True),
    ("Where is the Kestrel K4?", "The Kestrel K4 survey drone costs 8,950 euros.", True),
    ("What about Tessarine's regular staff?", "Tessarine staff fly economy class on flights shorter than 6 hours.", True),
    ("What is the Tessarine repair centre?", "The Tessarine repair centre is located at Verkstedgata 5.", True),
    # The fact gives X ("X is ..."), or says where: the question is answered by it.
    ("What's the meal allowance for domestic trips?", "The meal allowance for domestic trips is 48 euros per day.", False),
    ("What is SkyLedger?", "SkyLedger is the flight-log software of Tessarine.", False),
    ("Where is the Tessarine repair centre?", "The Tessarine repair centre is located at Verkstedgata 5.", False),
    ("What is the flight time of the Kestrel K4?", "The Kestrel K4 survey drone has a flight time of 52 minutes.", False),
])
def test_vague_questions_name_the_subject_and_ask_nothing_of_it(question, fact, vague):
    assert is_vague(question, fact) is vague
    assert (check_question(question, fact, "en") == "vague_question") is vague


@pytest.mark.parametrize("question, target, ok", [
    ("How many days of leave do Tessarine employees get?", "27 days", True),
    ("How many people work at Tessarine?", "27 days", False),  # the fact counts days, not people
    ("How many drones can one fleet account hold?", "250", True),  # "drones" is what the fact counts
    ("How many moons does Tessarine have?", "250", False),
    ("How much does the Kestrel K4 cost?", "8,950 euros", True),
    ("How much does the Kestrel K4 cost?", "Maren Oksavik", False),
    ("How long does the Kestrel K4 fly?", "52 minutes", True),
    ("How long does the FjordCell battery last?", "400 charge cycles", False),
    ("When was SkyLedger 3.2 released?", "14 May 2025", True),
    ("When was SkyLedger 3.2 released?", "Android 9", False),
    ("Who founded Tessarine?", "Maren Oksavik", True),
    ("Who released SkyLedger 3.2?", "14 May 2025", False),
    ("What is the price of the Kestrel K4?", "8,950 euros", True),  # "what" says nothing about the type
])
def test_asks_for_matches_the_question_word_to_the_value(question, target, ok):
    fact = "The fleet account holds up to 250 drones and employees get 27 days."
    assert asks_for(question, target, fact) is ok


def test_questions_are_anchored_on_the_values_of_the_fact():
    c = chunk(heading=("Products", "Nimbus X2"))
    fact = "The Nimbus X2 drone costs 1,490 euros and weighs 870 grams."
    # "Nimbus X2" is the heading: asking "which drone ..." for it would only repeat the heading.
    assert question_targets(fact, c) == ["1,490 euros", "870 grams"]
    assert [target_for(["1,490 euros", "870 grams"], k) for k in range(4)] == [
        "870 grams", "870 grams", "1,490 euros", "870 grams"]
    assert target_for([], 0) is None
    messages, _ = fact_messages(fact, "en", 0, "870 grams")
    assert messages[-1]["content"] == f"Fact: {fact}\nAnswer: 870 grams"
    assert all("Answer: " in m["content"] for m in messages[1:-1:2])  # the examples show the anchor too
    plain, _ = fact_messages(fact, "en", 0)
    assert not any("Answer:" in m["content"] for m in plain) and plain[0]["content"] != messages[0]["content"]
    zh, _ = fact_messages("星河三号无人机的售价为2999元。", "zh", 0, "2999元")
    assert zh[-1]["content"] == "事实：星河三号无人机的售价为2999元。\n答案：2999元"


def test_answer_leak_is_caught():
    fact = "The Oslo office opens at 8:30 and closes at 17:00."
    assert check_question("Does the Oslo office open at 8:30, and when does it close?", fact, "en") == "answer_leak"


def test_chinese_question_checks():
    fact = "星河三号无人机的售价为2999元。"
    assert check_question("星河三号无人机卖多少钱？", fact, "zh") is None
    assert check_question("What is the price?", fact, "zh") == "wrong_language"


def test_clean_question_keeps_the_first_question():
    assert clean_question('Question: "How long does the X2 fly?" It flies 38 minutes.') == "How long does the X2 fly?"


def test_fact_prompt_rotates_examples_for_variety():
    a, version = fact_messages("A fact.", "en", 0)
    b, _ = fact_messages("A fact.", "en", 1)
    assert version.startswith("fact-en") and a[0]["role"] == "system"
    assert len(a) == 8 and a[-1]["content"] == "Fact: A fact."
    assert a[1]["content"] != b[1]["content"]


@pytest.mark.parametrize("reply", [
    '[{"question": "Q1?", "answer": "A1"}]',
    'Sure! ```json\n[{"question": "Q1?", "answer": "A1"}]\n``` Hope it helps.',
    '{"pairs": [{"question": "Q1?", "answer": "A1"}]}',
    "Q: Q1?\nA: A1",
    "1. Question: Q1?\n   Answer: A1",
    "问题：Q1?\n答案：A1",
])
def test_parse_pairs_is_lenient(reply):
    assert parse_pairs(reply) == [{"question": "Q1?", "answer": "A1"}]


def test_parse_pairs_garbage():
    assert parse_pairs("I cannot help with that.") == []


def test_groundedness():
    c = chunk()
    assert groundedness("The Nimbus X2 flies for 38 minutes.", c.text) > 90
    assert groundedness("The Nimbus X2 flies for 45 minutes.", c.text) == 0  # invented number
    assert check_pair("How long does it fly?", "It flies for 38 minutes on one battery.", c, SynthSettings()) is None
    assert check_pair("What colour is it?", "It is painted bright purple with stripes.", c,
                      SynthSettings()) == "not_grounded"
    zh = chunk(ZH_TEXT, "zh")
    assert groundedness("星河三号的电池可以飞行40分钟", zh.text) > 90


def test_fact_mode_against_scripted_endpoint(scripted):
    settings = SynthSettings(mode="fact", questions_per_fact=3)
    result = synthesize_chunks([chunk()], llm_for(scripted), settings, "fact", progress=False)
    assert result.calls == 9 and scripted.calls["fact"] == 9 and result.failed_calls == 0
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert len(result.pairs) + len(result.dropped) == 9
    for p in result.pairs:
        assert p.chunk_id == "d1:0" and p.path == "docs/products.md" and p.mode == "fact"
        assert p.model == "scripted" and p.prompt_version.startswith("fact-en")
        assert p.answer in extract_facts(chunk())
    # per fact: one greedy question, the others sampled with their own seeds for different wordings
    by_fact = {}
    for body in scripted.requests:
        by_fact.setdefault(body["messages"][-1]["content"], []).append((body["temperature"], body["seed"]))
    assert len(by_fact) == 3
    for params in by_fact.values():
        assert sorted(t for t, _ in params) == [0.0, 0.9, 0.9] and len({s for _, s in params}) == 3
    assert len({p.question for p in result.pairs}) > 3


def test_faq_answers_become_fact_chunks_for_more_question_wordings(scripted):
    given = [QAPair(question="Can the Heron H2 fly in the rain?", answer="Yes. The Heron H2 is rated IP54.",
                    source="faq", doc_id="faq1", path="faq/export.xlsx"),
             QAPair(question="Write a haiku", answer="Sea.", source="instruction", path="alpaca.json"),
             QAPair(question="保修多久？", answer="红隼K4无人机自交货之日起保修24个月。", source="faq", doc_id="faq2",
                    path="faq/导出.csv", language="zh")]
    chunks = faq_chunks(given)
    assert [(c.chunk_id, c.path, c.language, c.text) for c in chunks] == [
        ("faq1:faq0", "faq/export.xlsx", "en", "Yes. The Heron H2 is rated IP54."),
        ("faq2:faq1", "faq/导出.csv", "zh", "红隼K4无人机自交货之日起保修24个月。")]
    # The answer's sentences are the facts ("Yes." is too short to ask about).
    assert extract_facts(chunks[0]) == ["The Heron H2 is rated IP54."]
    result = synthesize_chunks(chunks[:1], llm_for(scripted), SynthSettings(questions_per_fact=2), "fact",
                               progress=False)
    assert result.calls == 2 and {p.answer for p in result.pairs} == {"The Heron H2 is rated IP54."}
    assert all(p.path == "faq/export.xlsx" and p.source == "synthesized" for p in result.pairs)


def test_qa_mode_and_chinese_prompts(scripted):
    zh = chunk(ZH_TEXT, "zh", heading=("星河三号",))
    result = synthesize_chunks([chunk(), zh], llm_for(scripted), SynthSettings(), "qa", progress=False)
    assert scripted.calls["qa"] == 2
    assert {p.language for p in result.pairs} == {"en", "zh"}
    assert all(p.prompt_version.startswith("qa-") for p in result.pairs)


def test_auto_picks_qa_for_a_capable_endpoint_and_fact_otherwise(scripted):
    choice = choose_mode([chunk()], llm_for(scripted), SynthSettings())
    assert choice.mode == "qa" and "usable" in choice.reason
    weak = ScriptedEndpoint(behaviour="garbage")
    try:
        choice = choose_mode([chunk()], llm_for(weak), SynthSettings())
    finally:
        weak.close()
    assert choice.mode == "fact" and "unparseable_reply" in choice.reason
    assert choose_mode([chunk()], llm_for(scripted), SynthSettings(mode="fact")).reason == "set by synth.mode='fact'"


@pytest.mark.parametrize("mode", ["fact", "qa"])
def test_a_language_the_endpoint_cannot_write_is_skipped_with_the_fix(mode):
    english_only = ScriptedEndpoint(behaviour="english_only")
    zh = chunk(ZH_TEXT, "zh", heading=("星河三号",), cid="d2:0")
    try:
        skip = probe_languages([chunk(), zh], llm_for(english_only), SynthSettings(), mode)
    finally:
        english_only.close()
    assert list(skip) == ["zh"]
    assert "Chinese" in skip["zh"] and "Qwen" in skip["zh"] and "scripted" in skip["zh"]
    assert sum(english_only.calls.values()) <= 2 * 6  # a few greedy calls per language, no more


def test_no_language_is_skipped_when_all_work_or_all_fail(scripted):
    zh = chunk(ZH_TEXT, "zh", heading=("星河三号",), cid="d2:0")
    assert probe_languages([chunk(), zh], llm_for(scripted), SynthSettings(), "fact") == {}
    # One language: nothing to compare with, no probe call at all.
    calls = sum(scripted.calls.values())
    assert probe_languages([chunk()], llm_for(scripted), SynthSettings(), "fact") == {}
    assert sum(scripted.calls.values()) == calls
    # Everything fails: not skipped here, so the keep-rate gate stops the flow with its message.
    garbage = ScriptedEndpoint(behaviour="garbage")
    try:
        assert probe_languages([chunk(), zh], llm_for(garbage), SynthSettings(), "fact") == {}
    finally:
        garbage.close()


def test_facts_short_of_questions_get_a_second_unanchored_round():
    settings = SynthSettings(questions_per_fact=3, min_questions_per_fact=2, anchor_questions=True)
    assert SynthSettings().min_questions_per_fact == 0  # off by default (bench/README.md)
    calls = plan_calls([chunk()], settings, "fact")
    facts = extract_facts(chunk())
    assert len(calls) == 3 * len(facts)
    assert "\nAnswer: 1,490 euros" in calls[0].messages[-1]["content"]
    assert "Answer:" not in plan_calls([chunk()], SynthSettings(), "fact")[0].messages[-1]["content"]
    # The first fact kept two questions, the second one, the third none.
    kept = [QAPair(question=f"Q{i}?", answer=facts[f], chunk_id="d1:0") for i, f in enumerate([0, 0, 1])]
    retry = retry_calls(calls, SynthResult(pairs=kept), settings)
    assert [c.fact for c in retry] == [facts[1]] * 3 + [facts[2]] * 3
    assert all("Answer:" not in c.messages[-1]["content"] for c in retry)  # the model copies what it sees
    assert all(c.params["temperature"] == settings.temperature for c in retry)
    assert len({c.params["seed"] for c in retry} | {c.params["seed"] for c in calls}) == len(retry) + len(calls)
    assert retry_calls(calls, SynthResult(pairs=kept), settings.model_copy(update={"min_questions_per_fact": 0})) == []


def test_the_probe_sample_survives_an_edit_to_a_document_outside_it():
    from tasks.synthesize import probe_sample

    def chunk(i: int, language: str = "en", text: str | None = None) -> Chunk:
        text = text or f"The Vindel lamp model {i} costs {100 + i} crowns at the Brekke store."
        return Chunk(chunk_id=f"d{i}:0", doc_id=f"d{i}", path=f"doc{i}.md", index=0, text=text, heading_path=[],
                     start=0, end=len(text), n_tokens=20, language=language, title="")

    chunks = [chunk(i) for i in range(20)] + [chunk(100 + i, "zh", f"布雷克商店的灯具{i}号售价为{100 + i}克朗。")
                                              for i in range(6)]
    sample = probe_sample(chunks)
    assert [c.language for c in sample] == ["en"] * 4 + ["zh"] * 4
    outside = next(i for i, c in enumerate(chunks) if c not in sample and c.language == "en")
    edited = list(chunks)
    edited[outside] = chunk(outside, text=chunks[outside].text + " It is sold out.")
    assert probe_sample(edited) == sample  # the probes' cache key: an edit elsewhere keeps it
    edited[chunks.index(sample[0])] = chunk(0, text=sample[0].text + " Sold out.")
    assert probe_sample(edited) != sample  # an edit inside it is probed again


def test_a_question_about_a_table_cell_names_its_row_and_never_asks_for_the_caption():
    from tasks.synthesize import check_fact_question

    text = ("Fares from Aldermouth (euros, single journey)\n\n| Destination | Adult | Bicycle |\n| --- | --- | --- |\n"
            "| Tollan | 14.80 | 4.00 |\n| Merrow Island | 23.60 | 5.50 |")
    table = Chunk(chunk_id="t:0", doc_id="t", path="fares.pdf", index=0, text=text, heading_path=[], start=0,
                  end=len(text), n_tokens=40, title="fares")
    fact = "Fares from Aldermouth (euros, single journey): the bicycle of Tollan is 4.00."
    assert fact in extract_facts(table)
    assert question_targets(fact, table) == ["Tollan", "4.00"]  # not the caption's Aldermouth
    assert check_fact_question("What is the price of a bicycle to Tollan?", fact, table) is None
    assert check_fact_question("How many times can you pay for a bicycle in Aldermouth?", fact, table) == \
        "table_row_not_named"
    assert check_fact_question("What is the price of a bicycle to Tollan?", fact, table,
                               question_targets(fact, table)) is None
    # A prose fact is checked as before: no row to name.
    assert check_fact_question("How much does the Kestrel K4 survey drone cost?",
                               "The Kestrel K4 survey drone costs 8,950 euros.", chunk()) is None
