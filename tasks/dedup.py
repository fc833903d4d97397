"""Drop duplicate Q&A pairs while keeping paraphrases.

Synthesis writes several differently worded questions for the same answer on purpose, so the
model learns the fact rather than one wording. Dedup therefore removes only pairs whose
question is (nearly) the same text AND whose answer is the same or nearly the same:
- exact:    same question and answer after normalisation (NFKC, casefold, no punctuation,
            collapsed whitespace);
- near:     MinHash LSH over character n-grams of the question (characters, so Chinese needs
            no word segmentation), every candidate confirmed by the exact Jaccard of question
            and answer n-gram sets;
- semantic: optional; question embeddings with cosine >= semantic_threshold, answers near-same.
A near-identical question with a clearly different answer is a different fact: both stay, and
so do pairs that mention different numbers (a price of 499 or 599 is one character apart).

The first occurrence wins and only kept pairs are ever a `duplicate_of`. The flow passes
human-written sources (faq, instruction) before synthesized ones, so those are the ones kept.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from typing import Callable

import numpy as np
import openai
from datasketch import MinHash, MinHashLSH
from prefect import task
from pydantic import BaseModel, Field

from doctune.llm import EndpointError, make_client, scrub
from doctune.prefect_utils import CACHE, network_retries
from doctune.records import Dropped, QAPair
from doctune.settings import DedupSettings, LLMSettings

STAGE = "dedup"
REASONS = ("exact_duplicate", "conflicting_answers", "near_duplicate", "semantic_duplicate")

Embedder = Callable[[list[str]], np.ndarray]

# Every punctuation code point of the BMP (Unicode category P*), Chinese ，。？！：；“”（） included.
# Symbols (S*) such as $ % + stay: "$5" and "5" may be different answers.
_PUNCT = {i: None for i in range(0x10000) if unicodedata.category(chr(i)).startswith("P")}
_SPACES = re.compile(r"\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Rows per block of the cosine matrix: 2048 x 2048 float32 is 16 MiB, whatever the input size.
_BLOCK = 2048
# (false positive, false negative) weights from which MinHashLSH picks bands and rows; see _near.
LSH_WEIGHTS = (0.05, 0.95)


class DedupResult(BaseModel):
    kept: list[QAPair] = Field(default_factory=list)
    dropped: list[Dropped] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict, description="input, kept, and one count per reason.")


def normalize(text: str) -> str:
    """NFKC (full-width ？ becomes ?), casefold, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT)
    return _SPACES.sub(" ", text).strip()


def shingles(text: str, n: int) -> set[str]:
    """Character n-grams; a text shorter than n is one shingle, so short questions still compare."""
    if len(text) <= n:
        return {text}
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class _Pairs:
    """Normalised texts and lazily built answer shingles of the pairs still in the running."""

    def __init__(self, pairs: list[QAPair], questions: list[str], answers: list[str], ngram: int):
        self.pairs, self.questions, self.answers, self.ngram = pairs, questions, answers, ngram
        self._answer_shingles: dict[int, set[str]] = {}
        self._numbers: dict[int, list[str]] = {}

    def answer_match(self, i: int, j: int) -> float:
        """Answer Jaccard of pairs i and j, or 0 when they mention different numbers: "499" and
        "599" differ by one character yet are different facts, which dedup must keep."""
        for k in (i, j):
            if k not in self._numbers:
                p = self.pairs[k]
                self._numbers[k] = sorted(_NUMBER.findall(unicodedata.normalize("NFKC", f"{p.question} {p.answer}")))
        if self._numbers[i] != self._numbers[j]:
            return 0.0
        if self.answers[i] == self.answers[j]:
            return 1.0
        # Answers can be long passages; shingle them only for the few candidates that need it.
        for k in (i, j):
            if k not in self._answer_shingles:
                self._answer_shingles[k] = shingles(self.answers[k], self.ngram)
        return jaccard(self._answer_shingles[i], self._answer_shingles[j])

    def subset(self, keep: list[int]) -> "_Pairs":
        return _Pairs([self.pairs[i] for i in keep], [self.questions[i] for i in keep],
                      [self.answers[i] for i in keep], self.ngram)


def _drop(pair: QAPair, reason: str, duplicate_of: str, detail: str) -> Dropped:
    return Dropped(stage=STAGE, reason=reason, record=pair.model_dump(), duplicate_of=duplicate_of, detail=detail)


