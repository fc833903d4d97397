"""The loop's material (doctune/loop.py has the rounds): for each fact the candidate missed on the exam, new
question wordings, answered with the fact sentence.

- **From the endpoint** (a language it writes): `loop.questions_per_fact` questions from synthesis's fact
  prompt, with example sets and seeds of their own per round (so round 2 asks other questions than round 1
  and than the first synthesis), sampled at `loop.temperature`, checked as synthesis checks its questions.
- **By rule** (every language, no LLM): the fact's cloze questions put in its document's context ("According to
  the Staff handbook > Leave, ...", "根据《员工手册》，……"), one frame per round.
- **Never near the exam**: the fact's exam question is never shown to the endpoint, and a new question whose
  character-shingle Jaccard with any exam question reaches `loop.max_exam_similarity` is dropped with the
  reason. The build's hold_out then applies to these rows as to every other.

One cached task per document: the same rounds on the same chunks give the same material from the cache, so a
night whose loop did not move makes no LLM call."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from prefect import task
from pydantic import BaseModel, Field

from doctune.llm import chat, make_client
from doctune.loop import LOOP_MODE, LoopSettings
from doctune.prefect_utils import CACHE, network_retries
from doctune.prompts import load_prompt
from doctune.records import Chunk, Dropped, QAPair, short_hash
from doctune.settings import DedupSettings, LLMSettings
from tasks.cloze import fact_questions
from tasks.dedup import jaccard, normalize, shingles
from tasks.synthesize import (SynthResult, check_fact_question, clean_question, fact_messages, question_targets,
                              target_for)
from tasks.variants import heading_line

STAGE = "loop"
MODE = LOOP_MODE
EN_FRAMES = ("According to {where}, {q}", "{q} ({where})", "In {where}: {q}")
ZH_FRAMES = ("根据《{where}》，{q}", "{where}：{q}", "关于{where}，{q}")
WH_START = ("what", "how", "when", "where", "which", "who", "why")


class LoopTarget(BaseModel):
    doc_id: str
    chunk_id: str
    path: str
    fact: str
    language: str
    round: int
    exam_ids: list[str] = Field(default_factory=list)


def framed(question: str, chunk: Chunk, round_: int) -> str | None:
    """The question in its document's context, the frame chosen by the round."""
    where = heading_line(chunk)
    if not where:
        return None
    if chunk.language == "zh":
        return ZH_FRAMES[(round_ - 1) % len(ZH_FRAMES)].format(where=where.replace(" > ", "·"), q=question)
    frame = EN_FRAMES[(round_ - 1) % len(EN_FRAMES)]
    q = question
    if frame.startswith("According") and q.split(" ", 1)[0].lower() in WH_START:
        q = q[0].lower() + q[1:]
    return frame.format(where=f"the {where}" if frame.startswith("According") else where, q=q)


def rule_wordings(target: LoopTarget, chunk: Chunk) -> list[str]:
    cloze = load_prompt("cloze", required=("version", "en", "zh"))
    questions = fact_questions(target.fact, chunk, cloze)
    return [f for q in questions if (f := framed(q, chunk, target.round))]


def _endpoint_wordings(client, llm: LLMSettings, settings: LoopSettings, target: LoopTarget,
                       chunk: Chunk) -> SynthResult:
    out = SynthResult()
    values = question_targets(target.fact, chunk)
    for k in range(settings.questions_per_fact):
        # Example sets and seeds of the round's own: synthesis used variants 0..2x questions_per_fact.
        variant = 100 * target.round + k
        messages, version = fact_messages(target.fact, chunk.language, variant, target_for(values, k))
        seed = int(short_hash("loop", str(target.round), chunk.chunk_id, target.fact, str(k), n=8), 16) % 2**31
        # An endpoint error fails the task (and Prefect retries it): a partial round must never be cached.
        reply = chat(client, llm, messages, temperature=settings.temperature, top_p=0.95, max_tokens=64,
                     stop=["\n"], seed=seed)
        out.calls += 1
        out.prompt_tokens += reply.prompt_tokens
        out.completion_tokens += reply.completion_tokens
        question = clean_question(reply.text)
        reason = check_fact_question(question, target.fact, chunk, values)
        pair = QAPair(question=question, answer=target.fact, source="synthesized", doc_id=chunk.doc_id,
                      path=chunk.path, chunk_id=chunk.chunk_id, mode=MODE, model=llm.model, prompt_version=version,
                      language=chunk.language)
        if reason:
            out.dropped.append(Dropped(stage=STAGE, reason=reason, record=pair.model_dump()))
        else:
            out.pairs.append(pair)
    return out


