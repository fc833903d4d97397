"""Synthesize question/answer pairs from chunks through any OpenAI-compatible endpoint.

Two modes (a 135M model cannot write free-form Q&A: in `make demo` the probe found 0 grounded pairs on
3 chunks with SmolLM2-135M; it can write a question for a given fact sentence):
- fact: the answer is a self-contained passage of the chunk, grounded by construction; the LLM
  writes several differently worded questions for it; filters drop the bad ones with a reason.
- qa:   the LLM writes question and answer (JSON); answers are checked against the chunk.
`auto` probes the endpoint on a few chunks and records which mode it chose and why.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from prefect import task
from pydantic import BaseModel, Field
from rapidfuzz import fuzz
from tqdm import tqdm

from doctune.llm import EndpointError, chat, make_client
from doctune.metrics import answer_facts, answer_spans, facts_found, key_facts, normalize
from doctune.prefect_utils import CACHE, network_retries
from doctune.prompts import load_prompt, render
from doctune.records import CJK_RE, Chunk, Dropped, QAPair, short_hash
from doctune.settings import LLMSettings, SynthSettings
from doctune.tables import cells, is_separator
from tasks.chunk import count_tokens, split_sentences

STAGE = "synthesize"
CJK = CJK_RE
META = re.compile(
    r"according to (the|this) (text|passage|document|context|article)|in the (text|passage|document) above"
    r"|the (passage|text) (says|states|mentions)|根据(文中|上文|原文|文本|材料|段落)|文中(提到|指出)|原文",
    re.IGNORECASE,
)
PRONOUN_START = re.compile(r"^(it|its|they|their|this|these|he|she|his|her)\b", re.IGNORECASE)
ZH_PRONOUN_START = re.compile(r"^(它|其|他们|她们|他|她|这|该)")
# The verb after a "This" / "These" that stands for the subject ("This is …", "These apply …" is read as a noun)
_PRONOUN_VERB = re.compile(r" (?:is|are|was|were|has|have|had|can|could|will|would|must|may|might|should|does|do|did)\b")
NUMBERISH = re.compile(r"(?<![A-Za-z\d])\d+(?:[.,:]\d+)*")  # not the 2 of "X2"
# A number right after a capitalised word is part of a name ("SkyLedger 3.2", "Tessarine 2025"):
# a question may name it without giving the answer away.
NAME_NUMBER = re.compile(r"\b[A-Z][\w-]* (\d+(?:[.,:]\d+)*)")
# "What is the Kestrel K4?" / "Where is X?" / "What about X?": names the fact's subject and asks nothing of it.
BARE_WHAT = re.compile(r"^(what|where|who)(?:'s| is| are| was| were)\s+(?:the |a |an )?([^?]{2,80})\?$", re.I)
VAGUE = re.compile(r"^what about\b|^(can|could) you tell me (a bit )?more about\b|^tell me about\b", re.I)
YES_NO = re.compile(r"^(is|are|was|were|does|do|did|can|could|will|would|should|has|have|must)\b|吗[？?]$", re.I)
EN_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
EN_STOP = {"what", "which", "when", "where", "does", "have", "that", "this", "with", "from", "there",
           "their", "they", "much", "many", "about", "long", "after", "before", "into", "your", "will"}


class SynthResult(BaseModel):
    pairs: list[QAPair] = Field(default_factory=list)
    dropped: list[Dropped] = Field(default_factory=list)
    calls: int = 0
    failed_calls: int = 0
    errors: list[str] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def merge(self, other: "SynthResult") -> "SynthResult":
        return SynthResult(
            pairs=self.pairs + other.pairs,
            dropped=self.dropped + other.dropped,
            calls=self.calls + other.calls,
            failed_calls=self.failed_calls + other.failed_calls,
            errors=(self.errors + other.errors)[:50],
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class SynthesisIncomplete(RuntimeError):
    pass


class ModeChoice(BaseModel):
    mode: str
    reason: str
    skip_languages: dict[str, str] = Field(
        default_factory=dict, description="language -> why its documents are not synthesized")
    calls: int = 0  # what the probes cost
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, result: "SynthResult") -> None:
        self.calls += result.calls
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens


# ---------------------------------------------------------------- facts


def _subject(chunk: Chunk) -> str:
    return (chunk.heading_path[-1] if chunk.heading_path else chunk.title).strip().rstrip(":：")


def restore_subject(sentence: str, chunk: Chunk) -> str:
    """A fact starting with a pronoun is no answer on its own: name its subject from the heading."""
    subject = _subject(chunk)
    if not subject:
        return sentence
    if chunk.language == "zh":
        m = ZH_PRONOUN_START.match(sentence)
        return subject + sentence[m.end():] if m else sentence
    m = PRONOUN_START.match(sentence)
    if not m:
        return sentence
    word = m.group(1).lower()
    rest = sentence[m.end():]
    if word in ("this", "these") and not _PRONOUN_VERB.match(rest) \
            and not (word == "this" and re.match(r" [a-z]+[^s\W]s\b", rest)):
        # "This policy was approved …": a determiner, its noun names the subject ("This costs …" is a pronoun)
        return f"The{rest}"
    if word in ("its", "their", "his", "her"):
        return f"{subject}'s{rest}"
    return f"{subject}{rest}"


ROW_FACT_MAX_COLUMNS = 8  # wider tables are data dumps: a sentence per cell would flood the questions
CAPTION_MAX_WORDS = 12  # a longer line above a table is a paragraph, not its caption
_SENTENCE_END = (".", "。", "!", "！", "?", "？", ";", "；")
# A column named by a participle ("Built", "Opened") holding a year or a date: "MV Solvig was built in 2009."
PARTICIPLE_COLUMN = re.compile(r"[A-Za-z]+ed|built|made|sold|held|run|begun|founded|opened|closed")
_YEAR_OR_DATE = re.compile(r"(19|20)\d\d|\d{1,2} [A-Z][a-z]+ (19|20)\d\d")


@dataclass(frozen=True)
class TableCell:
    """One cell of a table row, read with its column's header, the row's first named cell (its key) and
    the table's caption: the short line right above the table, else the section heading."""
    caption: str
    key: str
    column: str
    value: str
    language: str

    @property
    def column_in_text(self) -> str:
        """The column's header as it stands mid-sentence: 'Price' -> 'price', 'EUR' as it is."""
        return self.column if self.column.isupper() else self.column[0].lower() + self.column[1:]

    @property
    def sentence(self) -> str:
        """The cell as a fact sentence, the caption first: 'Fares from Aldermouth (euros, single journey): the
        adult of Merrow Island is 23.60.' A model answering from it names the table before the row, and the
        caption's words ('fares', 'single journey') are the ones a question about the cell brings."""
        if self.language == "zh":
            return f"{self.caption}：" * bool(self.caption) + f"{self.key}的{self.column}是{self.value}。"
        column = self.column_in_text
        if PARTICIPLE_COLUMN.fullmatch(column) and _YEAR_OR_DATE.fullmatch(self.value):  # "Built" | "2003"
            said = f"{self.key} was {column} {'in' if self.value.isdigit() else 'on'} {self.value}."
            return f"{self.caption}: {said}" if self.caption else said
        said = f"the {column} of {self.key} is {self.value.rstrip('.')}."
        return f"{self.caption}: {said}" if self.caption else said[0].upper() + said[1:]


