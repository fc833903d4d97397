"""The exam of a folder: questions about every document, written apart from the training questions, so
the nightly can measure what tonight's model learned of the user's own documents (doctune/exam.py has the
file format and the settings).

- **Which facts**: the fact sentences of a document (fact mode's `extract_facts`) that hold a name or a
  number to ask for, in an order drawn from the exam's own seed, its table cells and its prose taking turns;
  one question per `facts_per_question` facts, at least one per document.
- **Worded apart**: the endpoint writes the question from the exam's own prompt family
  (prompts/exam_questions.*.yaml: other instructions, other examples), sampled with the exam's own seed and
  temperature, and fact mode's checks drop a bad one (with the reason). A fact the endpoint wrote no usable
  question for, and every fact of a language the endpoint cannot write (the offline 135M model writes no
  Chinese), gets a question by the cloze rules instead, marked `source: rule`.
- **What a right answer holds**: the fact's values that the question does not name (`answer_facts`).
- **Stable**: one cached task per document, keyed on its chunks: an unchanged document keeps its questions
  night after night, a changed one gets new ones.
- **Never seen in training**: `hold_out` compares every exam question with every training question (the
  character shingles and threshold of the MinHash dedup, computed exactly); a training twin is taken out of
  the dataset with the reason, and the fact stays taught by its other wordings and its passage. When the twin
  was written by a person (a FAQ row), or is its fact's only question, the exam question goes instead, and a
  rule-made reserve about the document's next fact is asked in its place. A Chinese exam question's twins
  include the rule-made questions that differ from it only in the question word."""

from __future__ import annotations

import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from prefect import task
from pydantic import BaseModel, Field

from doctune.exam import ExamItem, ExamSettings
from doctune.llm import chat, make_client
from doctune.metrics import answer_facts
from doctune.prefect_utils import CACHE, network_retries
from doctune.prompts import load_prompt, render
from doctune.records import NOT_ONE_FACT, Chunk, Dropped, QAPair, fact_key, short_hash
from doctune.settings import DedupSettings, LLMSettings
from tasks.cloze import ZH_UNITS, chinese_fact, fact_questions
from tasks.dedup import jaccard, normalize, shingles
from tasks.synthesize import cell_of, check_fact_question, clean_question, extract_facts, question_targets

STAGE = "exam"
PROMPT = "exam_questions"
CLOZE_PROMPT = "cloze"
HUMAN_WRITTEN = {"faq", "instruction"}


class ExamResult(BaseModel):
    items: list[ExamItem] = Field(default_factory=list)
    # rule-made questions (no call) for the next facts in the exam's order, asked in place of one that
    # hold_out has to let go
    reserves: list[ExamItem] = Field(default_factory=list)
    dropped: list[Dropped] = Field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def exam_candidates(chunks: list[Chunk], seed: int) -> list[tuple[Chunk, str, list[str]]]:
    """(chunk, fact, values to ask for) for every fact sentence with a name or number, in the exam's order: the
    document's table cells and its other facts take turns (each in an order drawn from the seed), so that a big
    table, a fact per cell, does not crowd the prose out of the document's questions."""
    found = [(c, fact, targets) for c in chunks for fact in extract_facts(c)
             if (targets := question_targets(fact, c))]
    found.sort(key=lambda x: short_hash(str(seed), x[0].chunk_id, x[1]))
    prose, cells = [], []
    for x in found:
        (prose if cell_of(x[1], x[0]) is None else cells).append(x)
    turns = [x for pair in zip(prose, cells) for x in pair]
    return turns + prose[len(cells):] + cells[len(prose):]


def questions_for(n_facts: int, settings: ExamSettings) -> int:
    return min(settings.max_per_document, math.ceil(n_facts / settings.facts_per_question)) if n_facts else 0


def exam_messages(fact: str, language: str) -> tuple[list[dict], str]:
    prompt = load_prompt(f"{PROMPT}.{language}")
    messages = [{"role": "system", "content": prompt["system"]}]
    for ex in prompt["examples"]:
        messages += [{"role": "user", "content": render(prompt["user"], fact=ex["fact"])},
                     {"role": "assistant", "content": ex["question"]}]
    messages.append({"role": "user", "content": render(prompt["user"], fact=fact)})
    return messages, prompt["version"]


