"""Metrics: exact values on known English and Chinese strings, and the key facts of an answer."""

from __future__ import annotations

import pytest

from doctune.metrics import answer_facts, answer_spans, chrf, detect_language, fact_recall, key_facts, normalize, rouge_l


# --------------------------------------------------------------------------- metrics

def test_fact_recall_english():
    assert fact_recall("The X2 costs 149 euros.", ["149 euros", "X2"]) == 1.0
    assert fact_recall("The X2 costs 150 euros.", ["149 euros", "X2"]) == 0.5
    # Word edges: 149 is not in 1149, X2 is not in X20.
    assert fact_recall("The X20 costs 1149 euros.", ["149", "X2"]) == 0.0


def test_fact_recall_normalises_numbers_case_and_width():
    assert fact_recall("We employ 1200 people", ["1,200"]) == 1.0
    assert fact_recall("We employ 1,200 people", ["1200"]) == 1.0
    assert fact_recall("ＡＣＭＥ ＧｍｂＨ was founded in １９９８", ["Acme GmbH", "1998"]) == 1.0
    assert fact_recall("rate: 1.5 %", ["1.5 %"]) == 1.0
    assert fact_recall("rate: 15 %", ["1.5 %"]) == 0.0  # the decimal point is kept
    assert normalize("  Hello,\tWORLD!  ") == "hello world"


def test_fact_recall_chinese_without_spaces():
    assert fact_recall("退货期限为30天", ["30天"]) == 1.0
    assert fact_recall("退货期限为 30 天。", ["30天", "退货期限"]) == 1.0
    assert fact_recall("退货期限为３０天，运费１，２００元", ["30天", "1200元"]) == 1.0
    assert fact_recall("退货期限为300天", ["30天"]) == 0.0
    with pytest.raises(ValueError, match="at least one fact"):
        fact_recall("anything", [])


def test_rouge_l_on_words_for_english():
    # LCS "the x2 149 euros" = 4 of 5 reply words and 7 reference words: F1 = 2*4/(5+7).
    assert rouge_l("The X2 costs 149 euros.", "The X2 is priced at 149 euros.") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0


def test_rouge_l_on_characters_for_chinese_where_whitespace_gives_zero():
    from rouge_score.rouge_scorer import RougeScorer

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    reply, reference = "退货期限是30天。", "退货期限为30天"
    # Characters: 退 货 期 限 是/为 30 天 -> 6 of 7 units in common on both sides.
    assert rouge_l(reply, reference) == pytest.approx(6 / 7)
    # Split on spaces, each Chinese sentence is one "word" and the score is the famous 0.0.
    assert RougeScorer(["rougeL"], tokenizer=Whitespace()).score(reference, reply)["rougeL"].fmeasure == 0.0


def test_chrf_matches_sacrebleu_values():
    # sacrebleu 2.6.0 CHRF() (char order 6, beta 2) computed once: 44.98291691477677 and 37.07384040111085.
    assert chrf("The X2 costs 149 euros.", "The X2 is priced at 149 euros.") == pytest.approx(0.4498291691477677)
    assert chrf("退货期限是30天。", "退货期限为30天") == pytest.approx(0.3707384040111085)
    assert chrf("", "退货期限为30天") == 0.0
    assert chrf("退货期限为30天", "退货期限为30天") == pytest.approx(1.0)


def test_detect_language():
    assert detect_language("The return window is 30 days.") == "en"
    assert detect_language("Acme SuperWidget Pro 的价格是149欧元") == "zh"
    assert detect_language("In Chinese, a return is 退货.") == "en"


# --------------------------------------------------------------------------- key facts

@pytest.mark.parametrize("answer, language, facts", [
    ("The X2 costs 149 euros.", "en", ["X2", "149"]),
    ("149 euros.", "en", ["149 euros"]),
    ("Alice Smith leads the Berlin office, which opened in 2019 with 1,200 staff.", "en",
     ["Alice Smith", "Berlin", "2019", "1,200"]),
    ("Returns are accepted within 30 days of delivery if the item is unused.", "en", ["30"]),
    ("You can return items within thirty days after delivery to our warehouse.", "en", []),
    ("退货期限为30天。", "zh", ["退货期限为30天"]),
    ("客户可以在收货后30天内通过Acme客服申请退货，详见《退货政策》。", "zh", ["30", "Acme", "退货政策"]),
    ("我们的办公室周一至周五开放，周末和法定节假日休息，请提前预约。", "zh", []),
])
def test_key_facts(answer, language, facts):
    assert key_facts(answer, language) == facts
    if facts:
        assert fact_recall(answer, facts) == 1.0  # the reference itself always contains its facts


def test_answer_facts_leave_out_what_the_question_already_says():

    facts = answer_facts("How much does the Heron H2 cost?", "The Heron H2 costs 12,400 euros.", "en")
    assert "12400" in [f.replace(",", "") for f in facts]
    assert not any("Heron" in f for f in facts)


def test_percent_spellings_are_one_fact():
    assert fact_recall("Orders get a 7% discount.", ["7 percent"]) == 1.0
    assert fact_recall("a 7 per cent discount", ["7%"]) == 1.0
    assert fact_recall("a 70% discount", ["7 percent"]) == 0.0


@pytest.mark.parametrize("sentence, spans", [
    ("The Kestrel K4 survey drone costs 8,950 euros.", ["Kestrel K4", "8,950 euros"]),
    ("Drones are usually repaired within 9 working days.", ["9 working days"]),
    ("Flights stop when the wind exceeds 12 metres per second.", ["12 metres per second"]),
    ("The prices are valid until 31 March 2026.", ["31 March 2026"]),
    ("Core hours run from 10:00 to 15:00, Monday to Thursday.", ["10:00 to 15:00", "Monday", "Thursday"]),
    ("SkyLedger 3.0 dropped support for Android 9.", ["SkyLedger 3.0", "Android 9"]),
    ("The software costs 39 euros per drone per month.", ["39 euros"]),  # "per" alone is no unit
    ("The chief executive of Tessarine is Jonas Villemo.", ["Tessarine", "Jonas Villemo"]),
    ("Visitors must wear safety glasses.", []),
    ("星河三号无人机的售价为2999元。", ["2999元"]),
    ("保修期为24个月，详见《用户手册》。", ["24个月", "用户手册"]),
])
def test_answer_spans(sentence, spans):
    assert answer_spans(sentence) == spans