def _caption(line: str, language: str) -> str:
    """The line above a table as its caption ('' for a sentence or a paragraph): heading, list and bold marks
    and a closing colon left out."""
    line = " ".join(re.sub(r"^\s*(?:[#>]+\s*|[-*+]\s+)+|\*\*", "", line).split()).rstrip(":：").strip()
    size = len(CJK.findall(line)) // 2 if language == "zh" else len(line.split())
    return "" if not line or line.endswith(_SENTENCE_END) or size > CAPTION_MAX_WORDS else line


def table_cells(chunk: Chunk) -> list[TableCell]:
    """Every cell of every table row with a header, read as `TableCell`s: under '| Model | Price |',
    '| Kestrel K4 | 8,950 EUR |' is the price of Kestrel K4. A chunk starting inside a table reads its rows with
    the `table_header` it carries. A row without a named cell, and a table wider than ROW_FACT_MAX_COLUMNS, give
    none. Read once per chunk text: synthesis, cloze and the exam ask it for every fact and question."""
    return list(_table_cells(*_table_key(chunk)))


def _table_key(chunk: Chunk) -> tuple[str, str, str | None, str]:
    return chunk.text, chunk.heading_path[-1] if chunk.heading_path else "", chunk.table_header, chunk.language


@lru_cache(maxsize=1024)
def _table_cells(text: str, heading_line: str, table_header: str | None, language: str) -> tuple[TableCell, ...]:
    out, header, run, above = [], None, [], ""
    heading = _caption(heading_line, language) if heading_line else ""
    lines = text.split("\n") + [""]
    carried = cells(table_header.split("\n")[0]) if table_header else None
    for k, line in enumerate(lines):
        if line.strip().startswith("|"):
            run.append(line)
            continue
        if run:
            if len(run) >= 2 and is_separator(cells(run[1])):
                header, rows = cells(run[0]), run[2:]
            elif carried and k == len(run):  # the chunk starts with this table's continuation
                header, rows = carried, run
            else:
                header, rows = None, []
            caption = _caption(above, language) or heading
            if header and len(header) <= ROW_FACT_MAX_COLUMNS:
                for row in rows:
                    values = cells(row)
                    named = next((i for i, c in enumerate(values) if re.search(r"[^\W\d_]", c)), None)
                    if named is None:
                        continue
                    out += [TableCell(caption=caption, key=values[named], column=column, value=value,
                                      language=language)
                            for i, (column, value) in enumerate(zip(header, values))
                            if i != named and column and value]
            run = []
        if line.strip():
            above = line
    return tuple(out)