def _item(chunk: Chunk, fact: str, question: str, source: str, version: str) -> ExamItem | None:
    cell = cell_of(fact, chunk)
    if chunk.language == "zh" and cell is None:
        fact = chinese_fact(fact)  # the sentence as training answers it, without a heading the reader glued on
    # A table cell's fact is its value: the caption's names ("Fares from Aldermouth") are not what is asked.
    facts = answer_facts(question, cell.value if cell else fact, chunk.language)
    if not facts:
        return None
    return ExamItem(id=f"exam-{short_hash(chunk.chunk_id, fact, question, n=12)}", question=question, answer=fact,
                    facts=facts, language=chunk.language, path=chunk.path, doc_id=chunk.doc_id,
                    chunk_id=chunk.chunk_id, source=source, prompt_version=version)


def rule_question(chunk: Chunk, fact: str, cloze: dict) -> ExamItem | None:
    """The cloze rules' question for the fact: the value moved to the front where the sentence allows
    ("How much does … cost?"), else in place ("特萨林深圳办事处共有员工多少人？")."""
    questions = fact_questions(fact, chunk, cloze)
    for q in reversed(questions):
        if item := _item(chunk, fact, q, "rule", cloze["version"]):
            return item
    return None


def _one_fact(client, llm: LLMSettings, settings: ExamSettings, cloze: dict, use_llm: bool,
              candidate: tuple[Chunk, str, list[str]]) -> ExamResult:
    chunk, fact, targets = candidate
    out = ExamResult()
    for attempt in range(settings.tries if use_llm else 0):
        messages, version = exam_messages(fact, chunk.language)
        # An endpoint error fails the task (and Prefect retries it): a degraded exam must never be cached.
        reply = chat(client, llm, messages, temperature=settings.temperature, top_p=0.95, max_tokens=64,
                     stop=["\n"], seed=int(short_hash(str(settings.seed), chunk.chunk_id, fact, str(attempt), n=8),
                                           16) % 2**31)
        out.calls += 1
        out.prompt_tokens += reply.prompt_tokens
        out.completion_tokens += reply.completion_tokens
        question = clean_question(reply.text)
        reason = check_fact_question(question, fact, chunk, targets)
        item = None if reason else _item(chunk, fact, question, "llm", version)
        if item:
            out.items.append(item)
            return out
        out.dropped.append(Dropped(stage=STAGE, reason=reason or "no_fact_left_to_check", record={
            "question": question, "fact": fact, "path": chunk.path, "chunk_id": chunk.chunk_id}))
    if item := rule_question(chunk, fact, cloze):
        out.items.append(item)
    return out


def make_exam(chunks: list[Chunk], llm: LLMSettings, settings: ExamSettings,
              skip_languages: list[str]) -> ExamResult:
    """Exam questions for one document's chunks (see the module docstring)."""
    candidates = exam_candidates(chunks, settings.seed)
    wanted = questions_for(len(candidates), settings)
    cloze = load_prompt(CLOZE_PROMPT, required=("version", "en", "zh"))
    use_llm = settings.tries > 0 and any(c.language not in skip_languages for c in chunks)
    client = make_client(llm) if use_llm else None
    result, rank = ExamResult(), 0
    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool:
        # In waves: a fact that gets no question at all gives its place to the next fact in the exam's order.
        while len(result.items) < wanted and rank < len(candidates):
            wave = candidates[rank:rank + wanted - len(result.items)]
            rank += len(wave)
            for r in pool.map(lambda c: _one_fact(client, llm, settings, cloze,
                                                  use_llm and c[0].language not in skip_languages, c), wave):
                result.items += r.items
                result.dropped += r.dropped
                result.calls += r.calls
                result.prompt_tokens += r.prompt_tokens
                result.completion_tokens += r.completion_tokens
    for chunk, fact, _ in candidates[rank:]:
        if len(result.reserves) >= wanted:
            break
        if item := rule_question(chunk, fact, cloze):
            result.reserves.append(item)
    return result


@task(cache_policy=CACHE, persist_result=True, task_run_name="exam {path}", **network_retries(LLMSettings()))
def exam_document_task(path: str, chunks: list[Chunk], llm: LLMSettings, settings: ExamSettings,
                       skip_languages: list[str]) -> ExamResult:
    return make_exam(chunks, llm, settings, skip_languages)


class HeldOut(BaseModel):
    items: list[ExamItem]
    pairs: list[QAPair]
    dropped: list[Dropped]


def zh_asking(cloze: dict) -> re.Pattern:
    """The Chinese question words of the cloze prompt (its zh wordings less the unit), with the unit after them:
    two rule-made questions that differ only in these ask the same thing the same way ("保修几个月", "保修多少个月",
    "保修多久"). Longest first, so "多少钱" is taken whole, not as "多少"."""
    words = {re.sub(r"\{\{\s*unit\s*\}\}", "", v).strip() for v in cloze["zh"].values() if isinstance(v, str)}
    alternatives = "|".join(re.escape(w) for w in sorted(words - {""}, key=lambda w: (-len(w), w)))
    return re.compile(f"(?:{alternatives})(?:{ZH_UNITS}|欧元|美元|元)?")


