"""Cloze questions: a fact sentence with one value replaced by a question word.

The SmolLM2-135M default writes a usable question for about half of the facts, and many of the
rest ask about something the fact does not say ("Where is the Kestrel K4?" for its price). A
model trained on those learns each fact under one or two wordings, and a differently worded
question then gets the right sentence with a neighbouring fact's value. Cloze questions give every
fact questions that ask for its value, written by rules, not by the model:

    The Kestrel K4 survey drone costs 8,950 euros.
      -> How much does the Kestrel K4 survey drone cost?
      -> The Kestrel K4 survey drone costs how much?
    SkyLedger 3.2 was released on 14 May 2025.
      -> On what date was SkyLedger 3.2 released?
    Hold the power button for 8 seconds.
      -> For how many seconds do I hold the power button?
    特萨林深圳办事处共有员工37人。 -> 特萨林深圳办事处共有员工多少人？

They cost no LLM call, so they work offline and in Chinese (where the value stays in place in a
question anyway). The answer is the fact sentence, as in fact mode. They stay in the training
split: the held-out questions stay the ones the LLM wrote."""

from __future__ import annotations

import re

from prefect import task

from doctune.metrics import facts_found
from doctune.prefect_utils import CACHE
from doctune.prompts import load_prompt, render
from doctune.records import Chunk, QAPair
from tasks.synthesize import (MONTHS, PARTICIPLE_COLUMN, WEEKDAYS, TableCell, cell_of, extract_facts,
                              question_targets)

PROMPT = "cloze"

_MONTH = rf"({MONTHS})"
_WEEKDAY = rf"({WEEKDAYS})s?"
_DURATION_UNITS = {"second", "seconds", "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks", "month",
                   "months"}  # not years: "under 4 years" is an age more often than a duration
_CURRENCY = {"euro", "euros", "eur", "dollar", "dollars", "usd", "kroner", "nok", "yuan", "rmb"}
# Words that are neither the verb after a subject nor a counted noun after a bare number.
_NOT_A_COUNT_OR_VERB = {
    "at", "in", "on", "of", "to", "for", "from", "by", "with", "than", "until", "within", "the", "a", "an",
    "per", "about", "above", "below", "least", "over", "under", "between", "and", "or", "is", "are", "was", "were",
    "has", "have", "does", "do", "its", "their", "this", "that", "extension", "number",
}
# Kinds of value a front form is written for (a name is asked for in place, or by "which").
_MOVABLE = {"count", "money", "percent", "number", "year", "date", "month", "time", "time_range"}
# Prepositions that move to the front with the value ("On what date was …", "Within how many days …").
_PREPOSITIONS = "in|on|at|within|until|by|for|after|before|from"
_AUXILIARY = "is|are|was|were|must|can|could|should|will|would|may|might"
# Verbs that end a clause before a time or a place ("The briefing starts at 05:45", "Ferries leave from Pier 3"):
# a closed list, since a plural noun looks like a verb ("Dogs travel on Lumenholm ferries for 6 euros").
_EVENT_VERBS = ("(?:starts?|begins?|opens?|closes?|ends?|finish(?:es)?|leaves?|departs?|arrives?|sails?|runs?|stops?|"
                "returns?|meets?|expires?|apply|applies|operates?|takes? place)")
_DETERMINER = "the|a|an|every|all|each|its|their|your|our|both"
_SUBJECT = r"[A-Z][^,]*?"  # from the capital that starts the sentence, as short as the rest allows
_VERB_S = r"[a-z]+[^s\W]s"  # "costs", "reimburses" (not "class"): a singular verb, or a plural noun
_ROLE = re.compile(r"\b(founder|chief|ceo|head|manager|director|controller|owner|contact|chair|president|lead)\b", re.I)
# A company's head, asked for as the one who runs or leads it.
_LEADER = re.compile(r"chief executive(?: officer)?|ceo|managing director|president|head|general manager|director",
                     re.I)
_ENGLISH_LEAD = re.compile(r"^(The|A|An|Every|All|Each) ")
# Nouns that name the number after them ("extension 4471", "room 12"), with up to one word before.
_LABEL_BEFORE = re.compile(
    r"\b((?:[a-z][a-z-]* )?(?:extension|room|floor|gate|line|channel|code|desk|building|hall|platform|bay)) $")
# A second clause: "and" followed by a verb ("and needs ...", "and can fly ...").
_AND_CLAUSE = re.compile(r",? and (?=(?:can|must|may|will|is|are|has|have|[a-z]+[^s\W]s)\b)")