def table_row_facts(chunk: Chunk) -> list[str]:
    """A sentence for each cell of each table row (`TableCell.sentence`)."""
    return [c.sentence for c in table_cells(chunk)]


def cell_of(fact: str, chunk: Chunk) -> TableCell | None:
    """The table cell of the chunk that `fact` is the sentence of, else None (a prose fact)."""
    return _cells_by_sentence(*_table_key(chunk)).get(fact)


@lru_cache(maxsize=1024)
def _cells_by_sentence(*key) -> dict[str, TableCell]:
    by_sentence: dict[str, TableCell] = {}
    for cell in _table_cells(*key):
        by_sentence.setdefault(cell.sentence, cell)  # the first, as a search in reading order finds it
    return by_sentence


def extract_facts(chunk: Chunk) -> list[str]:
    """Sentences of the chunk worth a question: prose with some content, subjects restored; table rows
    as a sentence per cell (`table_row_facts`)."""
    facts = []
    for start, end in split_sentences(chunk.text, chunk.language):
        raw = " ".join(chunk.text[start:end].split())
        s = re.sub(r"^[#>*\-\d.)\s]+(?=\S)", "", raw) if raw.startswith(("#", ">", "*", "-")) else raw
        if s.startswith("|") or s.endswith(("?", "？", ":", "：")) or raw.startswith("#"):
            continue  # table rows, questions, lead-ins and headings are not facts
        if s == raw and not s.endswith(_SENTENCE_END + ("”", '"')) and not re.search(r"\w[:：]\s*\S", s):
            continue  # no full stop, no list mark, no "Phone: …": a title, a caption or a signature
        size = len(CJK.findall(s)) if chunk.language == "zh" else len(s.split())
        if size < (8 if chunk.language == "zh" else 4) or len(s) > 400:
            continue
        facts.append(restore_subject(s, chunk))
    return facts + table_row_facts(chunk)


def faq_chunks(pairs: list[QAPair]) -> list[Chunk]:
    """The answers of a FAQ export as one-answer chunks, for fact-mode questions. An export has one
    question per answer; a model trained on that one wording learns the wording, not the fact.
    No title or heading: a pronoun in an answer is not restored from the original question."""
    chunks = []
    for i, p in enumerate(pair for pair in pairs if pair.source == "faq"):
        doc_id = p.doc_id or short_hash(p.path or "", n=12)
        chunks.append(Chunk(chunk_id=f"{doc_id}:faq{i}", doc_id=doc_id, path=p.path or "", index=i, text=p.answer,
                            heading_path=[], start=0, end=len(p.answer), n_tokens=count_tokens(p.answer),
                            language=p.language, title=""))
    return chunks


def _key_words(text: str, language: str) -> set[str]:
    if language == "zh":
        chars = "".join(CJK.findall(text))
        return {chars[i:i + 2] for i in range(len(chars) - 1)}
    return {w.lower() for w in EN_WORD.findall(text)} - EN_STOP


def question_targets(fact: str, chunk: Chunk) -> list[str]:
    """The values of a fact a question may ask for (`answer_spans`), less the ones that only
    repeat the document title or heading ("Tessarine" in the Tessarine handbook)."""
    cell = cell_of(fact, chunk)
    caption = cell.caption if cell else ""  # a table's caption names the table, not what its cell says
    if chunk.language == "zh":
        context_text = normalize(chunk.title + "".join(chunk.heading_path) + caption)
        return [s for s in answer_spans(fact, "zh") if normalize(s) not in context_text]
    context = set(normalize(" ".join([chunk.title, *chunk.heading_path, caption])).split())
    return [s for s in answer_spans(fact, "en") if not set(normalize(s).split()) <= context]


