"""The LLM judge: a reply scored 1-5 against the reference answer by any OpenAI-compatible endpoint
(prompts/judge.md, judge_zh.md). Optional in evaluation: it costs one call per reply."""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, Field

from doctune.metrics import Language
from doctune.prompts import PROMPTS_DIR, render
from doctune.settings import LLMSettings

log = logging.getLogger(__name__)


class JudgeScore(BaseModel):
    score: int | None = Field(description="1-5, or None when the judge's reply could not be read.")
    reason: str


def parse_judge_reply(text: str) -> JudgeScore:
    """Lenient: a JSON object anywhere (code fences allowed), else `score: N`, else a bare digit."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        try:
            obj = json.loads(match.group(0))
            score = round(float(obj.get("score")))
            if 1 <= score <= 5:
                return JudgeScore(score=score, reason=str(obj.get("reason", "")).strip())
        except (ValueError, TypeError, AttributeError):
            pass
    match = (re.search(r"(?:score|评分|分数)\W{0,3}([1-5])(?!\d)", text, re.IGNORECASE)
             or re.fullmatch(r"\s*([1-5])\s*", text))
    if match:
        return JudgeScore(score=int(match.group(1)), reason=text.strip()[:300])
    return JudgeScore(score=None, reason=f"unreadable judge reply: {text.strip()[:200]!r}")


def judge_prompt(question: str, reference: str, reply: str, language: Language) -> str:
    name = "judge_zh.md" if language == "zh" else "judge.md"
    template = (PROMPTS_DIR / name).read_text(encoding="utf-8")
    return render(template, question=question, reference=reference, reply=reply)


def judge_replies(llm: LLMSettings, items: list[tuple[str, str, str, Language]]) -> list[JudgeScore]:
    """Score (question, reference, reply, language) tuples concurrently. Calls that still fail after
    their own retries are asked again in up to `llm.task_retries` later rounds (spaced and jittered
    like task retries: a retry of the evaluation task would regenerate every reply); one that fails
    throughout gives a None score with the reason instead of losing the whole evaluation."""
    from doctune.llm import EndpointError, chat, make_client, retry_delays

    client = make_client(llm)

    def one(item: tuple[str, str, str, Language]) -> tuple[JudgeScore, bool]:
        prompt = judge_prompt(*item)
        try:
            result = chat(client, llm, [{"role": "user", "content": prompt}], temperature=0, max_tokens=200)
        except EndpointError as exc:
            return JudgeScore(score=None, reason=f"judge call failed: {exc}"), exc.transient
        return parse_judge_reply(result.text), False

    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool:
        results = list(pool.map(one, items))
        for round_no, delay in enumerate(retry_delays(llm), start=1):
            again = [i for i, (_, retry) in enumerate(results) if retry]
            if not again:
                break
            log.warning("judge: %d of %d calls failed (%s); round %d of %d in %.1f s", len(again), len(items),
                        results[again[0]][0].reason[:200], round_no, llm.task_retries, delay)
            time.sleep(delay)
            for i, result in zip(again, pool.map(one, [items[i] for i in again])):
                results[i] = result
    return [score for score, _ in results]