ZH_UNITS = "个工作日|工作日|个月|分钟|小时|公斤|千克|公里|千米|米|天|周|年|次|台|架|人|名|位|个|岁|件|盒|份|张|层|楼"
_ZH_TIME_UNITS = {"个工作日", "工作日", "个月", "分钟", "小时", "天", "周", "年"}
_ZH_VALUES = [  # (pattern, kind), by priority where two overlap; the last two values of a sentence are asked for
    (re.compile(r"\d{3,4}-\d{3,4}-\d{3,4}(?:\s*转\s*\d+)?"), "number"),
    (re.compile(r"\d{1,2}:\d\d\s*(?:至|到|-|–|~)\s*\d{1,2}:\d\d"), "time_range"),
    (re.compile(r"(?:人民币)?\d+(?:[.,]\d+)*\s?(元|欧元|美元)"), "money"),
    (re.compile(rf"\d+(?:\.\d+)?(?:\s?(?:到|至|-|~)\s?\d+(?:\.\d+)?)?\s?({ZH_UNITS})"), "count"),
    (re.compile(r"\d{1,2}:\d\d"), "time"),
    (re.compile(r"[一二三四五六七八九]{1,2}折"), "discount"),
    (re.compile(r"每(?:周|星期)[一二三四五六日天]"), "weekday"),
    (re.compile(r"\d+号(?=[\u4e00-\u9fff])"), "ordinal"),
]
_ZH_PERSON = re.compile(r"(负责人|创始人|首席执行官|总经理|经理|主管|总监|联系人)(是|为)[\u4e00-\u9fff]{2,4}$")
# A section heading glued to the first sentence of a plain-text file ("售后政策 ===== 一、保修 特萨林无人机…").
_ZH_HEADING = re.compile(r"^(?:\S[^=]{0,30}?\s+=+\s+)?(?:[一二三四五六七八九十]+、\S{1,10}\s+)?")
# A word after a duration that lets "多久" stand for it ("开船前20分钟到达" -> "开船前多久到达").
_ZH_AFTER_DURATION = re.compile(r"^(?:$|[内后前，,]|到达|送达|完成|开具|有效)")


def _kind(target: str) -> str | None:
    """What a value is, for its question word."""
    words = target.split()
    low = target.lower()
    if re.fullmatch(_WEEKDAY, low):
        return None  # "Monday to Thursday": a day rarely is what a question asks for
    if re.search(rf"\b\d{{1,2}} {_MONTH}\b", low):
        return "date"
    if re.fullmatch(rf"{_MONTH} (19|20)\d\d", low):
        return "month"
    if not any(c.isdigit() for c in target) or words[0][0].isalpha():
        return "name"  # "Nordbris Travel", "Android 9", "SkyLedger 3.2"
    if re.fullmatch(r"\d{1,2}:\d\d\s+(to|and|-|–)\s+\d{1,2}:\d\d(\s+[A-Z]{2,4})?", target):
        return "time_range"
    if re.fullmatch(r"\d{1,2}:\d\d", target):
        return "time"
    if re.fullmatch(r"(19|20)\d\d", target):
        return "year"
    if len(words) > 1 and words[1].lower() in ("percent", "per", "%") and "cent" in low or low.endswith("%"):
        return "percent"
    if len(words) > 1 and words[1].lower() in _CURRENCY:
        return "money"
    if len(words) > 1 and not any(c.isdigit() for c in words[-1]):
        return "count"
    return "number"


def _counted(after: str) -> str:
    """The one or two plain words after a bare number ("400 charge cycles for ..." -> "charge cycles")."""
    words = []
    for word in after.split()[:2]:
        if not re.fullmatch(r"[a-z][a-z-]+", word) or word in _NOT_A_COUNT_OR_VERB:
            break
        words.append(word)
    return " ".join(words) if after.startswith(" ") else ""


def _upper_first(words: str) -> str:
    """The first letter upper case, the rest as it is ("how much" -> "How much", "within" -> "Within")."""
    return words[:1].upper() + words[1:]


def _lower_lead(subject: str) -> str:
    return _ENGLISH_LEAD.sub(lambda m: m.group(1).lower() + " ", subject)


def _past_base(verb: str) -> str | None:
    """The base form of a past tense where its spelling tells it: "carried" -> "carry", "dropped" -> "drop"; None
    otherwise ("approved" / "opened": whether an "e" comes back is not in the spelling)."""
    if verb.endswith("ied"):
        return verb[:-3] + "y"
    stem = verb[:-2]
    if stem[-1] == stem[-2] and stem[-1] not in "aeioudlsfz":  # "dropped", "planned" (not "added", "called")
        return stem[:-1]
    return None


def _verb_base(verb: str) -> str:
    if verb.endswith(("ches", "shes", "sses", "xes", "zzes", "oes")):  # "goes" -> "go"
        return verb[:-2]
    return verb[:-3] + "y" if verb.endswith("ies") else verb[:-1]