def target_for(targets: list[str], variant: int) -> str | None:
    """The value the variant-th question asks for: mostly the fact's last value (English and
    Chinese state the value at the end: "... costs 8,950 euros"), every fourth question the one
    before it ("... founded in 2011 in Skarvhamn")."""
    if not targets:
        return None
    return targets[-2] if variant % 4 == 2 and len(targets) > 1 else targets[-1]


MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
WEEKDAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_WHEN = re.compile(rf"\b({MONTHS}|{WEEKDAYS}|weekdays?)\b|\d:\d\d|\b(1[89]|20)\d\d\b", re.I)
_DURATION = re.compile(r"\b(second|minute|hour|day|week|month|year)s?\b|\b(metre|meter|kilometre|km)s?\b", re.I)
_HOW_MANY = re.compile(r"\bhow many ([a-z]+)", re.I)


def _stem(word: str) -> str:
    word = word.lower()
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def asks_for(question: str, target: str, fact: str) -> bool:
    """Can `target` answer the question, going by its question word? who -> a name, when -> a date
    or time, how long -> a duration, how much -> a number, how many X -> a count of something the
    fact counts. Question words that say nothing about the type (what, which, where) pass."""
    q = question.lower()
    has_number = any(c.isdigit() for c in target)
    if m := _HOW_MANY.search(q):
        thing = _stem(m.group(1))
        unit = [_stem(w) for w in target.split()[1:]] if has_number else []
        place = unit or [_stem(w) for w in EN_WORD.findall(fact)]
        return has_number and (thing in place or thing in ("time",))
    if re.search(r"\bhow (much|expensive)\b", q):
        return has_number
    if re.search(r"\bhow long\b", q):
        return bool(_DURATION.search(target)) or bool(_WHEN.search(target))
    if re.match(r"(when|what time|what date|on what (date|day))\b", q) or re.search(r"\b(what|which) (year|date|day|time)\b", q):
        return bool(_WHEN.search(target))
    if re.match(r"who(m|se)?\b", q):
        return not has_number
    return True


def is_vague(question: str, fact: str) -> bool:
    """A question a fact answers only by chance: "What is the Kestrel K4 survey drone?" for its
    flight time, "Where is the Kestrel K4?" for its price. Trained on, such questions pull every
    question about the subject to this one fact. A bare "What is X?" is kept when the fact defines
    or gives X ("X is ..."), a "where" question when the fact says where."""
    q = question.strip()
    if VAGUE.search(q):
        return True
    m = BARE_WHAT.match(q)
    if not m:
        return False
    subject = normalize(m.group(2))
    text = normalize(fact)
    if subject not in text:
        return False  # asks for something named differently; the other checks judge it
    follows = text.split(subject, 1)[1].split()
    if not follows:
        return False  # "Who is Jonas Villemo?" for "... is Jonas Villemo.": the answer leak check's case
    if m.group(1).lower() == "where":
        return not re.search(r"\b(located|based|situated|held)\b|\b(is|are|was|were) (at|in)\b", fact)
    # "X is 48 euros" / "X is the flight-log software": X is given; "X is located ..." is no definition.
    return not (follows[:1] and follows[0] in ("is", "are", "was", "were")
                and not (len(follows) > 1 and follows[1].endswith("ed")))


def check_fact_question(question: str, fact: str, chunk: Chunk, targets: list[str] | None = None) -> str | None:
    """`check_question` for a fact of `chunk`; a question about a table cell must also name the cell's row
    ('What is the price of a bicycle to Tollan?'): one that names only the caption's words ('How many times
    can you pay for a bicycle in Aldermouth?') fits every row of the table, and training on it teaches one."""
    if reason := check_question(question, fact, chunk.language, targets):
        return reason
    cell = cell_of(fact, chunk)
    if cell and normalize(cell.key) not in normalize(question):
        return "table_row_not_named"
    return None


