"""LLM rewrites of each chunk as more text-completion rows, one call per chunk and style (rewrite.styles):

- notes: study notes, one self-contained line per fact with its subject named (Active Reading, Lin et al. 2025);
- relations: the passage's entities, and a sentence for each linked pair (EntiGraph, Yang et al. 2024);
- paraphrase: the passage retold in other words and another order.

The rule-made variants (tasks/variants.py) restate and reorder the document's own sentences; a capable endpoint
can say the same facts in wordings the document never used, which is what lets a question worded another way
reach them. A rewrite is checked before it is kept, and a dropped one is listed with its reason:
- invented_value: a number the chunk does not have (a date, an amount, a count made up or miscopied);
- invented_name: a capitalised name inside a sentence that the chunk does not have (English; SmolLM2-135M
  makes up names such as "the Luminoministerary" far more often than it keeps a passage's facts);
- lost_values: fewer than `rewrite.min_value_share` of the chunk's numbers kept;
- too_short: under a fifth of the chunk's length (a refusal, an empty or cut-off reply);
- copies_source: nearly the chunk word for word (it adds nothing to the document's own row).

One cached task per document: an unchanged document with unchanged settings costs no call the next night."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from prefect import task
from pydantic import BaseModel, Field

from doctune.llm import chat, make_client
from doctune.prefect_utils import CACHE, network_retries
from doctune.prompts import load_prompt, render
from doctune.records import Chunk, Dropped, short_hash
from doctune.settings import LLMSettings, RewriteSettings
from tasks.dedup import jaccard, normalize, shingles
from tasks.synthesize import NUMBERISH
from tasks.variants import heading_line

STAGE = "rewrite"
LIST_MARK = re.compile(r"^\s*(?:\d+[.)、]|[-*•])\s*", re.MULTILINE)  # "1. ", "2) ", "- ": not values
MIN_LENGTH_SHARE = 0.2
MAX_SOURCE_SIMILARITY = 0.9


class RewriteResult(BaseModel):
    rows: list[dict] = Field(default_factory=list)  # text rows, the shape of tasks/dataset.text_rows
    dropped: list[Dropped] = Field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def merge(self, other: "RewriteResult") -> "RewriteResult":
        return RewriteResult(rows=self.rows + other.rows, dropped=self.dropped + other.dropped,
                             calls=self.calls + other.calls, prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                             completion_tokens=self.completion_tokens + other.completion_tokens)


def values(text: str) -> set[str]:
    """The numbers of `text` (thousands separators dropped, so 1,200 and 1200 are one value), list marks left out."""
    return {n.replace(",", "") for n in NUMBERISH.findall(LIST_MARK.sub("", text))}


NAME = re.compile(r"\b[A-Z][A-Za-z]{3,}")
SENTENCE_START = re.compile(r"(?:^|[.!?:;\n\-*•#>\"(]|\d[.)])\s*$")


def names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence, a line or a list item: names, not grammar."""
    return {m.group() for m in NAME.finditer(text) if not SENTENCE_START.search(text[max(0, m.start() - 4):m.start()])}


def clean_rewrite(text: str) -> str:
    """The reply without a code fence or a "Here are the notes:" line before it."""
    text = re.sub(r"^```\w*\n|\n?```$", "", text.strip()).strip()
    first, _, rest = text.partition("\n")
    if rest and re.match(r"^(here (is|are)|sure|certainly|以下是)", first.strip(), re.IGNORECASE) and first.rstrip().endswith((":", "：")):
        text = rest.strip()
    return text


def check_rewrite(rewrite: str, chunk: Chunk, settings: RewriteSettings) -> tuple[str, str] | None:
    """(reason, detail) when the rewrite is not kept; None when it is."""
    source = chunk.shown_text()
    if len(rewrite) < MIN_LENGTH_SHARE * len(source):
        return "too_short", f"{len(rewrite)} characters for a chunk of {len(source)}"
    have, got = values(source), values(rewrite)
    invented = sorted(got - have)
    if invented:
        return "invented_value", f"not in the chunk: {', '.join(invented[:5])}"
    if chunk.language != "zh":
        known = f"{chunk.title} {' '.join(chunk.heading_path)} {source}".casefold()
        made_up = sorted(n for n in names(rewrite) if n.casefold() not in known)
        if made_up:
            return "invented_name", f"not in the chunk: {', '.join(made_up[:5])}"
    if have and len(have & got) < settings.min_value_share * len(have):
        return "lost_values", f"kept {len(have & got)} of the chunk's {len(have)} values " \
                              f"(rewrite.min_value_share {settings.min_value_share})"
    similarity = jaccard(shingles(normalize(rewrite), 5), shingles(normalize(source), 5))
    if similarity >= MAX_SOURCE_SIMILARITY:
        return "copies_source", f"jaccard≈{similarity:.2f} with the chunk"
    return None


def rewrite_messages(chunk: Chunk, style: str) -> tuple[list[dict], str]:
    prompt = load_prompt("rewrite", required=("version", "system", "user", "styles"))
    lang = "zh" if chunk.language == "zh" else "en"
    system = render(prompt["system"], instruction=prompt["styles"][style][lang])
    user = render(prompt["user"], where=heading_line(chunk) or chunk.title, passage=chunk.shown_text())
    return [{"role": "system", "content": system}, {"role": "user", "content": user}], prompt["version"]


def rewrite_chunk(client, llm: LLMSettings, settings: RewriteSettings, chunk: Chunk, style: str) -> RewriteResult:
    messages, version = rewrite_messages(chunk, style)
    seed = int(short_hash("rewrite", style, chunk.chunk_id, n=8), 16) % 2**31
    # An endpoint error fails the task (and Prefect retries it): a half-rewritten document is never cached.
    reply = chat(client, llm, messages, temperature=settings.temperature, top_p=0.95,
                 max_tokens=settings.max_tokens, seed=seed)
    out = RewriteResult(calls=1, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
    text = clean_rewrite(reply.text)
    where = heading_line(chunk)
    row = {"text": (f"# {where}\n\n" if where else "") + text, "kind": f"rewrite:{style}", "path": chunk.path,
           "chunk_id": chunk.chunk_id, "language": chunk.language, "model": llm.model, "prompt_version": version}
    problem = check_rewrite(text, chunk, settings)
    if problem:
        out.dropped.append(Dropped(stage=STAGE, reason=problem[0], detail=problem[1], record=row))
    else:
        out.rows.append(row)
    return out


def rewrite_chunks(chunks: list[Chunk], llm: LLMSettings, settings: RewriteSettings,
                   skip_languages: list[str]) -> RewriteResult:
    """Every chunk in every style (a language the endpoint cannot write is left out), in chunk then style order."""
    jobs = [(c, style) for c in chunks if c.language not in skip_languages for style in settings.styles]
    if not jobs:
        return RewriteResult()
    client = make_client(llm)
    result = RewriteResult()
    with ThreadPoolExecutor(max_workers=max(1, llm.concurrency)) as pool:
        for r in pool.map(lambda job: rewrite_chunk(client, llm, settings, *job), jobs):
            result = result.merge(r)
    return result


@task(cache_policy=CACHE, persist_result=True, task_run_name="rewrite {path}", **network_retries(LLMSettings()))
def rewrite_document_task(path: str, chunks: list[Chunk], llm: LLMSettings, settings: RewriteSettings,
                          skip_languages: list[str]) -> RewriteResult:
    return rewrite_chunks(chunks, llm, settings, skip_languages)