def english_questions(fact: str, targets: list[str], prompt: dict, text: str = "") -> list[str]:
    """Questions asking for the fact's last two values: the value in place ("… costs how much?")
    and, for the sentence shapes below, moved to the front ("How much does … cost?"). `text` is the fact's
    chunk: a company it calls by its short name is asked for by that name too."""
    sentence = fact.strip().rstrip(".!")
    t = prompt["en"]
    questions = []
    kinds = [(v, kind) for v in targets if (kind := _kind(v))]
    for target, kind in kinds[-2:]:
        questions += [q for q in _questions_for(sentence, target, kind, t, text) if not facts_found(q, [target])[0]]
    return list(dict.fromkeys(questions))


def _name_question(before: str, t: dict, text: str) -> list[str]:
    """Questions for a name that ends the sentence, the plainest last; `before` is the sentence up to the name."""
    if m := re.fullmatch(r"(.+) (is|are|was|were) called ", before):
        return [render(t["front_called"], be=m.group(2), subject=_lower_lead(m.group(1)))]
    if m := re.fullmatch(r"(.+) (is|are|was|were) ", before):
        wh = "Who" if _ROLE.search(m.group(1)) else "What"
        return _owner_questions(m.group(1), wh, m.group(2), t, text) + [
            render(t["front_copula"], wh=wh, be=m.group(2), subject=_lower_lead(m.group(1)), rest="")]
    m = re.search(r"\bthe ((?:[a-z][a-z-]* ){0,2}[a-z][a-z-]*),? $", before)
    if m and m.group(1).split()[-1] not in _NOT_A_COUNT_OR_VERB:
        # "through the travel agency Nordbris Travel" -> "through which travel agency"
        return [before[: m.start()] + render(t["which"], np=m.group(1)) + "?"]
    return [before + render(t["name"]) + "?"]


def _owner_questions(subject: str, wh: str, be: str, t: dict, text: str) -> list[str]:
    """"The founder of Lumenholm Ferries is …": asked with the owner first ("Who is Lumenholm Ferries' founder?"),
    and for a founder or a company's head with the verbs people use ("Who founded …?", "Who runs …?"); a company
    the chunk also calls by its first word alone ("Tessarine" for "Tessarine Aerial Robotics") by that name too."""
    m = re.fullmatch(r"[Tt]he ((?:[a-z-]+ ){0,2}[a-z-]+|CEO) of ((?:the )?[A-Z][\w&.-]*(?: [A-Z0-9][\w&.-]*)*)",
                     subject)
    if not m:
        return []
    role, owner = m.group(1), m.group(2)
    owners = [owner]
    if len(words := owner.split()) > 1 and words[0] != "the" \
            and re.search(rf"\b{re.escape(words[0])}\b(?! {re.escape(words[1])})", text):
        owners.append(words[0])
    questions = []
    for name in owners:
        possessive = name + ("'" if name.endswith("s") else "'s")
        questions.append(render(t["front_possessive"], wh=wh, be=be, np=role, owner=possessive))
        if wh == "Who":
            kind = "founder" if role == "founder" else "leader" if _LEADER.fullmatch(role) else None
            questions += [render(q, owner=name) for q in t.get(kind, [])] if kind else []
    return [q for q in dict.fromkeys(questions) if q.lower() != f"who is the {role.lower()} of {owner.lower()}?"]


def _questions_for(sentence: str, target: str, kind: str, t: dict, text: str = "") -> list[str]:
    sentence, new_target = _unit_after_noun(sentence, target)
    if new_target != target:
        target, kind = new_target, _kind(new_target)
    i = sentence.rfind(target)
    if i <= 0 or sentence[i - 1] == "-":
        return []  # not found, the subject itself, or a negative value ("-20 °C": "how many" loses the sign)
    before, after = sentence[:i].rstrip("+"), sentence[i + len(target):]
    unit = re.sub(r"^(?:to|and|-|–) [\d.,]+ ", "", " ".join(target.split()[1:]))  # "3 to 5 working days"
    if kind == "name":
        if m := re.fullmatch(r"(.+) (is|are) rated ", before):  # "The Heron H2 is rated IP54 and ..."
            subject = _lower_lead(m.group(1))
            front = [render(t["front_rated"], be=m.group(2), subject=subject),
                     render(t["front_rating"], do="does" if m.group(2) == "is" else "do", subject=subject)]
            return _with_short_name(front, subject)
        if where := _where_questions(before, after, t) or _which_subject(before, after, t):
            return where
        # A name inside the sentence is usually its subject or the object of its verb: skipped.
        return [] if after.strip() else _name_question(before, t, text)
    if kind == "number" and (counted := _counted(after)):
        # "400 charge cycles": the words after a bare number say what it counts
        kind, unit, after = "count", counted, after[len(" " + counted):]
    if kind == "percent":
        before = re.sub(r"\ban? $", "", before)
    if kind == "number" and not after.strip() and (m := _LABEL_BEFORE.search(before)):
        # "reached on internal extension 4471" -> "reached on which internal extension?"
        start, np = m.start(), m.group(1)
        if (first := np.split()[0]) in _NOT_A_COUNT_OR_VERB:  # "on extension": the preposition stays
            start, np = start + len(first) + 1, np[len(first) + 1:]
        return [before + render(t["number"]) + "?", before[:start] + render(t["which"], np=np) + "?"]
    wh = render(t[kind], unit=unit)
    if kind == "money" and " per " in f" {unit} ":
        wh += " per " + unit.split(" per ", 1)[1]  # "48 euros per day" -> "how much per day"
    if kind == "time_range" and target.split()[-1].isalpha():
        wh += " " + target.split()[-1]  # "08:00 to 17:00 CET"
    questions = [before + wh + after + "?"]
    if kind == "money":  # also ask for the unit: "how many euros per night"
        questions.append(before + render(t["count"], unit=unit) + after + "?")
    questions += _other_words(before, after, kind, unit, t)
    return questions + _also_asked(_front_questions(before, after, kind, wh, unit, t), kind, unit, t)