def check_question(question: str, fact: str, language: str, targets: list[str] | None = None) -> str | None:
    """The reason to drop a fact-mode question, or None to keep it. `targets` are the values of the
    fact a question may ask for (`question_targets`); without them, its names and numbers."""
    q = question.strip()
    if not q:
        return "empty"
    if "\n" in q or len(q) > 160 or len(q) < (6 if language == "zh" else 12):
        return "form_length"
    if not q.endswith(("?", "？")):
        return "form_not_a_question"
    if META.search(q):
        return "meta_question"
    if language == "en" and CJK.search(q):
        return "wrong_language"
    if language == "zh" and len(CJK.findall(q)) < 4:
        return "wrong_language"
    if not (_key_words(q, language) & _key_words(fact, language)):
        return "off_topic"  # shares no content word with its fact: about something else
    if fuzz.ratio(q.rstrip("?？").lower(), fact.rstrip(".。").lower()) > 85:
        return "echo_of_fact"
    values = set(NUMBERISH.findall(fact)) - set(NAME_NUMBER.findall(fact))
    q_numbers = set(NUMBERISH.findall(q))
    if q_numbers & values and not q_numbers.issuperset(values):
        return "answer_leak"  # a number of the answer inside the question gives it away
    if YES_NO.match(q):
        return None  # a yes/no question restates the fact by nature
    if language == "en" and is_vague(q, fact):
        return "vague_question"
    # A question that already holds the answer teaches copying, not recalling.
    if targets:
        if facts_found(q, targets[-1:])[0]:
            # The fact's value (English and Chinese state it last: "... costs 8,950 euros") is in
            # the question already ("What is the internal extension 4471?"): nothing to recall.
            return "answer_leak"
        if language == "en" and not any(asks_for(q, t, fact) for t in targets):
            # "How many people work at Tessarine?" for 27 days of leave: the question asks for
            # something the fact does not say, and training on it teaches a wrong answer.
            return "wrong_question_type"
        return None
    if key_facts(fact, language) and not answer_facts(q, fact, language):
        return "answer_leak"
    return None


def clean_question(text: str) -> str:
    text = re.sub(r"^\s*(question|q|问题)\s*[:：]\s*", "", text, flags=re.IGNORECASE)
    text = text.strip().strip('"“”').strip()
    # Small models often add the answer after the question: keep the first question only.
    m = re.search(r"[?？]", text)
    return text[: m.end()].strip() if m else text.splitlines()[0].strip() if text else ""


def fact_messages(fact: str, language: str, variant: int, target: str | None = None) -> tuple[list[dict], str]:
    """Few-shot turns asking for one question about `fact`; with a `target`, the question must ask
    for that value (the examples then show theirs), without one the prompt shows no answers."""
    prompt = load_prompt(f"fact_questions.{language}")
    examples = prompt["examples"]
    system = prompt["system"] if target else prompt.get("system_unanchored", prompt["system"])
    messages = [{"role": "system", "content": system}]
    for i in range(min(3, len(examples))):
        ex = examples[(variant * 3 + i) % len(examples)]
        answer = ex.get("answer") if target else None
        messages.append({"role": "user", "content": render(prompt["user"], fact=ex["fact"], answer=answer)})
        messages.append({"role": "assistant", "content": ex["question"]})
    messages.append({"role": "user", "content": render(prompt["user"], fact=fact, answer=target)})
    return messages, prompt["version"]


# ---------------------------------------------------------------- qa mode


def n_pairs_for(chunk: Chunk, settings: SynthSettings) -> int:
    return max(1, min(10, round(chunk.n_tokens / 100 * settings.pairs_per_100_tokens)))


def qa_messages(chunk: Chunk, n: int) -> tuple[list[dict], str]:
    prompt = load_prompt(f"qa_pairs.{chunk.language}")
    user = render(prompt["user"], text=chunk.shown_text(), heading=" > ".join(chunk.heading_path) or chunk.title, n=n)
    return [{"role": "system", "content": prompt["system"]}, {"role": "user", "content": user}], prompt["version"]


