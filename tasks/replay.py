"""Replay pairs: the model's own answers to a small shipped set of general prompts, mixed into the
training data so a retrain on a small folder does not turn every reply into a handbook sentence.

Offline the synthesis endpoint serves the base model, so these are the base model's own answers;
with another endpoint they are that model's answers (mild distillation), said in the card."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prefect import task
from pydantic import BaseModel, Field

from doctune.llm import chat, make_client
from doctune.prefect_utils import CACHE, network_retries
from doctune.prompts import load_prompt, render
from doctune.records import Dropped, QAPair
from doctune.settings import LLMSettings

STAGE = "replay"


class ReplayResult(BaseModel):
    pairs: list[QAPair] = Field(default_factory=list)
    dropped: list[Dropped] = Field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def looping(text: str) -> bool:
    """A small model that repeats itself: many of its 4-word windows are the same."""
    words = text.split()
    grams = [" ".join(words[i:i + 4]) for i in range(max(0, len(words) - 3))]
    return len(grams) >= 12 and len(set(grams)) < 0.6 * len(grams)


def replay_pairs(llm: LLMSettings, languages: list[str], max_tokens: int = 160) -> ReplayResult:
    """Answers to every shipped prompt of these languages (the flow takes the share it needs, so
    the cached result does not depend on the dataset's size)."""
    prompt = load_prompt("replay")
    todo = [(lang, p) for lang in languages for p in prompt["prompts"].get(lang, [])]
    client = make_client(llm)

    def one(item):
        lang, text = item
        messages = [{"role": "system", "content": prompt["system"]},
                    {"role": "user", "content": render(prompt["user"], prompt=text)}]
        return lang, text, chat(client, llm, messages, temperature=0, max_tokens=max_tokens)

    result = ReplayResult(calls=len(todo))
    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool:
        for lang, question, reply in pool.map(one, todo):
            answer = reply.text.strip()
            result.prompt_tokens += reply.prompt_tokens
            result.completion_tokens += reply.completion_tokens
            pair = QAPair(question=question, answer=answer, source="replay", model=llm.model,
                          prompt_version=prompt["version"], language=lang, path="prompts/replay.yaml")
            reason = "empty" if not answer else "looping" if looping(answer) else None
            if reason:
                result.dropped.append(Dropped(stage=STAGE, reason=reason, record=pair.model_dump()))
            else:
                result.pairs.append(pair)
    return result


@task(cache_policy=CACHE, persist_result=True, **network_retries(LLMSettings()))
def replay_task(llm: LLMSettings, languages: list[str]) -> ReplayResult:
    return replay_pairs(llm, languages)
