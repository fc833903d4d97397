"""Representation variants of the documents, made by rule (no LLM, so they work offline with any model):
text-completion rows that say each fact again in other surroundings.

A model fine-tuned on one wording of a fact can recite it but rarely answers a question about it put
another way; training text that restates the fact, with its subject spelled out and in other orders,
is what lets a question reach it (Allen-Zhu & Li, Physics of Language Models 3.1). Per chunk:
- restated: each fact sentence under its document title and section ("Company handbook, Leave: ...");
- permuted: the chunk's fact sentences in `permutations` other orders, drawn with the dataset seed;
and per FAQ export row, its question and answer as one passage. Table rows are already fact sentences
(tasks/synthesize.table_row_facts), so they are restated too.
"""

from __future__ import annotations

import random

from doctune.records import Chunk, QAPair
from tasks.synthesize import extract_facts


def heading_line(chunk: Chunk) -> str:
    """The chunk's place, as "Document title > section > subsection" (the title once); "" when it has none."""
    heads = [h for h in chunk.heading_path if h.strip() and h.strip() != chunk.title.strip()]
    return (" > ".join([chunk.title.strip(), *heads]) if chunk.title.strip() else " > ".join(heads)).strip()


def restated(chunk: Chunk) -> list[str]:
    """Each fact sentence with the document and section it belongs to in front of it."""
    where = heading_line(chunk)
    if not where:
        return []
    sep = "：" if chunk.language == "zh" else ": "
    return [f"{where}{sep}{fact}" for fact in extract_facts(chunk)]


def permuted(chunk: Chunk, n: int, seed: int) -> list[str]:
    """The chunk's fact sentences in `n` orders other than the document's (fewer when there are not
    that many), each under the chunk's place."""
    facts = extract_facts(chunk)
    if len(facts) < 3 or n <= 0:
        return []
    rng = random.Random(f"{seed}:{chunk.chunk_id}")
    joiner = "" if chunk.language == "zh" else " "
    where = heading_line(chunk)
    seen, out = {tuple(facts)}, []
    for _ in range(4 * n):
        order = facts[:]
        rng.shuffle(order)
        if tuple(order) not in seen:
            seen.add(tuple(order))
            out.append((f"# {where}\n\n" if where else "") + joiner.join(order))
        if len(out) == n:
            break
    return out


def faq_passages(pairs: list[QAPair]) -> list[tuple[QAPair, str]]:
    return [(p, f"{p.question}\n{p.answer}") for p in pairs if p.source == "faq"]


def variant_rows(chunks: list[Chunk], faq: list[QAPair], permutations: int, seed: int) -> list[dict]:
    """Text-completion rows (the shape of tasks/dataset.text_rows, with `kind`) of every variant."""
    rows = []
    for c in chunks:
        base = {"path": c.path, "chunk_id": c.chunk_id, "language": c.language}
        rows += [{"text": t, "kind": "restated", **base} for t in restated(c)]
        rows += [{"text": t, "kind": "permuted", **base} for t in permuted(c, permutations, seed)]
    rows += [{"text": text, "kind": "faq", "path": p.path or "", "chunk_id": "", "language": p.language}
             for p, text in faq_passages(faq)]
    return rows