def parse_pairs(text: str) -> list[dict]:
    """Lenient: a JSON list/object (fenced or not, with prose around it), or Q:/A: lines."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    for opener, closer in (("[", "]"), ("{", "}")):
        i, j = text.find(opener), text.rfind(closer)
        if 0 <= i < j:
            candidates.append(text[i : j + 1])
    for cand in candidates:
        try:
            data = json.loads(cand)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            data = data.get("pairs") or data.get("qa_pairs") or data.get("questions") or [data]
        if isinstance(data, list):
            rows = [
                {"question": str(d.get("question") or d.get("q") or d.get("问题") or ""),
                 "answer": str(d.get("answer") or d.get("a") or d.get("答案") or "")}
                for d in data if isinstance(d, dict)
            ]
            if rows:
                return rows
    pairs, q = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(?:\d+[.)]\s*)?(Q|Question|问题?|问)\s*\d*\s*[:：]\s*(.+)", line, re.IGNORECASE)
        if m:
            q = m.group(2).strip()
            continue
        m = re.match(r"^\s*(A|Answer|答案?|答)\s*\d*\s*[:：]\s*(.+)", line, re.IGNORECASE)
        if m and q:
            pairs.append({"question": q, "answer": m.group(2).strip()})
            q = None
    return pairs


def groundedness(answer: str, chunk_text: str) -> float:
    """0-100: how much of the answer's content is found in the chunk.

    The better of two views: the answer as one span aligned fuzzily with the chunk (a quoted or
    lightly edited passage), and the share of its content words (Chinese: character bigrams)
    that the chunk contains (a reworded answer). Numbers in the answer must appear in the chunk,
    otherwise the answer invented them.
    """
    if any(n not in chunk_text for n in NUMBERISH.findall(answer)):
        return 0.0
    language = "zh" if CJK.search(answer) else "en"
    words = _key_words(answer, language)
    coverage = 100.0 * len(words & _key_words(chunk_text, language)) / len(words) if words else 0.0
    return max(coverage, float(fuzz.partial_ratio(answer.lower(), chunk_text.lower())))


def check_pair(question: str, answer: str, chunk: Chunk, settings: SynthSettings) -> str | None:
    if not question.strip() or not answer.strip():
        return "empty"
    if not question.strip().endswith(("?", "？")):
        return "form_not_a_question"
    if len(question) > 300 or len(answer) > 1500:
        return "form_length"
    if META.search(question) or META.search(answer):
        return "meta_question"
    if groundedness(answer, chunk.shown_text()) < settings.min_groundedness:
        return "not_grounded"
    return None


# ---------------------------------------------------------------- running calls


@dataclass
class _Call:
    chunk: Chunk
    messages: list[dict]
    params: dict
    fact: str | None  # fact mode: the answer; qa mode: None
    prompt_version: str
    targets: list[str] | None = None  # fact mode: the values of the fact a question may ask for


def _seed(settings: SynthSettings, *parts) -> int:
    return int(short_hash(str(settings.seed), *map(str, parts), n=8), 16) % (2**31)


def plan_calls(chunks: list[Chunk], settings: SynthSettings, mode: str, n_pairs: int | None = None) -> list[_Call]:
    calls = []
    for chunk in chunks:
        if mode == "qa":
            n = n_pairs or n_pairs_for(chunk, settings)
            messages, version = qa_messages(chunk, n)
            # The budget grows with the pairs asked for; a model that loops stops there.
            params = dict(temperature=0.3, max_tokens=settings.max_tokens * n, seed=_seed(settings, chunk.chunk_id))
            calls.append(_Call(chunk, messages, params, None, version))
            continue
        for f, fact in enumerate(extract_facts(chunk)):
            targets = question_targets(fact, chunk)
            for k in range(settings.questions_per_fact):
                target = target_for(targets, k) if settings.anchor_questions else None
                messages, version = fact_messages(fact, chunk.language, k, target)
                # The first question is greedy (the model's best guess); the rest sample for variety.
                temp = 0.0 if k == 0 else settings.temperature
                params = dict(temperature=temp, top_p=0.95, max_tokens=min(settings.max_tokens, 64),
                              seed=_seed(settings, chunk.chunk_id, f, k), stop=["\n"])
                calls.append(_Call(chunk, messages, params, fact, version, targets))
    return calls


def _pair_meta(call: _Call, llm: LLMSettings, mode: str) -> dict:
    c = call.chunk
    return dict(source="synthesized", doc_id=c.doc_id, path=c.path, chunk_id=c.chunk_id, mode=mode,
                model=llm.model, prompt_version=call.prompt_version, language=c.language)


def _run_call(client, llm: LLMSettings, settings: SynthSettings, call: _Call) -> SynthResult:
    mode = "qa" if call.fact is None else "fact"
    try:
        reply = chat(client, llm, call.messages, **call.params)
    except EndpointError as exc:
        return SynthResult(calls=1, failed_calls=1, errors=[f"{call.chunk.chunk_id}: {exc}"])
    out = SynthResult(calls=1, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
    meta = _pair_meta(call, llm, mode)
    if mode == "fact":
        question = clean_question(reply.text)
        reason = check_fact_question(question, call.fact, call.chunk, call.targets)
        rows = [(question, call.fact, reason)]
    else:
        parsed = parse_pairs(reply.text)
        if not parsed:
            out.dropped.append(Dropped(stage=STAGE, reason="unparseable_reply",
                                       record={"reply": reply.text[:500], **meta}))
        rows = [(p["question"].strip(), p["answer"].strip(),
                 check_pair(p["question"], p["answer"], call.chunk, settings)) for p in parsed]
    for question, answer, reason in rows:
        pair = QAPair(question=question, answer=answer, **meta)
        if reason:
            out.dropped.append(Dropped(stage=STAGE, reason=reason, record=pair.model_dump()))
        else:
            out.pairs.append(pair)
    return out


def retry_calls(calls: list[_Call], result: SynthResult, settings: SynthSettings) -> list[_Call]:
    """Fact mode, second round: a fact with fewer than `min_questions_per_fact` kept questions gets
    `questions_per_fact` more calls, sampled and without the answer in the prompt. Small models
    often copy a name they are shown into the question ("Who is Jonas Villemo?"), and a fact
    without a single question is a fact the model never learns."""
    kept = Counter((p.chunk_id, p.answer) for p in result.pairs)
    retry, seen = [], set()
    for call in calls:
        key = (call.chunk.chunk_id, call.fact)
        if call.fact is None or key in seen or kept[key] >= settings.min_questions_per_fact:
            continue
        seen.add(key)
        for k in range(settings.questions_per_fact, 2 * settings.questions_per_fact):
            messages, version = fact_messages(call.fact, call.chunk.language, k)
            params = dict(call.params, temperature=settings.temperature,
                          seed=_seed(settings, call.chunk.chunk_id, call.fact, k))
            retry.append(_Call(call.chunk, messages, params, call.fact, version, call.targets))
    return retry


def synthesize_chunks(chunks: list[Chunk], llm: LLMSettings, settings: SynthSettings, mode: str,
                      progress: bool = True, n_pairs: int | None = None) -> SynthResult:
    """All calls for these chunks, `llm.concurrency` at a time; results in a deterministic order."""
    calls = plan_calls(chunks, settings, mode, n_pairs)
    result = run_calls(calls, llm, settings, mode, progress)
    if mode == "fact" and settings.min_questions_per_fact:
        result = result.merge(run_calls(retry_calls(calls, result, settings), llm, settings, mode, progress))
    return result


def run_calls(calls: list[_Call], llm: LLMSettings, settings: SynthSettings, mode: str,
              progress: bool = True) -> SynthResult:
    client = make_client(llm)
    result = SynthResult()
    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool:
        futures = [pool.submit(_run_call, client, llm, settings, c) for c in calls]
        for fut in tqdm(futures, desc=f"synthesize ({mode})", unit="call", disable=not progress or not calls):
            result = result.merge(fut.result())
    return result


def choose_mode(chunks: list[Chunk], llm: LLMSettings, settings: SynthSettings, probe_chunks: int = 3) -> ModeChoice:
    """`auto`: ask for Q&A pairs on a few chunks; use qa mode only if the endpoint delivers them."""
    if settings.mode != "auto":
        return ModeChoice(mode=settings.mode, reason=f"set by synth.mode={settings.mode!r}")
    sample = sorted(chunks, key=lambda c: -c.n_tokens)[:probe_chunks]
    if not sample:
        return ModeChoice(mode="fact", reason="no chunks to probe")
    # Two pairs per chunk keep the probe short even when a small model loops to its token limit.
    probe = synthesize_chunks(sample, llm, settings, "qa", progress=False, n_pairs=2)
    cost = ModeChoice(mode="", reason="")
    cost.add(probe)
    returned = len(probe.pairs) + sum(d.reason != "unparseable_reply" for d in probe.dropped)
    kept_share = len(probe.pairs) / returned if returned else 0.0
    summary = (f"probe of {llm.model} on {len(sample)} chunks: {returned} pairs parsed, "
               f"{len(probe.pairs)} grounded ({kept_share:.0%})")
    if probe.failed_calls == len(sample):
        raise EndpointError(f"{summary}; every probe call failed: {probe.errors[:1]}")
    if len(probe.pairs) >= len(sample) and kept_share >= 0.5:
        return cost.model_copy(update={"mode": "qa", "reason": f"{summary}: the endpoint writes usable pairs"})
    reasons = Counter(d.reason for d in probe.dropped).most_common(3)
    return cost.model_copy(update={"mode": "fact", "reason": f"{summary} (drops: {dict(reasons)}): answers will be "
                                                             "source sentences, the LLM writes questions"})


LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}
ENDPOINT_HINT = {"zh": "a Chinese-capable endpoint (Qwen, DeepSeek, GLM, or a vLLM/Ollama model that writes Chinese)",
                 "en": "an endpoint whose model writes English"}


def probe_sample(chunks: list[Chunk], per_language: int = 4) -> list[Chunk]:
    """The chunks the mode and language probes read: per language, the first `per_language` by a
    hash of their text, among those with facts (all, if none has). The probes are cached on this
    sample, so editing a document outside it keeps their verdict: keyed on every chunk, each edit
    re-ran the probes, which cost a one-document night most of its tokens (bench/nightly_cost.py),
    and a changed verdict would re-synthesize every document."""
    by_language: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_language.setdefault(c.language, []).append(c)
    sample = []
    for language, group in sorted(by_language.items()):
        with_facts = [c for c in group if extract_facts(c)] or group
        sample += sorted(with_facts, key=lambda c: short_hash(c.text, n=16))[:per_language]
    return sample


def probe_languages(chunks: list[Chunk], llm: LLMSettings, settings: SynthSettings, mode: str,
                    probe_calls: int = 6, cost: ModeChoice | None = None) -> dict[str, str]:
    """Languages the endpoint cannot write, each with the reason, from a few greedy calls per
    language (SmolLM2-135M writes no usable Chinese: its Chinese "questions" are echoes and
    mojibake, with the odd one slipping through the filters). A language is skipped when its keep
    share is below `min_keep_share` while another language reaches it, so an endpoint that fails at
    everything still reaches the keep-rate gate and its loud message."""
    by_language: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_language.setdefault(c.language, []).append(c)
    if len(by_language) < 2:
        return {}
    greedy = settings.model_copy(update={"questions_per_fact": 1})
    verdicts = {}
    for language, group in sorted(by_language.items()):
        if mode == "qa":
            calls = plan_calls(sorted(group, key=lambda c: -c.n_tokens)[:2], greedy, mode, n_pairs=2)
        else:
            calls = plan_calls(group, greedy, mode)[:probe_calls]
        result = run_calls(calls, llm, greedy, mode, progress=False)
        if cost is not None:
            cost.add(result)
        returned = len(result.pairs) + len(result.dropped)
        share = len(result.pairs) / returned if returned else 0.0
        verdicts[language] = (share, len(result.pairs), returned, dict(Counter(d.reason for d in result.dropped)))
    if not any(share >= settings.min_keep_share for share, *_ in verdicts.values()):
        return {}
    return {
        language: (f"probe of {llm.model} on {LANGUAGE_NAMES.get(language, language)} text: {kept} of {returned} "
                   f"replies usable ({reasons}), below min_keep_share {settings.min_keep_share:.0%}; its documents "
                   f"are not synthesized; use {ENDPOINT_HINT.get(language, 'an endpoint that writes this language')}")
        for language, (share, kept, returned, reasons) in verdicts.items() if share < settings.min_keep_share
    }


# ---------------------------------------------------------------- Prefect


@task(cache_policy=CACHE, persist_result=True, **network_retries(LLMSettings()))
def choose_mode_task(chunks: list[Chunk], llm: LLMSettings, settings: SynthSettings) -> ModeChoice:
    """`chunks`: the probe sample (`probe_sample`), not the whole folder: it is the cache key."""
    choice = choose_mode(chunks, llm, settings)
    choice.skip_languages = probe_languages(chunks, llm, settings, choice.mode, cost=choice)
    return choice


@task(cache_policy=CACHE, persist_result=True, task_run_name="synthesize {path}", **network_retries(LLMSettings()))
def synthesize_document_task(path: str, chunks: list[Chunk], llm: LLMSettings, settings: SynthSettings,
                             mode: str) -> SynthResult:
    # One task per document, or per part of a long one (flows/build_steps.synthesis_parts): the cache key
    # holds the chunks' text, so editing one document re-synthesizes that document only.
    result = synthesize_chunks(chunks, llm, settings, mode)
    if result.failed_calls:
        # Raise rather than cache a partial result: a cached hole would never be filled by a
        # later nightly run. Prefect retries the task; the flow reports it if it still fails.
        raise SynthesisIncomplete(f"{path}: {result.failed_calls} of {result.calls} calls failed; "
                                  f"first: {result.errors[0]}")
    return result