_LEAD_WORDS = {"while", "when", "after", "before", "until", "if", "during", "since", "because", "in", "on", "at", "for",
               "from", "by"}


def _which_subject(before: str, after: str, t: dict) -> list[str]:
    """A name that is the sentence's subject after the noun that says what it is, asked for by "which" and that noun:
    "While MV Harrowgate is away, the chartered vessel MV Saltreed covers the Tollan route." -> "Which chartered
    vessel covers the Tollan route while MV Harrowgate is away?"."""
    m = re.fullmatch(r"(?:([A-Z][^,]*), )?[Tt]he ((?:[a-z-]+ ){0,2}[a-z-]+) ", before)
    if not m or not re.match(rf" (?:{_AUXILIARY}|{_VERB_S})\b", after) \
            or m.group(2).split()[-1] in _NOT_A_COUNT_OR_VERB:
        return []
    question = _upper_first(render(t["which"], np=m.group(2))) + after
    if lead := m.group(1):
        first, _, rest = lead.partition(" ")
        if first.lower() not in _LEAD_WORDS:
            return []
        question += f" {first.lower()} {rest}"
    return [question + "?"]


# Verbs after which "in" names a place ("is based in Oslo"); not "is in" ("is in May", "is in English"), and
# "founded in 2011 in Skarvhamn" stays "in what?".
_IN_A_PLACE = "located|based|situated|headquartered|held|kept|stored|registered|lives|live|works|work"


def _where_questions(before: str, after: str, t: dict) -> list[str]:
    """A name after "at" (or "from" after a verb of motion, "in" behind a verb of place) is asked for by "where",
    in place and in front: "The head office of Lumenholm Ferries is at Quayside Row 14 in Aldermouth." -> "The head
    office of Lumenholm Ferries is where?", "Where is the head office of Lumenholm Ferries?"; "All departures leave
    from Pier 3." -> "Where do all departures leave from?". A town after the place belongs to the same answer."""
    if after.strip() and not re.fullmatch(r",? in [A-Z][\w-]*(?: [A-Z0-9][\w-]*)*", after):
        if not (re.search(r" (?:at|from|in) the $", before) and re.fullmatch(r"(?: [a-z-]+){1,3}", after)):
            return []  # "is held at the Skarvhamn harbour hall": the place is the name and the nouns after it
        before = before[: -len("the ")]
    if (m := re.fullmatch(r"(.+) (at|from) ", before)) and (
            m.group(2) == "at" or re.search(rf"\b(?:{_EVENT_VERBS}|available|collected)$", m.group(1))):
        head, prep = m.group(1), m.group(2)  # "from" a place after a verb of motion; "takes over … from MV Solvig"
    elif m := re.fullmatch(rf"(.+ (?:{_IN_A_PLACE})) in ", before):
        head, prep = m.group(1), "in"
    else:
        return []
    tail = " from" if prep == "from" else ""  # "leave from where": the preposition stays with a verb of motion
    questions = [f"{head}{tail} {render(t['where'])}?"]
    if clause := _clause(head):
        subject, do, rest = clause
        questions.append(render(t["front_where"], do=do, subject=subject, rest=rest + tail))
    return questions


def _is_duration(kind: str, unit: str) -> bool:
    """"7 days", "3 to 5 working days"; not "12 metres per second" (a rate)."""
    return kind == "count" and bool(unit) and " per " not in f" {unit} " and unit.split()[-1] in _DURATION_UNITS