def make_material(targets: list[LoopTarget], chunks: list[Chunk], llm: LLMSettings, settings: LoopSettings,
                  skip_languages: list[str]) -> SynthResult:
    """The new wordings of every target whose chunk is among `chunks` (before the exam filter)."""
    by_id = {c.chunk_id: c for c in chunks}
    use_llm = settings.questions_per_fact > 0 and any(t.language not in skip_languages for t in targets)
    client = make_client(llm) if use_llm else None
    cloze_version = load_prompt("cloze", required=("version",))["version"]

    def one(target: LoopTarget) -> SynthResult:
        chunk = by_id[target.chunk_id]
        out = (_endpoint_wordings(client, llm, settings, target, chunk)
               if use_llm and chunk.language not in skip_languages else SynthResult())
        out.pairs += [QAPair(question=q, answer=target.fact, source="cloze", doc_id=chunk.doc_id, path=chunk.path,
                             chunk_id=chunk.chunk_id, mode=MODE, prompt_version=cloze_version,
                             language=chunk.language) for q in rule_wordings(target, chunk)]
        return out

    result = SynthResult()
    with ThreadPoolExecutor(max_workers=max(1, llm.concurrency)) as pool:
        for r in pool.map(one, [t for t in targets if t.chunk_id in by_id]):
            result = result.merge(r)
    return result


def away_from_exam(result: SynthResult, targets: list[LoopTarget], exam_questions: list[str], settings: LoopSettings,
                   dedup: DedupSettings) -> tuple[SynthResult, list[dict]]:
    """Drop every new question near an exam question (outside the cached task, so one document's edit does not
    re-make the others' material). Returns what is left, and one row per target for the artifact."""
    exam = [shingles(normalize(q), dedup.ngram) for q in exam_questions]
    kept, dropped = [], list(result.dropped)
    for pair in result.pairs:
        q = shingles(normalize(pair.question), dedup.ngram)
        s = max((jaccard(q, e) for e in exam), default=0.0)
        if s >= settings.max_exam_similarity:
            dropped.append(Dropped(stage=STAGE, reason="near_exam_question", record=pair.model_dump(),
                                   detail=f"question jaccard≈{s:.2f} with an exam question "
                                          f"(loop.max_exam_similarity {settings.max_exam_similarity})"))
        else:
            kept.append(pair)
    new = Counter((p.chunk_id, p.answer) for p in kept)
    near = Counter((d.record.get("chunk_id"), d.record.get("answer")) for d in dropped if d.reason == "near_exam_question")
    failed = Counter((d.record.get("chunk_id"), d.record.get("answer")) for d in dropped if d.reason != "near_exam_question")
    rows = [{"document": t.path, "round": t.round, "fact": t.fact[:160], "new questions": new[t.chunk_id, t.fact],
             "dropped near the exam": near[t.chunk_id, t.fact], "dropped by the checks": failed[t.chunk_id, t.fact]}
            for t in targets]
    return result.model_copy(update={"pairs": kept, "dropped": dropped}), rows


@task(cache_policy=CACHE, persist_result=True, task_run_name="loop material {path}", **network_retries(LLMSettings()))
def loop_material_task(path: str, targets: list[LoopTarget], chunks: list[Chunk], llm: LLMSettings,
                       settings: LoopSettings, skip_languages: list[str]) -> SynthResult:
    return make_material(targets, chunks, llm, settings, skip_languages)
