"""Scores for a reply against a reference: fact recall, ROUGE-L and chrF, on text tokenised so
that Chinese is scored on characters, never on whitespace "words" (the reason Chinese BLEU/ROUGE so
often comes out 0.0), and the key facts (numbers, names) a correct reply must contain."""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache
from typing import Literal

Language = Literal["en", "zh"]


def fmt_score(x: float | None) -> str:
    """A score as reports and the registry print it: three decimals, a dash when there is none."""
    return "–" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- text and language

# Han ideographs (with extensions and compatibility forms), kana and hangul: scripts written
# without spaces, where one character is the unit of meaning.
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af\U00020000-\U0002ffff]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PERCENT = re.compile(r"\s*%|\bper cent\b")


def _is_cjk(ch: str) -> bool:
    return _CJK.match(ch) is not None


def _is_word_char(ch: str) -> bool:
    """Letters and digits of space-separated scripts: the ones a word boundary is made of."""
    return ch.isalnum() and not _is_cjk(ch)


def tokens(text: str) -> list[str]:
    """Scoring units of normalised text: each CJK character alone, every other run of letters or
    digits as one word. English comes out as words and Chinese as characters without a language
    switch, so no path can score Chinese on whitespace; a number like 149 stays one unit."""
    out, word = [], []
    for ch in normalize(text):
        if _is_word_char(ch):
            word.append(ch)
            continue
        if word:
            out.append("".join(word))
            word = []
        if _is_cjk(ch):
            out.append(ch)
    if word:
        out.append("".join(word))
    return out


def detect_language(text: str) -> Language:
    """'zh' when at least 40% of the scoring units are CJK characters (a Chinese sentence with an
    English product name is still Chinese; an English one quoting two characters is not)."""
    units = tokens(text)
    if not units:
        return "en"
    return "zh" if sum(len(u) == 1 and _is_cjk(u) for u in units) / len(units) >= 0.4 else "en"


def normalize(text: str) -> str:
    """NFKC (full-width letters, digits and punctuation become half-width), casefold, "1,200" ->
    "1200", "7%" and "7 per cent" -> "7 percent" (one fact, three spellings), punctuation -> space
    (but the "." or ":" inside "1.5" or "9:30" is kept), whitespace collapsed, and no space next
    to a CJK character ("30 天" == "30天")."""
    text = _THOUSANDS.sub("", unicodedata.normalize("NFKC", text).casefold())
    text = _PERCENT.sub(" percent ", text)
    chars = []
    for i, ch in enumerate(text):
        inside_number = ch in ".:" and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        if unicodedata.category(ch).startswith("P") and not inside_number:
            chars.append(" ")
        else:
            chars.append(ch)
    text = " ".join("".join(chars).split())
    return re.sub(rf" (?={_CJK.pattern})|(?<={_CJK.pattern}) ", "", text)


# --------------------------------------------------------------------------- metrics

def _contains(haystack: str, needle: str) -> bool:
    """Normalised substring match that respects word edges: "149" is not found in "1149" nor "X2"
    in "X20"; next to a CJK character there is no edge to respect ("30" is in "为30天")."""
    start = haystack.find(needle)
    while needle and start != -1:
        end = start + len(needle)
        before = haystack[start - 1] if start else " "
        after = haystack[end] if end < len(haystack) else " "
        if not (_is_word_char(before) and _is_word_char(needle[0])) and not (
            _is_word_char(after) and _is_word_char(needle[-1])
        ):
            return True
        start = haystack.find(needle, start + 1)
    return False


def facts_found(reply: str, facts: list[str]) -> list[bool]:
    text = normalize(reply)
    return [_contains(text, normalize(f)) for f in facts]


def fact_recall(reply: str, facts: list[str]) -> float:
    """Share of the key facts that appear in the reply, after `normalize` on both sides."""
    if not facts:
        raise ValueError("fact_recall needs at least one fact; give the gold row a 'facts' list or use key_facts()")
    return sum(facts_found(reply, facts)) / len(facts)


class _UnitTokenizer:
    """rouge-score's tokenizer interface (it only calls .tokenize)."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_UnitTokenizer())


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score) on `tokens`: words for English, characters for Chinese. rouge-score's
    own tokenizer keeps only [a-z0-9], so it would throw every Chinese character away."""
    return _rouge_scorer().score(reference, reply)["rougeL"].fmeasure


@lru_cache(maxsize=1)
def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()  # Popović 2015: character 6-grams, beta=2, whitespace ignored (so Chinese works)


def chrf(reply: str, reference: str) -> float:
    """sacrebleu's sentence chrF on the raw strings, scaled to 0-1 like the other metrics."""
    return _chrf_metric().sentence_score(reply, [reference]).score / 100


# --------------------------------------------------------------------------- key facts

_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\d+(?:[.,:]\d+)*(?![A-Za-z0-9])")
_QUOTED = re.compile(r"[《「『“]([^》」』”]{1,30})[》」』”]")
_LATIN_IN_CHINESE = re.compile(r"[A-Za-z][A-Za-z0-9&+-]*(?: [A-Za-z0-9][A-Za-z0-9&+-]*)*")
_FUNCTION_WORDS = {
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "our", "your", "their", "we", "you",
    "they", "he", "she", "in", "on", "at", "for", "to", "of", "and", "or", "if", "when", "yes", "no",
    "please", "each", "every", "all", "i",
}
_EDGE_PUNCT = string.punctuation + "“”‘’«»…"