def _other_words(before: str, after: str, kind: str, unit: str, t: dict) -> list[str]:
    """The value in place once more with the question word people ask it with as often: "how often" for "once
    every 14 days", "how long" for a duration, "when" for a date, a year or a time, "how much" for a share."""
    if kind == "count" and re.match(r" of (?!the\b)[a-z]+(?<!ing)\b", after) \
            and not re.search(rf"\b(?:{_PREPOSITIONS}) $", before):
        # "receive 30 days of paid leave" -> "how much paid leave"
        return [before + render(t["money"]) + after[len(" of"):] + "?"]
    if kind == "count" and unit in ("year", "years") and re.search(r"\b(?:under|over|above|below|aged) $", before):
        return [before + render(t["age"]) + re.sub(r"^ old\b", "", after) + "?"]  # "Children under what age …"
    if _is_duration(kind, unit):
        if m := re.search(r"\b(?:once )?every $", before):
            questions = [before[: m.start()] + render(t["how_often"]) + after + "?"]
            if clause := _clause(before[: m.start()].rstrip()):  # "How often does every vessel hold a drill?"
                subject, do, rest = clause
                questions.append(render(t["front_verb"], wh=_upper_first(render(t["how_often"])), do=do,
                                        subject=subject, verb=rest.strip(), rest=after))
            return questions
        if not re.search(r"\b(?:under|over|above|below|aged|within|of|between) $", before):
            return [before + render(t["how_long"]) + after + "?"]
    if kind in ("date", "year", "month", "time") and (m := re.search(r"\b(?:on|in|at) $", before)):
        return [before[: m.start()] + render(t["when"]) + after + "?"]
    if kind == "percent":
        return [before + render(t["money"]) + after + "?"]
    return []


def _also_asked(front: list[str], kind: str, unit: str, t: dict) -> list[str]:
    """The front forms, after the same with "When" for "On what date", "How much" for "How many days of" and
    "How long" for "For how many days" ("When was SkyLedger 3.2 released?", "How long do I hold the power
    button?"); the front forms stay last (the exam asks the last question)."""
    other = []
    for q in front:
        if kind in ("date", "year", "month", "time") and (m := re.match(r"(On|In|At|Until|From|By) what \w+ ", q)):
            when = render(t["when"])
            lead = when if m.group(1) in ("On", "In", "At") else f"{m.group(1).lower()} {when}"
            other.append(_upper_first(lead) + " " + q[m.end():])
        elif kind == "count" and (m := re.match(rf"How many {re.escape(unit)} of ", q)):
            other.append(_upper_first(render(t["money"])) + " " + q[m.end():])
        elif _is_duration(kind, unit) and (
                m := re.match(rf"(?:For )?[Hh]ow many {re.escape(unit)} (?=do|does|is|are|must)", q)):
            other.append(_upper_first(render(t["how_long"])) + " " + q[m.end():])
    return other + front


def _unit_after_noun(sentence: str, target: str) -> tuple[str, str]:
    """"comes with a 24-month warranty" -> "comes with a warranty of 24 months": the same fact in
    the shape the rules below know how to ask about."""
    if m := re.fullmatch(r"(\d+)-([a-z]+)", target):
        if noun := re.search(rf"\ban? {re.escape(target)} ([a-z]+)", sentence):
            value = f"{m.group(1)} {m.group(2)}s"
            return sentence[: noun.start()] + f"a {noun.group(1)} of {value}" + sentence[noun.end():], value
    return sentence, target


def _front_questions(before: str, after: str, kind: str, wh: str, unit: str, t: dict) -> list[str]:
    """The value moved to the front: "How many euros does the Kestrel K4 cost?", "On what date was
    SkyLedger 3.2 released?"."""
    if kind not in _MOVABLE:
        return []
    wh_front = {"money": render(t["count"], unit=unit), "number": "what"}.get(kind, wh)
    # "lasts 21 days and needs no credit card": the front form asks of the first clause only
    after = _AND_CLAUSE.split(after, maxsplit=1)[0]
    if after.startswith((" of ", " per ")):
        wh_front, after = wh_front + after, ""  # "How many days of paid annual leave per year"
    front, subject = _after_preposition(before, after, wh_front, t)
    if kind in ("count", "money", "percent", "number") and not front:
        front, subject = _after_verb(before, after, kind, wh_front, t)
    return _with_short_name(front, subject)


