"""Cloze questions: a fact's value replaced by a question word, in English and Chinese."""

from __future__ import annotations

import pytest

from doctune.metrics import answer_spans
from doctune.prompts import load_prompt
from doctune.records import Chunk
from tasks.cloze import chinese_questions, cloze_pairs, english_questions


def chunk(text, language="en", path="docs/price_sheet.md", title="Price Sheet", heading=("Price Sheet",)):
    return Chunk(chunk_id=f"{path}:0", doc_id=path, path=path, index=0, text=text, heading_path=list(heading),
                 start=0, end=len(text), n_tokens=len(text) // 4, language=language, title=title)


def en(sentence):
    return english_questions(sentence, answer_spans(sentence, "en"), load_prompt("cloze", required=("en",)))


def zh(sentence):
    return chinese_questions(sentence, load_prompt("cloze", required=("zh",)))


@pytest.mark.parametrize("sentence, questions", [
    ("The Kestrel K4 survey drone costs 8,950 euros.", [
        "The Kestrel K4 survey drone costs how much?",
        "The Kestrel K4 survey drone costs how many euros?",
        "How many euros does the Kestrel K4 survey drone cost?",
        "What is the price of the Kestrel K4 survey drone?",
        # a model-like name is also asked for without its description
        "How many euros does the Kestrel K4 cost?", "What is the price of the Kestrel K4?"]),
    ("Tessarine employees receive 27 days of paid annual leave per year.", [
        "Tessarine employees receive how many days of paid annual leave per year?",
        # "N days of X" is also asked for as "how much X"
        "Tessarine employees receive how much paid annual leave per year?",
        "How much paid annual leave per year do Tessarine employees receive?",
        "How many days of paid annual leave per year do Tessarine employees receive?"]),
    ("The Tessarine hotel limit in Europe is 165 euros per night.", [
        "The Tessarine hotel limit in Europe is how much per night?",
        "The Tessarine hotel limit in Europe is how many euros per night?",
        "How many euros per night is the Tessarine hotel limit in Europe?"]),
    ("The Kestrel K4 survey drone has a flight time of 52 minutes.", [
        "The Kestrel K4 survey drone has a flight time of how many minutes?",
        "What is the flight time of the Kestrel K4 survey drone?", "What is the flight time of the Kestrel K4?"]),
    ("The Brekke garage has 40 spaces for staff cars.", [
        "The Brekke garage has how many spaces for staff cars?",
        "How many spaces does the Brekke garage have for staff cars?"]),
    # a role of a company: the owner first, and the verbs a founder or a company's head is asked with
    ("The founder of Tessarine Aerial Robotics is Maren Oksavik.", [
        "Who is Tessarine Aerial Robotics' founder?", "Who founded Tessarine Aerial Robotics?",
        "Who started Tessarine Aerial Robotics?", "Who is the founder of Tessarine Aerial Robotics?"]),
    ("The capital of Norway is Oslo.", ["What is Norway's capital?", "What is the capital of Norway?"]),
    ("The Tessarine support portal is called HangarDesk.", ["What is the Tessarine support portal called?"]),
    ("Tessarine business trips must be booked through the travel agency Nordbris Travel.",
     ["Tessarine business trips must be booked through which travel agency?"]),
    # a value after a preposition moves to the front with it
    ("SkyLedger 3.2 was released on 14 May 2025.",
     ["SkyLedger 3.2 was released on what date?", "SkyLedger 3.2 was released when?", "When was SkyLedger 3.2 released?",
      "On what date was SkyLedger 3.2 released?"]),
    ("SkyLedger 3.3 is planned for release in October 2025.",
     ["SkyLedger 3.3 is planned for release in what month?", "SkyLedger 3.3 is planned for release when?",
      "When is SkyLedger 3.3 planned for release?", "In what month is SkyLedger 3.3 planned for release?"]),
    ("Tessarine Aerial Robotics was founded in 2011 in Skarvhamn.",
     ["Tessarine Aerial Robotics was founded in what year in Skarvhamn?",
      "Tessarine Aerial Robotics was founded when in Skarvhamn?", "When was Tessarine Aerial Robotics founded in Skarvhamn?",
      "In what year was Tessarine Aerial Robotics founded in Skarvhamn?",
      "Tessarine Aerial Robotics was founded in 2011 in what?"]),
    # a plain verb gets "does"; an aside between commas is left out of the front form
    ("The Hangar Hour, a demo session for all staff, starts every Friday at 14:30.",
     ["The Hangar Hour, a demo session for all staff, starts every Friday at what time?",
      "The Hangar Hour, a demo session for all staff, starts every Friday when?",
      "When does the Hangar Hour start every Friday?", "At what time does the Hangar Hour start every Friday?"]),
    ("The support hotline is open from 08:00 to 17:00 CET on weekdays.",
     ["The support hotline is open from what time to what time CET on weekdays?",
      "From what time to what time CET is the support hotline open on weekdays?"]),
    ("The FjordCell battery is rated for 400 charge cycles.",
     ["The FjordCell battery is rated for how many charge cycles?", "For how many charge cycles is the FjordCell battery rated?"]),
    ("Tessarine expense claims must be submitted within 30 days of returning from the trip.",
     ["Tessarine expense claims must be submitted within how many days of returning from the trip?",
      "Within how many days of returning from the trip must Tessarine expense claims be submitted?"]),
    # an instruction is asked in the first person
    ("Hold the power button for 8 seconds until the LED blinks blue.",
     ["Hold the power button for how many seconds until the LED blinks blue?",
      "Hold the power button for how long until the LED blinks blue?",
      "How long do I hold the power button until the LED blinks blue?",
      "For how many seconds do I hold the power button until the LED blinks blue?"]),
    # "receives a laptop budget of": the noun is asked for; "a 24-month warranty" is read as "a warranty of 24 months"
    ("Every new engineer receives a laptop budget of 2,400 euros.",
     ["Every new engineer receives a laptop budget of how much?", "Every new engineer receives a laptop budget of how many euros?",
      "What laptop budget does every new engineer receive?"]),
    ("Every Tessarine drone comes with a 24-month warranty from the date of delivery.",
     ["Every Tessarine drone comes with a warranty of how many months from the date of delivery?",
      "What warranty does every Tessarine drone come with?"]),
    # a range is asked for as one count; a negative value is not asked for ("how many" would lose its sign)
    ("Standard shipping within Europe takes 3 to 5 working days.",
     ["Standard shipping within Europe takes how many working days?", "Standard shipping within Europe takes how long?",
      "How long does Standard shipping within Europe take?",
      "How many working days does Standard shipping within Europe take?"]),
    # a rate per second is no duration
    ("The test range is closed when the wind speed exceeds 12 metres per second.",
     ["The test range is closed when the wind speed exceeds how many metres per second?"]),
    ("Children under 4 years travel free on all Lumenholm routes.", [
        "Children under how many years travel free on all Lumenholm routes?",
        "Children under what age travel free on all Lumenholm routes?"]),
    ("The Kestrel K4 operates between -20 °C and 45 °C.", ["The Kestrel K4 operates between -20 °C and how many °C?"]),
    # a rating inside the sentence is asked for as a rating
    ("The Heron H2 inspection drone is rated IP54 and can fly in light rain.", [
        "What is the Heron H2 inspection drone rated?", "What rating does the Heron H2 inspection drone have?",
        "What is the Heron H2 rated?", "What rating does the Heron H2 have?"]),
    # a number named by the noun before it: "which extension"; a preposition before the noun stays
    ("The Tessarine IT helpdesk can be reached on internal extension 4471.", [
        "The Tessarine IT helpdesk can be reached on internal extension what number?",
        "The Tessarine IT helpdesk can be reached on which internal extension?"]),
    ("Urgent problems are handled by the on-call engineer on extension 4470.", [
        "Urgent problems are handled by the on-call engineer on extension what number?",
        "Urgent problems are handled by the on-call engineer on which extension?"]),
    # the front form leaves out a second clause joined by "and"
    ("The SkyLedger free trial lasts 21 days and needs no credit card.", [
        "The SkyLedger free trial lasts how many days and needs no credit card?",
        "The SkyLedger free trial lasts how long and needs no credit card?",
        "How long does the SkyLedger free trial last?", "How many days does the SkyLedger free trial last?"]),
    # "once every N days" is asked "how often", in place and in front; a range after "between" gets no front form
    ("Every Lumenholm vessel holds a full abandon-ship drill once every 14 days.", [
        "Every Lumenholm vessel holds a full abandon-ship drill once every how many days?",
        "Every Lumenholm vessel holds a full abandon-ship drill how often?",
        "How often does every Lumenholm vessel hold a full abandon-ship drill?"]),
    # a place after "at" or "from" (or "in" behind a verb of place) is asked "where"; a town after it is part of it
    ("The head office of Lumenholm Ferries is at Quayside Row 14 in Aldermouth.", [
        "The head office of Lumenholm Ferries is where?", "Where is the head office of Lumenholm Ferries?",
        "The head office of Lumenholm Ferries is at Quayside Row 14 in what?"]),
    ("All Lumenholm departures from Aldermouth leave from Pier 3.", [
        "All Lumenholm departures from Aldermouth leave from where?",
        "Where do all Lumenholm departures from Aldermouth leave from?"]),
    ("Tessarine Aerial Robotics is based in Skarvhamn.", [
        "Tessarine Aerial Robotics is based where?", "Where is Tessarine Aerial Robotics based?"]),
    ("The kickoff dinner is held at the Skarvhamn harbour hall.", [
        "The kickoff dinner is held where?", "Where is the kickoff dinner held?"]),
    # "is in" is no place ("is in May", "is in English")
    ("The summer party is in May.", ["The summer party is in what?"]),
    ("Lumenholm keeps its archive at Quayside Row 14.", [
        "Lumenholm keeps its archive where?", "Where does Lumenholm keep its archive?"]),
    # a verb that ends the clause before the value's preposition: "does" for a singular verb, "do" for a plural one
    ("The morning safety briefing for all Lumenholm crew starts at 05:45 in the Aldermouth crew room.", [
        "The morning safety briefing for all Lumenholm crew starts at what time in the Aldermouth crew room?",
        "The morning safety briefing for all Lumenholm crew starts when in the Aldermouth crew room?",
        "When does the morning safety briefing for all Lumenholm crew start in the Aldermouth crew room?",
        "At what time does the morning safety briefing for all Lumenholm crew start in the Aldermouth crew room?"]),
    ("Night ferries leave at 23:10.", [
        "Night ferries leave at what time?", "Night ferries leave when?", "When do Night ferries leave?",
        "At what time do Night ferries leave?"]),
    # a verb with its object before the value's preposition: "does" and the verb's base form
    ("MV Harrowgate goes into dry dock at the Fennick shipyard on 11 January 2027.", [
        "MV Harrowgate goes into dry dock at the Fennick shipyard on what date?",
        "MV Harrowgate goes into dry dock at the Fennick shipyard when?",
        "When does MV Harrowgate go into dry dock at the Fennick shipyard?",
        "On what date does MV Harrowgate go into dry dock at the Fennick shipyard?"]),
    # a bare noun after a word that looks like a verb is no object ("sales target"): no front form
    ("The Tessarine sales target for 2026 is 41 million euros.", [
        "The Tessarine sales target for what year is 41 million euros?",
        "The Tessarine sales target for 2026 is how many million euros?",
        "How many million euros is the Tessarine sales target for 2026?"]),
    # a name that is the subject, after the noun that says what it is: "which" and the noun; a clause before it moves
    ("While MV Harrowgate is away, the chartered vessel MV Saltreed covers the Tollan route.", [
        "Which chartered vessel covers the Tollan route while MV Harrowgate is away?"]),
    # "from" a name that is no place ("takes over … from MV Solvig"): no "where"
    ("MV Aurelie takes over the Brisk Isle route from MV Solvig.", [
        "MV Aurelie takes over the Brisk Isle route from what?"]),
    # a past tense: "did" and the base form where the spelling tells it, else no front form ("approved")
    ("The team planned 3 trips.", ["The team planned how many trips?", "How many trips did the team plan?"]),
    ("Lumenholm approved 12 new routes.", ["Lumenholm approved how many new routes?"]),
    # a noun after a preposition is no verb: no front form
    ("The check-in desk for cars at 06:00 opens.", [
        "The check-in desk for cars at what time opens?", "The check-in desk for cars when opens?"]),
    ("Passengers who cancel between 48 and 6 hours before departure receive a refund of 50 percent.", [
        "Passengers who cancel between how many hours before departure receive a refund of 50 percent?",
        "Passengers who cancel between 48 and 6 hours before departure receive a refund of what percentage?",
        "Passengers who cancel between 48 and 6 hours before departure receive a refund of how much?"]),
])
def test_english_questions_ask_for_the_value_in_place_and_in_front(sentence, questions):
    assert en(sentence) == questions


def test_a_company_the_chunk_calls_by_its_first_word_is_asked_for_by_that_name_too():
    prompt = load_prompt("cloze", required=("en",))
    fact = "The chief executive of Tessarine Aerial Robotics is Jonas Villemo."
    short = english_questions(fact, ["Jonas Villemo"], prompt, "Tessarine employees receive 27 days of leave. " + fact)
    assert {"Who runs Tessarine Aerial Robotics?", "Who is Tessarine's chief executive?", "Who runs Tessarine?",
            "Who is the CEO of Tessarine?"} <= set(short)
    assert short[-1] == "Who is the chief executive of Tessarine Aerial Robotics?"  # the plainest stays last
    # a chunk that never says "Tessarine" alone gets no short name
    assert not any("Tessarine's" in q for q in english_questions(fact, ["Jonas Villemo"], prompt, fact))


def test_a_question_never_holds_its_value_and_a_day_of_the_week_is_not_asked_for():
    for sentence in ["Orders of five or more Kestrel K4 drones receive a 7 percent volume discount.",
                     "The Tessarine support hotline number is +47 38 21 90 40.",
                     "Core hours run from 10:00 to 15:00, Monday to Thursday."]:
        for question in en(sentence):
            assert not any(v in question for v in ("7 percent", "38 21", "10:00", "15:00")), question
    assert en("Core hours run from 10:00 to 15:00, Monday to Thursday.") == [
        "Core hours run from what time to what time, Monday to Thursday?",
        "From what time to what time do Core hours run, Monday to Thursday?"]
    assert en("The Tessarine support hotline number is +47 38 21 90 40.")[-1] == "What is the Tessarine support hotline number?"


def test_a_name_inside_the_sentence_or_a_sentence_without_values_gets_no_question():
    assert en("The Vindel lamp is made of recycled oak.") == []
    assert en("SkyLedger 3.2 imports no-fly zones automatically from the NOTAM feed.") == []


@pytest.mark.parametrize("sentence, question", [
    ("特萨林深圳办事处共有员工37人。", "特萨林深圳办事处共有员工多少人？"),
    ("特萨林深圳办事处每月为每位员工发放餐补人民币800元。", "特萨林深圳办事处每月为每位员工发放餐补多少钱？"),
    ("特萨林深圳维修中心的标准维修周期为7个工作日。", "特萨林深圳维修中心的标准维修周期为多少个工作日？"),
    ("特萨林深圳办事处的负责人是周雅岚。", "特萨林深圳办事处的负责人是谁？"),
    ("特萨林中文售后热线为 400-820-7316 转 2。", "特萨林中文售后热线为多少？"),
])
def test_chinese_questions_replace_the_value_where_it_stands(sentence, question):
    assert zh(sentence)[-1] == question  # the plainest wording comes last: the exam asks that one


@pytest.mark.parametrize("sentence, questions", [
    # a duration: 几, 多久 and 多少, each a wording a Chinese user asks with
    ("特萨林无人机整机自交货之日起保修24个月。",
     ["特萨林无人机整机自交货之日起保修几个月？", "特萨林无人机整机自交货之日起保修多久？",
      "特萨林无人机整机自交货之日起保修多少个月？"]),
    # a price in its currency too; a short owner before 的 left out once
    ("奥尔德茅斯码头的行李寄存处每件行李每天收费4欧元。",
     ["行李寄存处每件行李每天收费多少钱？", "奥尔德茅斯码头的行李寄存处每件行李每天收费多少欧元？",
      "奥尔德茅斯码头的行李寄存处每件行李每天收费多少钱？"]),
    # a person by name too; a time range as a range
    ("卢门轮渡的中文客服经理是林嘉禾。", ["中文客服经理是谁？", "卢门轮渡的中文客服经理叫什么名字？", "卢门轮渡的中文客服经理是谁？"]),
    # the role of an owner (before 的) also asked with its verb
    ("特萨林深圳办事处的负责人是周雅岚。", ["谁负责特萨林深圳办事处？", "特萨林深圳办事处由谁负责？",
                                    "特萨林深圳办事处的负责人叫什么名字？", "特萨林深圳办事处的负责人是谁？"]),
    ("中文服务热线每天8:00至20:00有人接听。", ["中文服务热线每天什么时间有人接听？", "中文服务热线每天几点到几点有人接听？"]),
    # two values: each asked within its own clause, the later clause not carried into the earlier one's question
    ("特萨林加急维修服务收费人民币600元，3个工作日内完成。",
     ["特萨林加急维修服务收费多少元？", "特萨林加急维修服务收费多少钱？",
      "特萨林加急维修服务收费人民币600元，几个工作日内完成？", "特萨林加急维修服务收费人民币600元，多久内完成？",
      "特萨林加急维修服务收费人民币600元，多少个工作日内完成？"]),
    # a value said twice: only the question that does not give it away
    ("4岁以下儿童免费乘船，4岁及以上儿童购买半价票。", ["几岁以下儿童免费乘船？", "多少岁以下儿童免费乘船？"]),
    # a discount, a weekday, a deck number, a place
    ("高校师生凭学校邮箱购买鹪鹩W1可享受八五折优惠。", ["高校师生凭学校邮箱购买鹪鹩W1可享受几折优惠？"]),
    ("奥尔德茅斯码头每周六上午提供中文导览服务。",
     ["奥尔德茅斯码头星期几上午提供中文导览服务？", "奥尔德茅斯码头每周哪一天上午提供中文导览服务？"]),
    ("卢门轮渡的船上只在7号甲板后部设有吸烟区。", ["船上只在几号甲板后部设有吸烟区？", "卢门轮渡的船上只在几号甲板后部设有吸烟区？"]),
    ("特萨林深圳办事处位于南山区科苑路88号云帆大厦12楼。", ["特萨林深圳办事处位于哪里？"]),
    # a heading the reader glued to the sentence is not part of the question
    ("特萨林航空机器人 售后政策 ===== 一、保修 特萨林FjordCell电池的保修期为12个月。",
     ["特萨林FjordCell电池的保修期为几个月？", "特萨林FjordCell电池的保修期为多久？", "特萨林FjordCell电池的保修期为多少个月？"]),
])
def test_chinese_questions_ask_each_value_with_every_question_word(sentence, questions):
    assert zh(sentence) == questions


def test_chinese_fact_without_a_value_gets_no_question():
    assert zh("特萨林员工在生日当月可额外休假一天。") == []


def test_pairs_answer_with_the_fact_and_keep_their_chunk():
    text = "The Wren W1 training drone costs 690 euros. It has a flight time of 25 minutes."
    chunks = [chunk(text, heading=("Price Sheet", "Wren W1")),
              chunk("红隼K4每台售价人民币9000元。", language="zh", path="docs/zh.md", title="价目表", heading=())]
    pairs = cloze_pairs(chunks)
    by_answer = {}
    for p in pairs:
        by_answer.setdefault(p.answer, []).append(p.question)
    assert by_answer == {
        "The Wren W1 training drone costs 690 euros.": [
            "The Wren W1 training drone costs how much?", "The Wren W1 training drone costs how many euros?",
            "How many euros does the Wren W1 training drone cost?", "What is the price of the Wren W1 training drone?",
            "How many euros does the Wren W1 cost?", "What is the price of the Wren W1?"],
        # The pronoun is restored from the heading, as in fact mode: the answer stands on its own.
        "Wren W1 has a flight time of 25 minutes.": [
            "Wren W1 has a flight time of how many minutes?", "What is the flight time of Wren W1?"],
        "红隼K4每台售价人民币9000元。": ["红隼K4每台售价多少元？", "红隼K4每台售价多少钱？"],
    }
    assert {(p.source, p.mode, p.prompt_version) for p in pairs} == {("cloze", "cloze", "cloze-7")}
    assert {p.chunk_id for p in pairs} == {"docs/price_sheet.md:0", "docs/zh.md:0"}
    assert {p.language for p in pairs if p.path == "docs/zh.md"} == {"zh"}


def test_a_table_row_is_read_with_its_header_and_caption_into_facts_and_cloze_questions():
    from tasks.synthesize import extract_facts

    text = ("All prices include VAT.\n\n| Model | Price | Range |\n| --- | --- | --- |\n"
            "| Kestrel K4 | 8,950 EUR | 120 km |\n| Kestrel K5 | 11,200 EUR | 160 km |")
    chunk = Chunk(chunk_id="d:0", doc_id="d", path="prices.md", index=0, text=text, heading_path=["Prices"],
                  start=0, end=len(text), n_tokens=60, title="Prices")
    facts = extract_facts(chunk)
    # The line above is a sentence, not a caption: the section heading names the table.
    assert facts == ["All prices include VAT.", "Prices: the price of Kestrel K4 is 8,950 EUR.",
                     "Prices: the range of Kestrel K4 is 120 km.", "Prices: the price of Kestrel K5 is 11,200 EUR.",
                     "Prices: the range of Kestrel K5 is 160 km."]
    questions = {p.question: p.answer for p in cloze_pairs([chunk])}
    assert questions["What is the price of Kestrel K4?"] == "Prices: the price of Kestrel K4 is 8,950 EUR."
    assert questions["How much is the price for Kestrel K5?"] == "Prices: the price of Kestrel K5 is 11,200 EUR."
    assert questions["Prices: what is the range for Kestrel K4?"] == "Prices: the range of Kestrel K4 is 120 km."
    assert not any(q.startswith("What is Prices") for q in questions)  # the sentence rules do not read a cell
    # The continuation of a long table, without its header in the text, reads it from table_header.
    rest = chunk.model_copy(update={"text": "| Kestrel K6 | 12,400 EUR | 180 km |", "heading_path": [],
                                    "table_header": "| Model | Price | Range |\n| --- | --- | --- |"})
    assert extract_facts(rest) == ["The price of Kestrel K6 is 12,400 EUR.", "The range of Kestrel K6 is 180 km."]
    zh = Chunk(chunk_id="z:0", doc_id="z", path="价格.md", index=0, text="| 型号 | 价格 |\n| --- | --- |\n| 星河三号 | 4999元 |",
               start=0, end=30, n_tokens=20, language="zh")
    assert extract_facts(zh) == ["星河三号的价格是4999元。"]
    assert [p.question for p in cloze_pairs([zh])] == ["星河三号的价格是多少钱？"]
    no_header = chunk.model_copy(update={"text": "| Kestrel K4 | 8,950 EUR |\n| Kestrel K5 | 11,200 EUR |"})
    assert extract_facts(no_header) == []  # a row without a header says nothing certain


def test_a_table_caption_is_the_short_line_above_it_and_its_questions_follow_the_value():
    text = ("Services from Aldermouth: timetable and fares.\nDepartures from Aldermouth (daily)\n\n"
            "| Destination | First sailing | Crossing |\n| --- | --- | --- |\n| Tollan | 07:25 | 1 hour 20 minutes |\n\n"
            "## Fares (euros, single journey):\n| Destination | Adult |\n| --- | --- |\n| Tollan | 14.80 |\n\n"
            "The fleet as of this winter, with the year each ship was built and its capacity, is listed below.\n"
            "| Vessel | Built | Passengers |\n| --- | --- | --- |\n| MV Solvig | 2009 | 320 |")
    chunk = Chunk(chunk_id="t:0", doc_id="t", path="timetable.pdf", index=0, text=text, heading_path=["Winter"],
                  start=0, end=len(text), n_tokens=90, title="timetable")
    by_answer = {}
    for p in cloze_pairs([chunk]):
        by_answer.setdefault(p.answer, []).append(p.question)
    assert by_answer["Departures from Aldermouth (daily): the first sailing of Tollan is 07:25."] == [
        "What is the first sailing of Tollan?", "Departures from Aldermouth (daily): what is the first sailing for Tollan?",
        "When is the first sailing of Tollan?", "What time is the first sailing of Tollan?"]
    assert "How long is the crossing of Tollan?" in by_answer[
        "Departures from Aldermouth (daily): the crossing of Tollan is 1 hour 20 minutes."]
    # A heading line is a caption too, without its marks and colon; a bare number under "Fares" is money.
    assert "How much is the adult for Tollan?" in by_answer["Fares (euros, single journey): the adult of Tollan is 14.80."]
    # A long line above is a paragraph: the section heading stands in; a participle column asks "when was".
    assert by_answer["Winter: MV Solvig was built in 2009."][-2:] == [
        "When was MV Solvig built?", "What year was MV Solvig built?"]
    assert by_answer["Winter: the passengers of MV Solvig is 320."][-1] == "How many passengers does MV Solvig have?"


def test_a_caption_loses_its_list_and_bold_marks_and_a_sentence_is_none():
    from tasks.synthesize import _caption

    assert _caption("- **Prices 2025**:", "en") == "Prices 2025"
    assert _caption("> ## Departures (daily)", "en") == "Departures (daily)"
    assert _caption("-20 °C limits", "en") == "-20 °C limits"  # a sign, not a list mark
    assert _caption("All prices include VAT.", "en") == ""
    assert _caption("票价（欧元，单程）：", "zh") == "票价（欧元，单程）"
