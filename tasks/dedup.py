"""Drop duplicate Q&A pairs while keeping paraphrases.

Synthesis writes several differently worded questions for the same answer on purpose, so the
model learns the fact rather than one wording. Dedup therefore removes only pairs whose
question is (nearly) the same text AND whose answer is the same or nearly the same:
- exact:    same question and answer after normalisation (NFKC, casefold, no punctuation,
            collapsed whitespace);
- near:     MinHash LSH over character n-grams of the question (characters, so Chinese needs
            no word segmentation), every candidate confirmed by the exact Jaccard of question
            and answer n-gram sets; n-grams are hashed in numpy and signed and banded by rensa
            (Rust), so a million pairs take seconds, not the minutes of per-pair Python objects;
- semantic: optional; question embeddings with cosine >= semantic_threshold, answers near-same.
A near-identical question with a clearly different answer is a different fact: both stay, and
so do pairs that mention different numbers (a price of 499 or 599 is one character apart).

The first occurrence wins and only kept pairs are ever a `duplicate_of`. The flow passes
human-written sources (faq, instruction) before synthesized ones, so those are the ones kept.
"""

from __future__ import annotations

import gc
import re
import unicodedata
import zlib
from typing import Callable

import numpy as np
import openai
import rensa
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
# The same set as a regex class and, for ASCII text, as bytes.translate's delete table: both run in
# C without a dict lookup per character: normalize() ~6x faster on English, ~1.7x on Chinese.
_PUNCT_RE = re.compile("[" + "".join(re.escape(chr(i)) for i in _PUNCT) + "]")
_ASCII_PUNCT = bytes(i for i in range(128) if i in _PUNCT)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Rows per block of the cosine matrix: 2048 x 2048 float32 is 16 MiB, whatever the input size.
_BLOCK = 2048
# (false positive, false negative) weights from which MinHashLSH picks bands and rows; see _near.
LSH_WEIGHTS = (0.05, 0.95)
# rensa signatures from a fixed seed: the same drops in every run and process.
_SEED = 1
_HASH_CHUNK = 65536  # texts per numpy pass in _ngram_hashes: temporaries stay near 50 MB
_FNV = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)


class DedupResult(BaseModel):
    kept: list[QAPair] = Field(default_factory=list)
    dropped: list[Dropped] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict, description="input, kept, and one count per reason.")


def normalize(text: str) -> str:
    """NFKC (full-width ？ becomes ?), casefold, punctuation removed, whitespace collapsed."""
    if text.isascii():  # NFKC leaves ASCII as it is, and casefold is lower there
        text = text.lower().encode().translate(None, _ASCII_PUNCT).decode()
    else:
        text = _PUNCT_RE.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.split())  # str.split and re's \s agree on what is whitespace


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
    # Paraphrases share their answer and copies their question: each text is normalised once.
    seen: dict[str, str] = {}
    for p in pairs:
        if (q := seen.get(p.question)) is None:
            q = seen[p.question] = normalize(p.question)
        if (a := seen.get(p.answer)) is None:
            a = seen[p.answer] = normalize(p.answer)
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
        if len(group) < 2:
            continue
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
    n = len(items.pairs)
    later, earlier = _lsh_candidates(items.questions, settings)
    q_shingles: dict[int, set[str]] = {}  # only for the few pairs LSH proposes

    def q_set(k: int) -> set[str]:
        if k not in q_shingles:
            q_shingles[k] = shingles(items.questions[k], settings.ngram)
        return q_shingles[k]

    kept = [True] * n
    bounds = np.flatnonzero(np.diff(later, prepend=-1, append=n)).tolist()
    later, earlier = later.tolist(), earlier.tolist()
    # Pairs come sorted by the later pair, so every earlier one is decided when it is compared,
    # and a pair is never the duplicate of a dropped one.
    for lo, hi in zip(bounds, bounds[1:]):
        i, best = later[lo], None
        for j in earlier[lo:hi]:
            if not kept[j]:
                continue
            q_sim = jaccard(q_set(i), q_set(j))
            if q_sim < t:
                continue
            a_sim = items.answer_match(i, j)
            if a_sim >= t and (best is None or (q_sim, -j) > (best[0], -best[2])):
                best = (q_sim, a_sim, j)
        if best is not None:
            kept[i] = False
            q_sim, a_sim, j = best
            dropped.append(_drop(items.pairs[i], "near_duplicate", items.pairs[j].pair_id,
                                 f"question jaccard≈{q_sim:.2f}, answer jaccard≈{a_sim:.2f}"))
    return items.subset([i for i in range(n) if kept[i]])