def _after_verb(before: str, after: str, kind: str, wh: str, t: dict) -> tuple[list[str], str]:
    """A value right after the verb (or after "has a … of"); returns the questions and the subject."""
    wh = _upper_first(wh)
    if m := re.fullmatch(r"(.+) (has|have) an? ([a-z][a-z -]*) of ", before):
        subject = _lower_lead(m.group(1))
        return [render(t["front_has"], np=m.group(3), subject=subject)], subject
    if m := re.fullmatch(rf"({_SUBJECT}) ({_VERB_S})((?: with| to| for)?) an? ([a-z][a-z -]*) of ", before):
        # "Every new engineer receives a laptop budget of 2,400 euros" -> "What laptop budget does …"
        subject = _lower_lead(m.group(1))
        verb = _verb_base(m.group(2)) + m.group(3)
        return [render(t["front_np_verb"], np=m.group(4), do="does", subject=subject, verb=verb)], subject
    if m := re.fullmatch(r"(.+) (is|are|was|were) ", before):
        subject = _lower_lead(m.group(1))
        return [render(t["front_copula"], wh=wh, be=m.group(2), subject=subject, rest=after)], subject
    if (m := re.fullmatch(r"([A-Z][^,]*?) ([a-z]+) ", before)) and m.group(2) not in _NOT_A_COUNT_OR_VERB \
            and len(m.group(1).split()) <= 7:
        verb, subject = m.group(2), _lower_lead(m.group(1))
        singular = verb.endswith("s") and not verb.endswith("ss")
        do = "does" if singular else "do"
        base = _verb_base(verb) if singular else verb
        if verb.endswith("ed") and len(verb) > 4:  # "carried" -> "did … carry"; "approved": no base form known
            if (base := _past_base(verb)) is None:
                return [], ""
            do = "did"
        front = [render(t["front_verb"], wh=wh, do=do, subject=subject, verb=base, rest=after)]
        if kind == "money" and base == "cost" and not after.strip():
            front.append(render(t["front_price"], subject=subject))
        return front, subject
    if m := re.fullmatch(r"([A-Z][^,]*?) (has|have) ", before):  # "The garage has 40 spaces"
        subject = _lower_lead(m.group(1))
        return [render(t["front_verb"], wh=wh, do="does" if m.group(2) == "has" else "do", subject=subject,
                       verb="have", rest=after)], subject
    return [], ""


def _after_preposition(before: str, after: str, wh: str, t: dict) -> tuple[list[str], str]:
    """A value after a preposition, moved to the front with it: "was released on 14 May 2025" ->
    "On what date was … released?", "Hold … for 8 seconds" -> "For how many seconds do I hold …?"."""
    if not (m := re.fullmatch(rf"(.+) ({_PREPOSITIONS}) ", before)) or not (clause := _clause(m.group(1))):
        return [], ""
    subject, do, rest = clause
    return [render(t["front_prep"], prep=_upper_first(m.group(2)), wh=wh, do=do, subject=subject,
                   rest=rest + after)], subject


def _clause(head: str) -> tuple[str, str, str] | None:
    """The sentence before a value's preposition as (subject, auxiliary, rest) for a question in front of it:
    "SkyLedger 3.2 was released" -> ("SkyLedger 3.2", "was", " released"), "Lumenholm keeps its archive" ->
    ("Lumenholm", "does", " keep its archive"), "The morning briefing starts" -> ("the morning briefing", "does",
    " start"), "All departures leave" -> ("all departures", "do", " leave"), "Hold the button" -> ("I", "do",
    " hold the button"); None for what none of these reads (a long or a double subject)."""
    head = re.sub(r", [^,]+, ", " ", head)  # "The Hangar Hour, a demo session, starts …"
    if v := re.fullmatch(rf"({_SUBJECT}) ({_AUXILIARY})( .+)?", head):
        subject, do, rest = _lower_lead(v.group(1)), v.group(2), v.group(3) or ""
    elif (v := re.fullmatch(rf"([A-Z][^,]*?) ({_EVENT_VERBS})", head)) \
            and v.group(1).split()[-1].lower() not in _NOT_A_COUNT_OR_VERB:
        # a verb of time or motion ends the clause ("The briefing starts", "All departures leave"); "to leave" is none
        verb, *place = v.group(2).split()  # "takes place"
        singular = re.fullmatch(_VERB_S, verb) is not None
        subject, do = _lower_lead(v.group(1)), "does" if singular else "do"
        rest = " ".join(["", _verb_base(verb) if singular else verb, *place])
    elif (v := re.fullmatch(rf"({_SUBJECT}) ({_VERB_S}) ((?:(?:{_DETERMINER}|{_PREPOSITIONS}|into|onto)\b|[A-Z]).*)",
                            head)) and v.group(2) not in _NOT_A_COUNT_OR_VERB:
        # "covers the route", "goes into dry dock" (not "The Tessarine sales target": a bare noun after it is no object)
        subject, do, rest = _lower_lead(v.group(1)), "does", f" {_verb_base(v.group(2))} {v.group(3)}"
    elif (v := re.fullmatch(rf"([A-Z][a-z]+) ((?:{_DETERMINER}) .+)", head)) and not v.group(1).endswith("s") \
            and v.group(1).lower() not in _DETERMINER.split("|"):
        subject, do, rest = "I", "do", f" {v.group(1).lower()} {v.group(2)}"  # an instruction: "Hold the …"
    else:
        return None
    if len(subject.split()) > 8 or " and " in subject:
        return None
    return subject, do, rest


