"""Optional stage: add a translated copy of every pair (e.g. English → Chinese), keeping the original."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prefect import task
from pydantic import BaseModel, Field
from tqdm import tqdm

from doctune.llm import EndpointError, chat, make_client
from doctune.prefect_utils import CACHE, network_retries
from doctune.prompts import load_prompt, render
from doctune.records import CJK_RE, Dropped, QAPair
from doctune.settings import LLMSettings, TranslateSettings

STAGE = "translate"
LANGUAGE_NAMES = {"zh": "Simplified Chinese", "en": "English"}


class TranslateResult(BaseModel):
    pairs: list[QAPair] = Field(default_factory=list, description="Translated copies only.")
    dropped: list[Dropped] = Field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _messages(text: str, kind: str, target: str) -> list[dict]:
    prompt = load_prompt("translate")
    fields = dict(text=text, kind=kind, target=LANGUAGE_NAMES[target])
    return [{"role": "system", "content": render(prompt["system"], **fields)},
            {"role": "user", "content": render(prompt["user"], **fields)}]


def looks_translated(text: str, target: str) -> bool:
    cjk = len(CJK_RE.findall(text))
    return cjk >= max(2, len(text) * 0.2) if target == "zh" else cjk == 0


def translate_pairs(pairs: list[QAPair], llm: LLMSettings, settings: TranslateSettings,
                    progress: bool = True) -> TranslateResult:
    todo = [p for p in pairs if p.language != settings.target_language]
    client = make_client(llm)
    version = load_prompt("translate")["version"]
    result = TranslateResult()

    def one(pair: QAPair) -> tuple[QAPair, list, Exception | None]:
        replies = []
        try:
            for kind, text in (("question", pair.question), ("answer", pair.answer)):
                replies.append(chat(client, llm, _messages(text, kind, settings.target_language),
                                    temperature=0, max_tokens=512))
        except EndpointError as exc:
            return pair, replies, exc
        return pair, replies, None

    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool:
        for pair, replies, error in tqdm(pool.map(one, todo), total=len(todo), desc="translate",
                                         disable=not progress or not todo):
            result.calls += len(replies) + (error is not None)
            result.prompt_tokens += sum(r.prompt_tokens for r in replies)
            result.completion_tokens += sum(r.completion_tokens for r in replies)
            if error is not None:
                raise error
            question, answer = (r.text.strip() for r in replies)
            new = QAPair(question=question, answer=answer, **pair.model_dump(
                exclude={"pair_id", "question", "answer", "source", "language", "translated_from", "prompt_version"}),
                source="translated", language=settings.target_language,
                translated_from=pair.pair_id, prompt_version=version)
            if not (looks_translated(question, settings.target_language)
                    and looks_translated(answer, settings.target_language)):
                result.dropped.append(Dropped(stage=STAGE, reason="not_in_target_language", record=new.model_dump()))
            else:
                result.pairs.append(new)
    return result


@task(cache_policy=CACHE, persist_result=True, **network_retries(LLMSettings()))
def translate_task(pairs: list[QAPair], llm: LLMSettings, settings: TranslateSettings) -> TranslateResult:
    return translate_pairs(pairs, llm, settings)