def _bands(threshold: float, num_perm: int) -> int:
    """The number of LSH bands with the least LSH_WEIGHTS-weighted error, as datasketch picks
    them, among those that divide num_perm: rensa cuts the signature into equal bands. At the
    defaults (0.85, 128) that is 16 bands of 8: ~99% of pairs at exactly the threshold share one."""
    s = np.linspace(0.0, 1.0, 2001)
    below = s < threshold

    def error(b: int) -> float:
        share = 1 - (1 - s ** (num_perm // b)) ** b  # chance that a pair of Jaccard s shares a band
        fp = np.trapezoid(np.where(below, share, 0), s)
        fn = np.trapezoid(np.where(below, 0, 1 - share), s)
        return LSH_WEIGHTS[0] * fp + LSH_WEIGHTS[1] * fn

    return min((b for b in range(1, num_perm + 1) if num_perm % b == 0), key=error)


def _ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint64 hash of every character n-gram of every text, rows back to back, and the row
    offsets; a text no longer than n is one n-gram, as in shingles(). Computed on code points in
    numpy, chunk by chunk to bound memory. A hash collision can only add a candidate, which the
    exact Jaccard then rejects."""
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    counts = np.maximum(lengths - n + 1, 1)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(offsets[-1], np.uint64)
    for c0 in range(0, len(texts), _HASH_CHUNK):
        c1 = min(c0 + _HASH_CHUNK, len(texts))
        lens, cnts = lengths[c0:c1], counts[c0:c1]
        # +1 so that the zero padding past the end differs from every character.
        cp = np.zeros(int(lens.sum()) + n, np.uint64)
        cp[:-n] = np.frombuffer("".join(texts[c0:c1]).encode("utf-32-le"), np.uint32)
        cp[:-n] += 1
        rows = offsets[c0:c1] - offsets[c0]
        pos = np.repeat(np.cumsum(lens) - lens - rows, cnts) + np.arange(int(cnts.sum()))
        # A short text must not read into the next one: mask its window past its own end.
        short = lens <= n
        window_len = np.repeat(np.where(short, lens, n), cnts)
        h = np.zeros(len(pos), np.uint64)
        for k in range(n):
            h ^= np.where(window_len > k, cp[pos + k], 0)
            h *= _FNV
        h ^= h >> np.uint64(29)  # mix the high bits down: rensa reads the low ones too
        h *= _MIX
        h ^= h >> np.uint64(32)
        out[offsets[c0] : offsets[c1]] = h
    return out, offsets


def _lsh_candidates(questions: list[str], settings: DedupSettings) -> tuple[np.ndarray, np.ndarray]:
    """(later, earlier) index pairs whose question signatures share an LSH band, sorted by later,
    then earlier. rensa signs every question from the hashed n-grams in one call and flags those
    that share a band with any other; only the flagged (duplicates and look-alikes, a small share)
    are signed again to find their partners, since rensa's index answers per sketch object."""
    empty = np.zeros(0, np.int64)
    if len(questions) < 2:
        return empty, empty
    hashes, offsets = _ngram_hashes(questions, settings.ngram)
    num_perm, bands = settings.num_perm, _bands(settings.near_threshold, settings.num_perm)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets.astype(np.uint64), num_perm, _SEED)
    lsh = rensa.RMinHashLSH(settings.near_threshold, num_perm, bands)
    flagged = np.flatnonzero(np.fromiter(lsh.insert_matrix_and_query_duplicate_flags(matrix), bool, len(questions)))
    if len(flagged) < 2:
        return empty, empty
    counts = np.diff(offsets)[flagged]
    sub_offsets = np.zeros(len(flagged) + 1, np.int64)
    np.cumsum(counts, out=sub_offsets[1:])
    tokens = hashes[np.repeat(offsets[flagged] - sub_offsets[:-1], counts) + np.arange(sub_offsets[-1])]
    del matrix, lsh, hashes  # the index alone is ~1 GB at a million questions
    # Signed again in slices: to_rows makes one Python int per slot, 5 GB for all at once.
    signatures = np.empty((len(flagged), num_perm), np.uint64)
    for r0 in range(0, len(flagged), _HASH_CHUNK):
        r1 = min(r0 + _HASH_CHUNK, len(flagged))
        part = tokens[sub_offsets[r0] : sub_offsets[r1]]
        sub = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            part, (sub_offsets[r0 : r1 + 1] - sub_offsets[r0]).astype(np.uint64), num_perm, _SEED)
        signatures[r0:r1] = np.array(sub.to_rows(), dtype=np.uint64)
    rows = num_perm // bands
    mult = np.random.default_rng(_SEED).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    codes = []
    for b in range(bands):
        key = (signatures[:, b * rows : (b + 1) * rows] * mult).sum(axis=1)
        order = np.argsort(key, kind="stable")  # stable: within a bucket, rows stay in input order
        sorted_key = key[order]
        new_bucket = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
        first = np.flatnonzero(new_bucket)[np.cumsum(new_bucket) - 1]  # where each row's bucket starts
        n_before = np.arange(len(order)) - first  # earlier rows in the same bucket
        total = int(n_before.sum())
        if total == 0:
            continue
        step = np.arange(total) - np.repeat(np.cumsum(n_before) - n_before, n_before)
        later = order[np.repeat(np.arange(len(order)), n_before)]
        earlier = order[np.repeat(first, n_before) + step]
        codes.append(later * len(flagged) + earlier)
    if not codes:
        return empty, empty
    code = np.unique(np.concatenate(codes))
    return flagged[code // len(flagged)], flagged[code % len(flagged)]


def _near_datasketch(items: _Pairs, settings: DedupSettings, dropped: list[Dropped]) -> _Pairs:
    """The near-duplicate stage before rensa, kept as the reference the tests compare _near with:
    one Python MinHash per question and a sequential datasketch index of the kept ones."""
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
    # The stages allocate millions of short-lived strings and tuples, and no cycles; with the
    # collector on, each full collection walks every input pair again: at a million pairs the
    # exact stage took 27 s instead of 10 s, the near stage 82 s instead of 31 s.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        items = _exact(pairs, settings.ngram, dropped)
        items = _conflicts(items, settings, dropped)
        items = _near(items, settings, dropped)
        if settings.semantic:
            items = _semantic(items, settings, embed, dropped)
    finally:
        if gc_was_enabled:
            gc.enable()
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