def _with_short_name(front: list[str], subject: str) -> list[str]:
    """The front forms again with the subject's short name: a product is asked for by its name alone
    as often as by its full description."""
    alias = _short_name(subject)
    return front + [q.replace(subject, alias) for q in front] if alias != subject else front


def _short_name(subject: str) -> str:
    """"the Kestrel K4 survey drone" -> "the Kestrel K4": a model-like name (with a digit) followed
    by one or two plain words. Anything else is kept whole ("the Tessarine meal allowance ...")."""
    m = re.fullmatch(r"(the )?([A-Z][\w-]*(?: [A-Z0-9][\w.-]*)*) ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", subject)
    return (m.group(1) or "") + m.group(2) if m and any(c.isdigit() for c in m.group(2)) else subject


def chinese_fact(fact: str) -> str:
    """The fact sentence without a section heading glued to its front by the reader."""
    sentence = fact.strip()
    head = _ZH_HEADING.match(sentence)
    rest = sentence[head.end():] if head else sentence
    return rest if len(rest) >= 8 else sentence


def _zh_values(sentence: str) -> list[tuple[re.Match, str]]:
    """The values of a Chinese sentence in order, a higher-priority kind winning where two overlap."""
    found: list[tuple[re.Match, str]] = []
    for pattern, kind in _ZH_VALUES:
        for m in pattern.finditer(sentence):
            if all(m.end() <= o.start() or m.start() >= o.end() for o, _ in found):
                found.append((m, kind))
    return sorted(found, key=lambda x: x[0].start())


def _zh_words(m: re.Match, kind: str, before: str, after: str, t: dict) -> list[str]:
    """The question words for one value, the plainest last."""
    if kind == "count":
        unit = m.group(1)
        words = [render(t["count_few"], unit=unit)]
        if unit in _ZH_TIME_UNITS and _ZH_AFTER_DURATION.match(after):
            words.append(render(t["how_long"]))
        return words + [render(t["count"], unit=unit)]
    if kind == "money":
        return [render(t["money_unit"], unit=m.group(1)), render(t["money"])]
    if kind == "number":
        return ([] if before.endswith("为") else [render(t["number_which"])]) + [render(t["number"])]
    if kind == "weekday":
        return [render(t["weekday_which"]), render(t["weekday"])]
    pairs = {"time": ("time_when", "time"), "time_range": ("time_range_when", "time_range")}
    if kind in pairs:
        return [render(t[k]) for k in pairs[kind]]
    return [render(t[kind])]


def _also_without_owner(asked: list[str]) -> list[str]:
    """`asked`, after its plainest question (the last) with the short owner before the first 的 left out, as people
    ask when the company is clear: "卢门轮渡的中文服务热线是多少？" -> "中文服务热线是多少？"."""
    if m := re.match(r"^[\u4e00-\u9fffA-Za-z0-9]{2,7}的(?=.{8,})", asked[-1]):
        return [asked[-1][m.end():]] + asked
    return asked


def _role_verbs(owner: str, role: str, t: dict) -> list[str]:
    """"X的负责人是…" asked with the verb people use for the role: "谁负责X？", "X由谁负责？" (创始人: 谁创立了X;
    a manager: 谁管理X); none without an owner before 的."""
    if not (m := re.fullmatch(r"([\u4e00-\u9fffA-Za-z0-9]{2,12})的", owner)):
        return []
    kind = {"负责人": "role_in_charge", "创始人": "role_founder"}.get(role, "role_manager")
    return [render(q, owner=m.group(1)) for q in t[kind]]