def _english_names(sentence: str) -> list[str]:
    """Runs of capitalised words ("Alice Smith", "Acme Corp") and words with a digit or an inner
    capital ("X2", "iPhone"). A lone capitalised word that opens the sentence is skipped: it is
    usually just the first word ("Returns are accepted ...")."""
    names, run = [], []

    def flush():
        while run and run[0][1].lower() in _FUNCTION_WORDS:
            run.pop(0)
        if run:
            first_pos, first = run[0]
            distinctive = any(c.isdigit() for c in first) or any(c.isupper() for c in first[1:])
            if not (first_pos == 0 and len(run) == 1 and not distinctive):
                names.append(" ".join(w for _, w in run))
        run.clear()

    for pos, raw in enumerate(sentence.split()):
        word = raw.strip(_EDGE_PUNCT)
        name_like = bool(word) and any(c.isalpha() for c in word) and (
            word[0].isupper()
            or any(c.isdigit() for c in word)
            or any(c.isupper() for c in word[1:])
        )
        if name_like:
            run.append((pos, word))
        else:
            flush()
        if raw.rstrip(_EDGE_PUNCT) != raw:  # "Paris, France": punctuation ends a name
            flush()
    flush()
    return names


def key_facts(answer: str, language: Language | None = None) -> list[str]:
    """The spans a correct reply must contain, for test-split rows that have no hand-written facts.

    Short answers (up to 4 English words or 10 Chinese characters) are a fact as a whole;
    otherwise numbers (without their unit, so "30 days" and "30天" both match "30") and names:
    capitalised names in English, Latin-script names and 《quoted》 titles in Chinese. A long
    answer with none of these gives [] and is scored by ROUGE-L and chrF only.
    """
    answer = unicodedata.normalize("NFKC", answer).strip()
    language = language or detect_language(answer)
    units = tokens(answer)
    if units and len(units) <= (10 if language == "zh" else 4):
        return [answer.strip(_EDGE_PUNCT + "。！？，、；：").strip()]
    found = [m.group(0) for m in _NUMBER.finditer(answer)]
    if language == "zh":
        found += [m.group(1).strip() for m in _QUOTED.finditer(answer)]
        found += [m.group(0) for m in _LATIN_IN_CHINESE.finditer(answer)]
    else:
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
            found += _english_names(sentence)
    # Keep each once, in the order it appears in the answer.
    unique = list(dict.fromkeys(f for f in found if f))
    return sorted(unique, key=answer.find)


# Words that belong to the number before them: "27 days", "12 metres per second", "7 percent".
_UNITS = {
    "percent", "per", "cent", "%", "euro", "euros", "eur", "dollar", "dollars", "usd", "kroner", "nok",
    "gram", "grams", "g", "kilogram", "kilograms", "kg", "tonnes", "second", "seconds", "minute", "minutes",
    "hour", "hours", "day", "days", "working", "business", "week", "weeks", "month", "months", "year", "years",
    "metre", "metres", "meter", "meters", "m", "kilometre", "kilometres", "km", "litre", "litres", "mah", "wh",
    "kwh", "mb", "gb", "tb", "people", "employees", "staff", "times",
}
_RANGE_WORDS = {"to", "and", "-", "–", "through", "until"}
_ZH_UNIT = re.compile(r"\d+(?:[.,:]\d+)*\s?(?:个工作日|工作日|个月|分钟|小时|公斤|千克|欧元|美元|人民币|[元天周月年次台架人%％个])?")


def answer_spans(sentence: str, language: Language | None = None) -> list[str]:
    """The values a question about this sentence can ask for, in sentence order: names, numbers
    with their unit ("9 working days"), dates ("31 March 2026") and ranges ("10:00 to 15:00").
    Fact mode anchors each question on one of them, so the model asks for the value instead of
    about the sentence in general ("Where is Kestrel?" for a price)."""
    sentence = unicodedata.normalize("NFKC", sentence).strip()
    language = language or detect_language(sentence)
    if language == "zh":
        spans = [m.group(0) for m in _ZH_UNIT.finditer(sentence)]
        spans += [m.group(1).strip() for m in _QUOTED.finditer(sentence)]
        spans += [m.group(0) for m in _LATIN_IN_CHINESE.finditer(sentence)]
        return sorted(dict.fromkeys(spans), key=sentence.find)
    names = {w for name in _english_names(sentence) for w in name.split()}
    words = sentence.split()
    runs: list[list[str]] = []
    run: list[str] = []
    for raw in words:
        word = raw.strip(_EDGE_PUNCT) if raw not in ("-", "–") else raw
        has_digit = any(c.isdigit() for c in word)
        is_key = bool(word) and (
            has_digit or word in names
            or (run and word.lower() in _UNITS and (_NUMBER.fullmatch(run[-1].lstrip("+")) or run[-1].lower() in _UNITS))
        )
        if is_key:
            run.append(word)
        elif run and word.lower() in _RANGE_WORDS and any(c.isdigit() for c in run[-1]):
            run.append(word)  # "10:00 to 15:00": keep going, drop it again if no value follows
        else:
            run = _close(run, runs)
        if run and raw.rstrip(_EDGE_PUNCT) != raw and raw not in ("-", "–"):  # "Paris, France"
            run = _close(run, runs)
    _close(run, runs)
    return list(dict.fromkeys(" ".join(r) for r in runs))


def _close(run: list[str], runs: list[list[str]]) -> list[str]:
    """End a span: a range word or "per" with nothing after it is not part of the value."""
    while run and run[-1].lower() in _RANGE_WORDS | {"per"}:
        run.pop()
    if run:
        runs.append(run)
    return []


def answer_facts(question: str, answer: str, language: Language) -> list[str]:
    """Key facts of the answer that the question does not already contain: a model that merely
    repeats the product name from the question has not recalled anything."""
    return [f for f in key_facts(answer, language) if not _contains(normalize(question), normalize(f))]