def _exact(pairs: list[QAPair], ngram: int, dropped: list[Dropped]) -> _Pairs:
    first: dict[tuple[str, str], str] = {}
    keep, questions, answers = [], [], []
    for p in pairs:
        q, a = normalize(p.question), normalize(p.answer)
        if (q, a) in first:
            dropped.append(_drop(p, "exact_duplicate", first[(q, a)], "same question and answer after normalisation"))
            continue
        first[(q, a)] = p.pair_id
        keep.append(p)
        questions.append(q)
        answers.append(a)
    return _Pairs(keep, questions, answers, ngram)


def _conflicts(items: _Pairs, settings: DedupSettings, dropped: list[Dropped]) -> _Pairs:
    """The same question with answers that state different facts ("Who is in charge of Tessarine?"
    written once for the founder and once for the chief executive): a model trained on both learns
    to mix them up, and neither can be called the right one, so every such pair is dropped."""
    by_question: dict[str, list[int]] = {}
    for i, q in enumerate(items.questions):
        by_question.setdefault(q, []).append(i)
    conflicting: dict[int, int] = {}
    for group in by_question.values():
        for a in group:
            other = next((b for b in group if b != a and items.answer_match(a, b) < settings.near_threshold), None)
            if other is not None:
                conflicting[a] = other
    for i, j in conflicting.items():
        dropped.append(_drop(items.pairs[i], "conflicting_answers", items.pairs[j].pair_id,
                             f"the same question is answered differently by pair {items.pairs[j].pair_id}"))
    return items.subset([i for i in range(len(items.pairs)) if i not in conflicting])


def _near(items: _Pairs, settings: DedupSettings, dropped: list[Dropped]) -> _Pairs:
    t = settings.near_threshold
    q_shingles = [shingles(q, settings.ngram) for q in items.questions]
    # LSH only proposes candidates and the exact Jaccard below decides. So a false positive costs
    # one set comparison while a false negative is a duplicate lost: LSH_WEIGHTS favour recall
    # (at 128 permutations the default equal weights find ~46% of pairs at exactly the threshold
    # and ~80% at +0.05; these ~93% and ~99%), and crc32 replaces the default sha1 (2.6x faster,
    # still the same in every process, unlike hash()). MinHash.bulk reuses one set of
    # permutations and hashes each shingle set with update_batch.
    hashes = MinHash.bulk(([s.encode("utf-8") for s in sh] for sh in q_shingles),
                          num_perm=settings.num_perm, hashfunc=zlib.crc32)
    lsh = MinHashLSH(threshold=t, num_perm=settings.num_perm, weights=LSH_WEIGHTS)
    keep: list[int] = []
    for i, mh in enumerate(hashes):
        # Only kept pairs are in the index, so a pair is never the duplicate of a dropped one.
        best = None
        for j in lsh.query(mh):
            q_sim = jaccard(q_shingles[i], q_shingles[j])
            if q_sim < t:
                continue
            a_sim = items.answer_match(i, j)
            if a_sim >= t and (best is None or (q_sim, -j) > (best[0], -best[2])):
                best = (q_sim, a_sim, j)
        if best is None:
            lsh.insert(i, mh)
            keep.append(i)
        else:
            q_sim, a_sim, j = best
            dropped.append(_drop(items.pairs[i], "near_duplicate", items.pairs[j].pair_id,
                                 f"question jaccard≈{q_sim:.2f}, answer jaccard≈{a_sim:.2f}"))
    return items.subset(keep)