def chinese_questions(fact: str, prompt: dict) -> list[str]:
    """Questions for the last two values of a Chinese fact, each asked in place with every question word
    Chinese asks it with ("保修几个月", "保修多久", "保修多少个月"), and once more without a short owner
    before 的. The plainest question of the last value comes last (the exam asks that one). A question
    that still holds its value (a value said twice) is left out."""
    sentence = chinese_fact(fact).rstrip("。！!.")
    t = prompt["zh"]
    if m := _ZH_PERSON.search(sentence):
        head = sentence[: m.start()] + m.group(1)
        return _role_verbs(sentence[: m.start()], m.group(1), t) + _also_without_owner(
            [head + render(t["person_name"]) + "？", head + m.group(2) + render(t["person"]) + "？"])
    if m := re.search(r"(位于|坐落于)([^，,]{4,})$", sentence):
        return _also_without_owner([sentence[: m.start()] + m.group(1) + render(t["place"]) + "？"])
    questions: list[str] = []
    for m, kind in _zh_values(sentence)[-2:]:
        before, after = sentence[: m.start()].rstrip(), sentence[m.end():].lstrip()
        after = re.split(r"[，,；;]", after, maxsplit=1)[0]  # a later clause is another fact, not this question's
        value = m.group(0)
        asked = [before + word + after + "？" for word in _zh_words(m, kind, before, after, t)]
        asked = [q for q in asked if value not in q]
        if asked:
            questions += _also_without_owner(asked)
    return list(dict.fromkeys(reversed(questions)))[::-1]


_MONEY_WORDS = re.compile(r"\b(price|prices|fare|fares|fee|fees|cost|costs|charge|charges|tariff|euros?|eur|"
                          r"usd|dollars?|rmb|yuan)\b|[€$¥£]|价|费|元", re.I)


def table_questions(cell: TableCell, prompt: dict) -> list[str]:
    """Questions for one table cell, naming its row and column (and once its caption); prompts/cloze.yaml's
    `table` wordings, by the kind of value. A table cell is not a sentence the other rules can read: 'What is
    Fares from Aldermouth: the adult of Merrow Island?' is what they made of one."""
    kind = _kind(cell.value)
    priced = bool(_MONEY_WORDS.search(f"{cell.caption} {cell.column}"))  # a bare number under "Fares", "Price"
    if cell.language == "zh":
        t = prompt["table"]["zh"]
        money = kind == "money" or priced
        wh = t["money" if money else "time" if kind == "time" else "name" if kind == "name" else "number"]
        questions = [render(t["plain"], key=cell.key, column=cell.column, wh=wh)]
        if cell.caption:
            questions.append(render(t["caption"], caption=cell.caption, key=cell.key, column=cell.column, wh=wh))
        return questions
    t = prompt["table"]["en"]
    column = cell.column_in_text
    fills = {"key": cell.key, "column": column, "caption": cell.caption}
    questions = [render(q, **fills) for q in t["plain"]]
    if cell.caption:
        questions.append(render(t["caption"], **fills))
    unit = " ".join(cell.value.split()[1:]).lower()
    if kind == "time":
        questions += [render(q, **fills) for q in t["time"]]
    elif kind in ("year", "date", "month") and PARTICIPLE_COLUMN.fullmatch(column):
        questions.append(render(t["participle"], wh="When", **fills))
        questions.append(render(t["participle"], wh=_upper_first(render(prompt["en"][kind])), **fills))
    elif kind == "count" and _is_duration(kind, unit):
        questions.append(render(t["duration"], **fills))
    elif kind == "money" or kind == "number" and priced:
        questions.append(render(t["money"], **fills))
    elif kind == "number" and re.fullmatch(r"\d+", cell.value) and re.fullmatch(r"[a-z]+s", column):
        questions.append(render(t["count"], **fills))
    return list(dict.fromkeys(questions))


def fact_questions(fact: str, chunk: Chunk, prompt: dict) -> list[str]:
    """The rule-made questions for a fact sentence of the chunk (`extract_facts`): a table cell's by
    `table_questions`, a Chinese sentence's by `chinese_questions` (pass it through `chinese_fact` first), an
    English sentence's by `english_questions`."""
    cell = cell_of(fact, chunk)
    if cell is not None:
        return table_questions(cell, prompt)
    if chunk.language == "zh":
        return chinese_questions(fact, prompt)
    return english_questions(fact, question_targets(fact, chunk), prompt, chunk.text)


def cloze_pairs(chunks: list[Chunk]) -> list[QAPair]:
    """Cloze questions for every fact sentence of the chunks (English and Chinese), answered with
    the sentence (its subject restored from the heading, as fact mode does); a table cell's questions name
    its row and column."""
    prompt = load_prompt(PROMPT, required=("version", "en", "zh", "table"))
    pairs = []
    for chunk in chunks:
        for fact in extract_facts(chunk):
            if chunk.language == "zh" and cell_of(fact, chunk) is None:
                fact = chinese_fact(fact)
            questions = fact_questions(fact, chunk, prompt)
            pairs += [QAPair(question=q, answer=fact, source="cloze", doc_id=chunk.doc_id, path=chunk.path,
                             chunk_id=chunk.chunk_id, mode="cloze", prompt_version=prompt["version"],
                             language=chunk.language) for q in questions]
    return pairs


@task(cache_policy=CACHE, persist_result=True)
def cloze_task(chunks: list[Chunk]) -> list[QAPair]:
    return cloze_pairs(chunks)