def hold_out(items: list[ExamItem], pairs: list[QAPair], dedup: DedupSettings,
             reserves: list[ExamItem] = ()) -> HeldOut:
    """Keep the exam unseen: a training question whose shingle Jaccard with an exam question reaches
    dedup.near_threshold leaves the dataset, and so does, for a Chinese exam question, a training question
    about the same fact that reaches it once the question words are left out of both ("…保修几个月？" for
    "…保修多少个月？": the rules write every question word, and the exam would only measure the swap).
    Unless a person wrote the twin, or it is the last training question its answer has (a fact the exam's
    rules asked with the one wording training had too): then the exam question leaves, so that no fact is
    taken out of training by being examined, and the next of its document's `reserves` (rule-made, in the
    exam's order) is tried in its place, so the exam keeps its size."""
    n, t = dedup.ngram, dedup.near_threshold
    train = [shingles(normalize(p.question), n) for p in pairs]
    asking = zh_asking(load_prompt(CLOZE_PROMPT, required=("version", "en", "zh"))) \
        if any(i.language == "zh" for i in [*items, *reserves]) else None
    bare_train: dict[int, set] = {}  # training questions without their question words, as asked

    def bare(text: str) -> set:
        return shingles(normalize(asking.sub("", text)), n)
    # training questions left per answer (passages and replay answer no one fact)
    asked = Counter(fact_key(p.answer) for p in pairs if p.source not in NOT_ONE_FACT)
    by_fact: dict[str, list[int]] = {}
    for j, p in enumerate(pairs):
        by_fact.setdefault(fact_key(p.answer), []).append(j)
    drop_pairs: dict[int, tuple[ExamItem, float, bool]] = {}
    quota = Counter(i.doc_id for i in items)  # questions per document: a reserve only fills a place that came free
    examined: set[str] = set()
    kept_items, dropped = [], []
    for item, reserve in [*((i, False) for i in items), *((r, True) for r in reserves)]:
        if reserve and (quota[item.doc_id] <= 0 or fact_key(item.answer) in examined):
            continue
        q = shingles(normalize(item.question), n)
        twins = {j: (s, False) for j, other in enumerate(train) if j not in drop_pairs
                 and t * len(q) <= len(other) <= len(q) / t and (s := jaccard(q, other)) >= t}
        if item.language == "zh":
            asked_bare = bare(item.question)
            for j in by_fact.get(fact_key(item.answer), []):
                if j in drop_pairs or j in twins or pairs[j].source in NOT_ONE_FACT:
                    continue
                if j not in bare_train:
                    bare_train[j] = bare(pairs[j].question)
                if (s := jaccard(asked_bare, bare_train[j])) >= t:
                    twins[j] = (s, True)
        human = next((j for j in twins if pairs[j].source in HUMAN_WRITTEN), None)
        if human is not None:
            dropped.append(Dropped(stage=STAGE, reason="exam_question_seen_in_training", record=item.model_dump(),
                                   duplicate_of=pairs[human].pair_id,
                                   detail=f"question jaccard≈{twins[human][0]:.2f} with a {pairs[human].source} row, "
                                          "which stays"))
            continue
        taken = Counter(fact_key(pairs[j].answer) for j in twins if pairs[j].source not in NOT_ONE_FACT)
        last = next((j for j in twins if taken[key := fact_key(pairs[j].answer)] >= asked[key] > 0), None)
        if last is not None:
            dropped.append(Dropped(stage=STAGE, reason="exam_question_is_a_facts_only_training_question",
                                   record=item.model_dump(), duplicate_of=pairs[last].pair_id,
                                   detail="its training twin is the only question its fact has, and stays"))
            continue
        kept_items.append(item)
        quota[item.doc_id] -= 1
        examined.add(fact_key(item.answer))
        asked.subtract(taken)
        for j, (s, bare_only) in twins.items():
            drop_pairs.setdefault(j, (item, s, bare_only))
    for j, (item, s, bare_only) in sorted(drop_pairs.items()):
        how = "without the question words, " if bare_only else ""
        dropped.append(Dropped(stage=STAGE, reason="held_out_for_exam", record=pairs[j].model_dump(),
                               duplicate_of=item.id, detail=f"question jaccard≈{s:.2f} {how}with exam question {item.id}"))
    return HeldOut(items=kept_items, pairs=[p for j, p in enumerate(pairs) if j not in drop_pairs], dropped=dropped)