def _unit_rows(vectors: np.ndarray, n: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(
            f"the embedder returned shape {vectors.shape} for {n} questions; it must return one row per text "
            "(an array of shape (len(texts), dim))"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _semantic(items: _Pairs, settings: DedupSettings, embed: Embedder, dropped: list[Dropped]) -> _Pairs:
    n = len(items.pairs)
    if n < 2:
        return items
    vecs = _unit_rows(embed([p.question for p in items.pairs]), n)
    # Collect every (later i, earlier j) pair above the threshold, block by block, so memory
    # stays bounded and no Python loop runs over all n² pairs; the greedy pass below only
    # walks these candidates.
    cand_i, cand_j, cand_sim = [], [], []
    limit = settings.semantic_threshold - 1e-6  # identical texts give 0.99999994, not 1.0
    for r0 in range(0, n, _BLOCK):
        rows = vecs[r0 : r0 + _BLOCK]
        for c0 in range(0, r0 + len(rows), _BLOCK):
            sims = rows @ vecs[c0 : c0 + _BLOCK].T
            ri, cj = np.nonzero(sims >= limit)
            earlier = cj + c0 < ri + r0
            cand_i.append(ri[earlier] + r0)
            cand_j.append(cj[earlier] + c0)
            cand_sim.append(sims[ri[earlier], cj[earlier]])
    gi, gj, gs = (np.concatenate(x) for x in (cand_i, cand_j, cand_sim))
    order = np.lexsort((gj, -gs, gi))  # by pair, then most similar first, then earliest
    kept = np.ones(n, dtype=bool)
    decided = -1
    for i, j, sim in zip(gi[order].tolist(), gj[order].tolist(), gs[order].tolist()):
        if i == decided or not kept[j]:
            continue
        a_sim = items.answer_match(i, j)
        if a_sim >= settings.near_threshold:
            kept[i] = False
            decided = i
            dropped.append(_drop(items.pairs[i], "semantic_duplicate", items.pairs[j].pair_id,
                                 f"question cosine≈{sim:.3f}, answer jaccard≈{a_sim:.2f}"))
    return items.subset(np.flatnonzero(kept).tolist())


def dedup_pairs(pairs: list[QAPair], settings: DedupSettings, embed: Embedder | None = None) -> DedupResult:
    """Keep the first of each group of duplicates; every other one is dropped with its reason. A
    question asked twice with different answers is dropped on both sides."""
    if settings.semantic and embed is None:
        raise ValueError(
            "dedup.semantic is true but no embedder was given: pass embed= (see make_openai_embedder) "
            "or set dedup.semantic to false"
        )
    dropped: list[Dropped] = []
    items = _exact(pairs, settings.ngram, dropped)
    items = _conflicts(items, settings, dropped)
    items = _near(items, settings, dropped)
    if settings.semantic:
        items = _semantic(items, settings, embed, dropped)
    counts = {"input": len(pairs), "kept": len(items.pairs)} | {r: 0 for r in REASONS}
    for d in dropped:
        counts[d.reason] += 1
    return DedupResult(kept=items.pairs, dropped=dropped, counts=counts)


def make_openai_embedder(client: openai.OpenAI, model: str, batch_size: int = 64) -> Embedder:
    """An embedder over the endpoint's /v1/embeddings (OpenAI, vLLM, Ollama, doctune serve)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    def embed(texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            try:
                # "float" explicitly: some local servers do not implement base64 encoding.
                resp = client.embeddings.create(model=model, input=batch, encoding_format="float")
            except openai.APIError as exc:
                raise EndpointError(scrub(
                    f"base_url={str(client.base_url)!r}, model={model!r}: /embeddings failed "
                    f"({type(exc).__name__}: {str(exc)[:300]}). Semantic dedup needs an endpoint that serves "
                    "embeddings for this model; point llm at one or set dedup.semantic to false.",
                    (client.api_key,))) from None
            data = sorted(resp.data, key=lambda d: d.index)  # rows carry their index; order is not promised
            if len(data) != len(batch):
                raise EndpointError(
                    f"base_url={str(client.base_url)!r}, model={model!r}: /embeddings returned {len(data)} "
                    f"vectors for {len(batch)} texts"
                )
            rows.extend(d.embedding for d in data)
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1) if rows else np.zeros((0, 0), np.float32)

    return embed


@task(cache_policy=CACHE, persist_result=True, **network_retries(LLMSettings()))
def dedup_task(pairs: list[QAPair], settings: DedupSettings, llm: LLMSettings | None = None) -> DedupResult:
    # An embedder is a function and cannot be a cached, JSON-able input, so the task builds it
    # from the llm settings; the key is read from llm.api_key_env (or a Secret block) here only.
    embed = None
    if settings.semantic:
        if llm is None:
            raise ValueError("dedup.semantic is true: pass the llm settings so dedup can call /v1/embeddings")
        embed = make_openai_embedder(make_client(llm), settings.embedding_model or llm.model)
    return dedup_pairs(pairs, settings, embed)
