"""Passage pairs: "What does <document> say about <section>?" answered with the chunk's text.

Fact-mode pairs teach each sentence as the answer to a few questions. A small model trained on
those alone learns the questions' wording, and it mixes up values between similar facts (the
price of the service plan for the price of the drone). Passage pairs show every fact once more,
inside its section and next to the facts around it. No LLM writes them, so they cost nothing,
work offline and work in Chinese too. They stay in the training split: a summary of a section
is no held-out question."""

from __future__ import annotations

from collections import defaultdict

from prefect import task

from doctune.prefect_utils import CACHE
from doctune.prompts import load_prompt, render
from doctune.records import Chunk, QAPair

PROMPT = "passages"


def _title(chunk: Chunk) -> str:
    # A file name used as a title ("price_sheet_2025") reads better with spaces.
    return (chunk.title or chunk.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]).replace("_", " ").strip()


def passage_pairs(chunks: list[Chunk], per_chunk: int) -> list[QAPair]:
    """`per_chunk` differently worded questions for every chunk, each answered with the chunk's
    text (whitespace collapsed). A section split over several chunks names the part, so no two
    chunks share a question."""
    if per_chunk <= 0:
        return []
    prompt = load_prompt(PROMPT, required=("version", "templates"))
    groups: dict[tuple, list[Chunk]] = defaultdict(list)
    for chunk in chunks:
        groups[(chunk.path, tuple(chunk.heading_path))].append(chunk)
    pairs = []
    for chunk in chunks:
        group = groups[(chunk.path, tuple(chunk.heading_path))]
        title = _title(chunk)
        # heading_path[0] is usually the document title itself; a section needs a heading below it.
        headings = [h for h in chunk.heading_path if h.strip() and h.strip() != chunk.title.strip()]
        kind = "section" if headings else "document"
        part = render(prompt["templates"]["part"][chunk.language], n=group.index(chunk) + 1) if len(group) > 1 else ""
        answer = " ".join(chunk.shown_text().split())
        for template in prompt["templates"][chunk.language][kind][:per_chunk]:
            question = render(template, title=title, section=headings[-1] if headings else "", part=part)
            pairs.append(QAPair(question=question, answer=answer, source="passage", doc_id=chunk.doc_id,
                                path=chunk.path, chunk_id=chunk.chunk_id, mode="passage",
                                prompt_version=prompt["version"], language=chunk.language))
    return pairs


@task(cache_policy=CACHE, persist_result=True)
def passage_task(chunks: list[Chunk], per_chunk: int) -> list[QAPair]:
    return passage_pairs(chunks, per_chunk)
