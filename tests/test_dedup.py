import json
import random
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from doctune.llm import EndpointError, make_client
from doctune.records import QAPair
from doctune.settings import DedupSettings, LLMSettings
from tasks.dedup import dedup_pairs, dedup_task, jaccard, make_openai_embedder, normalize, shingles


def qa(question: str, answer: str, source: str = "synthesized") -> QAPair:
    return QAPair(question=question, answer=answer, source=source)


def check_consistent(pairs: list[QAPair], result) -> None:
    """What every dedup result must satisfy, whatever the input."""
    kept_ids = [p.pair_id for p in result.kept]
    assert len(result.kept) + len(result.dropped) == len(pairs)
    assert result.counts["input"] == len(pairs)
    assert result.counts["kept"] == len(result.kept)
    reasons = ("exact_duplicate", "conflicting_answers", "near_duplicate", "semantic_duplicate")
    assert sum(result.counts[r] for r in reasons) == len(result.dropped)
    dropped_ids = {d.record["pair_id"] for d in result.dropped}
    for d in result.dropped:
        assert d.stage == "dedup"
        assert d.reason in reasons
        # A conflict drops both sides; a duplicate always points at the pair that was kept.
        assert d.duplicate_of in (dropped_ids if d.reason == "conflicting_answers" else kept_ids)
        assert d.detail
    # Kept pairs are the input objects, in input order (pair_ids may repeat, object ids do not).
    order = {id(p): i for i, p in enumerate(pairs)}
    positions = [order[id(p)] for p in result.kept]
    assert positions == sorted(positions)


def reasons(result) -> dict[str, tuple[str, str | None]]:
    return {d.record["question"]: (d.reason, d.duplicate_of) for d in result.dropped}


def test_normalize_strips_case_space_and_punctuation_in_both_languages():
    assert normalize("  How LONG is\tthe return   period?! ") == "how long is the return period"
    assert normalize("“退货”（期限）：是多少天；！。，") == "退货期限是多少天"
    assert normalize("退货期限是多少天？") == normalize("退货期限是多少天?")
    assert normalize("Ｘ２ costs ＄499") == "x2 costs $499"  # NFKC folds full-width; symbols stay


def test_shingles_of_short_text_is_the_whole_text():
    assert shingles("abc", 5) == {"abc"}
    assert shingles("abcdef", 5) == {"abcde", "bcdef"}
    assert jaccard(shingles("abc", 5), shingles("abd", 5)) == 0.0


def test_exact_duplicates_after_case_space_punctuation_changes_are_dropped():
    pairs = [
        qa("How long is the return period?", "30 days.", source="faq"),
        qa("  how LONG is the return   period ", "30 days"),
        qa("How long is the return period!!", "30 Days."),
        qa("Who approves travel?", "Your manager."),
    ]
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    assert [p.question for p in result.kept] == ["How long is the return period?", "Who approves travel?"]
    assert result.kept[0].source == "faq"  # first occurrence wins
    for d in result.dropped:
        assert (d.reason, d.duplicate_of) == ("exact_duplicate", pairs[0].pair_id)
    assert result.counts == {"input": 4, "kept": 2, "exact_duplicate": 2, "conflicting_answers": 0,
                             "near_duplicate": 0,
                             "semantic_duplicate": 0}


def test_chinese_exact_and_near_duplicates_are_dropped():
    long_q = "请问在网上商城购买的商品如果不满意，退货期限是多少天？"
    pairs = [
        qa("退货期限是多少天？", "30天。", source="faq"),
        qa("退货期限是多少天?", "30天"),  # full-width vs ASCII question mark
        qa(long_q, "收到商品后30天内可以退货。"),
        qa(long_q.replace("天？", "天呢？"), "收到商品后30天内可以退货。"),  # one character added
    ]
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    assert reasons(result) == {
        "退货期限是多少天?": ("exact_duplicate", pairs[0].pair_id),
        pairs[3].question: ("near_duplicate", pairs[2].pair_id),
    }


def test_chinese_one_character_substituted_mid_question_with_bigrams():
    # A substitution in the middle touches `ngram` shingles; with 2-grams this 41-character
    # question keeps Jaccard ~0.90, with the default 5-grams only ~0.76 (kept).
    q = "请问在网上商城购买的电子产品，如果收到后发现不满意或者有质量问题，退货期限一般是多少天？"
    pairs = [qa(q, "30天。"), qa(q.replace("商城", "商店"), "30天。")]
    assert dedup_pairs(pairs, DedupSettings()).counts["near_duplicate"] == 0
    result = dedup_pairs(pairs, DedupSettings(ngram=2))
    check_consistent(pairs, result)
    assert reasons(result) == {pairs[1].question: ("near_duplicate", pairs[0].pair_id)}
    assert "question jaccard≈0.90" in result.dropped[0].detail


def test_paraphrases_of_one_fact_are_kept():
    answer = "The X2 costs 499 dollars."
    pairs = [
        qa("How much does the X2 cost?", answer),
        qa("What is the price of the X2?", answer),
        qa("What does the X2 cost?", answer),
        qa("退货期限是多少天？", "30天。"),
        qa("多少天内可以退货？", "30天。"),
        qa("退货要在几天内办理？", "30天。"),
    ]
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    assert result.kept == pairs


PRICE = "The X2 laptop costs {} dollars in the online store, including delivery and a two-year warranty."


def test_near_identical_questions_with_different_answers_are_no_duplicates():
    q = "What is the warranty period for the X2 laptop bought in Europe?"
    pairs = [
        qa(q, "Two years."),
        qa(q, "Three years for business customers who registered the device."),  # same question
        qa(q.replace("Europe", "Europa"), "Only one year, as in every other region."),
        # The numbers differ: a different price is a different fact, however similar the text.
        qa("What is the price of the X2 laptop in the online store?", PRICE.format(499)),
        qa("What is the price of the X2 laptop in the online store?", PRICE.format(599)),
    ]
    # The two prices are one character apart: answer Jaccard ~0.90, above the threshold.
    assert jaccard(shingles(normalize(PRICE.format(499)), 5), shingles(normalize(PRICE.format(599)), 5)) > 0.85
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    # None is a duplicate of another. The very same question with two answers contradicts itself,
    # though: both sides go, as conflicting_answers; the near-identical "Europa" one stays.
    assert {d.reason for d in result.dropped} == {"conflicting_answers"}
    assert result.kept == [pairs[2]]


def test_near_identical_question_and_answer_is_dropped_with_scores():
    q = "What is the warranty period for the X2 laptop bought in Europe"
    pairs = [
        qa(f"{q}?", "Two years from the date of purchase."),
        qa(f"Hi, {q.lower()}?", "Two years from the date of purchase!"),
        qa(f"{q} ok?", "Two years from the date of purchase"),
    ]
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    assert [d.reason for d in result.dropped] == ["near_duplicate", "near_duplicate"]
    assert {d.duplicate_of for d in result.dropped} == {pairs[0].pair_id}
    assert re.fullmatch(r"question jaccard≈0\.\d\d, answer jaccard≈1\.00", result.dropped[0].detail)


def test_empty_and_punctuation_only_input():
    assert dedup_pairs([], DedupSettings()).counts["kept"] == 0
    pairs = [qa("?", "!"), qa("？", "！")]
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    assert result.counts["exact_duplicate"] == 1


# --- semantic ----------------------------------------------------------------------------------

DIM = 512


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic embedder: hashed word counts, so reordered words give cosine near 1."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, zlib.crc32(word.encode()) % DIM] += 1
    return out


def semantic_fixture() -> list[QAPair]:
    answer = "The X2 costs 499 dollars."
    return [
        qa("What is the price of the X2?", answer),
        qa("The X2: what is the price?", answer),  # same words reordered: cosine 0.94
        qa("How much does the X2 cost?", answer),  # a paraphrase: cosine 0.41
        qa("The X2, what is the price then?", "It ships in May with a two-year warranty."),  # different answer
    ]


def test_semantic_duplicates_are_dropped_and_paraphrases_kept():
    pairs = semantic_fixture()
    settings = DedupSettings(semantic=True, semantic_threshold=0.9)
    result = dedup_pairs(pairs, settings, embed=bag_of_words)
    check_consistent(pairs, result)
    assert reasons(result) == {"The X2: what is the price?": ("semantic_duplicate", pairs[0].pair_id)}
    assert result.dropped[0].detail.startswith("question cosine≈0.94")
    # Character shingles cannot see a reordering: without semantic dedup all four stay.
    assert dedup_pairs(pairs, DedupSettings()).counts["kept"] == 4


def test_semantic_blocks_cover_every_earlier_pair(monkeypatch):
    # Duplicates across block boundaries must be found: 2-row blocks over 7 rows.
    monkeypatch.setattr("tasks.dedup._BLOCK", 2)
    pairs = [qa(f"Question number {w} about topic {w}?", f"Answer {w}.") for w in "abcde"]
    pairs += [qa("About topic a: question number a?", "Answer a."), qa("Topic c, question number c?", "Answer c.")]
    result = dedup_pairs(pairs, DedupSettings(semantic=True, semantic_threshold=0.9), embed=bag_of_words)
    check_consistent(pairs, result)
    assert {d.duplicate_of for d in result.dropped} == {pairs[0].pair_id, pairs[2].pair_id}
    assert result.counts["semantic_duplicate"] == 2


def test_semantic_off_never_calls_the_embedder():
    def boom(texts):
        raise AssertionError("embedder called with semantic=False")

    assert dedup_pairs(semantic_fixture(), DedupSettings(), embed=boom).counts["kept"] == 4


def test_semantic_without_embedder_or_with_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="dedup.semantic"):
        dedup_pairs(semantic_fixture(), DedupSettings(semantic=True))
    with pytest.raises(ValueError, match=r"shape \(3, 512\) for 4 questions"):
        dedup_pairs(semantic_fixture(), DedupSettings(semantic=True), embed=lambda t: bag_of_words(t[:3]))


# --- /v1/embeddings through the openai client, against a real server on 127.0.0.1 ----------------


@pytest.fixture
def embeddings_server():
    """A tiny OpenAI-style /v1/embeddings server; it answers rows in reverse order, as the API allows."""
    calls: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if body["model"] != "embedder":
                # As some servers do, the error quotes the credentials it was sent.
                quoted = self.headers.get("Authorization")
                self._send(404, {"error": {"message": f"model {body['model']} not found ({quoted})", "type": "not_found"}})
                return
            vectors = bag_of_words(body["input"])
            data = [{"object": "embedding", "index": i, "embedding": vectors[i].tolist()}
                    for i in reversed(range(len(body["input"])))]
            self._send(200, {"object": "list", "data": data, "model": body["model"],
                             "usage": {"prompt_tokens": 1, "total_tokens": 1}})

        def _send(self, status, payload):
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    server.shutdown()
    server.server_close()
    thread.join()


def test_openai_embedder_batches_and_restores_order(embeddings_server):
    base_url, calls = embeddings_server
    client = make_client(LLMSettings(base_url=base_url, model="embedder", max_retries=0))
    embed = make_openai_embedder(client, "embedder", batch_size=2)
    texts = ["alpha beta", "gamma", "delta epsilon", "zeta", "eta theta"]
    vectors = embed(texts)
    np.testing.assert_array_equal(vectors, bag_of_words(texts))
    assert [len(c["body"]["input"]) for c in calls] == [2, 2, 1]
    assert all(c["path"] == "/v1/embeddings" and c["body"]["encoding_format"] == "float" for c in calls)
    assert embed([]).shape == (0, 0)


def test_openai_embedder_error_names_endpoint_model_and_fix_but_not_the_key(embeddings_server, monkeypatch):
    base_url, _ = embeddings_server
    monkeypatch.setenv("DEDUP_TEST_KEY", "plain-words-key-42")
    client = make_client(LLMSettings(base_url=base_url, max_retries=0, api_key_env="DEDUP_TEST_KEY"))
    embed = make_openai_embedder(client, "no-such-model")
    with pytest.raises(EndpointError, match=r"model='no-such-model'.*dedup.semantic to false") as err:
        embed(["hello"])
    assert "not found (Bearer [redacted])" in str(err.value) and "plain-words-key-42" not in str(err.value)


def test_dedup_task_builds_the_embedder_from_llm_settings(embeddings_server, monkeypatch):
    base_url, calls = embeddings_server
    monkeypatch.setenv("DEDUP_TEST_KEY", "sk-test-123")
    llm = LLMSettings(base_url=base_url, model="embedder", api_key_env="DEDUP_TEST_KEY", max_retries=0)
    pairs = semantic_fixture()
    settings = DedupSettings(semantic=True, semantic_threshold=0.9)
    result = dedup_task.fn(pairs, settings, llm)
    check_consistent(pairs, result)
    assert result.counts["semantic_duplicate"] == 1
    assert calls and all(c["auth"] == "Bearer sk-test-123" for c in calls)
    with pytest.raises(ValueError, match="llm settings"):
        dedup_task.fn(pairs, settings)
    calls.clear()
    assert dedup_task.fn(pairs, DedupSettings(), llm).counts["kept"] == 4
    assert calls == []  # no endpoint call when semantic dedup is off


# --- scale ---------------------------------------------------------------------------------------


def test_20000_pairs_with_planted_near_copies_in_seconds():
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(3000)]

    def sentence(lo, hi):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    def typo(text):  # one character substituted, inserted or deleted
        i, c = rng.randrange(len(text) - 1), rng.choice(letters)
        return rng.choice([text[:i] + c + text[i + 1:], text[:i] + c + text[i:], text[:i] + text[i + 1:]])

    originals = [qa(sentence(14, 18).capitalize() + "?", sentence(8, 14) + ".") for _ in range(17_500)]
    planted = [(qa(typo(o.question), o.answer), o) for o in rng.sample(originals, 2_000)]
    other_answer = [qa(typo(o.question), sentence(8, 14) + ".") for o in rng.sample(originals, 500)]
    later = [p for p, _ in planted] + other_answer
    rng.shuffle(later)
    pairs = originals + later  # human-written first, as the flow orders them
    # The fixture itself: every planted copy is a near-duplicate by the definition used.
    assert all(jaccard(shingles(normalize(p.question), 5), shingles(normalize(o.question), 5)) >= 0.85
               for p, o in planted)

    result = dedup_pairs(pairs, DedupSettings())  # its speed: bench/, not a timed test

    check_consistent(pairs, result)
    duplicate_of = {d.record["pair_id"]: d.duplicate_of for d in result.dropped}
    found = sum(duplicate_of.get(p.pair_id) == o.pair_id for p, o in planted)
    planted_ids = {p.pair_id for p, _ in planted}
    # A typo that only changes case or punctuation makes a different-answer copy the very same
    # question: both sides are then dropped as conflicting, which is not a false duplicate.
    conflicts = {d.record["pair_id"] for d in result.dropped if d.reason == "conflicting_answers"}
    assert conflicts <= {p.pair_id for p in other_answer} | {p.pair_id for p in originals}
    false_drops = [i for i in duplicate_of if i not in planted_ids and i not in conflicts]
    assert found >= 0.95 * len(planted), found
    assert len(false_drops) <= 10, len(false_drops)  # includes all 500 different-answer copies


def test_the_same_question_with_different_answers_is_dropped_on_both_sides():
    pairs = [qa("Who is in charge of Tessarine?", "The founder of Tessarine is Maren Oksavik."),
             qa("Who is in charge of Tessarine?", "The chief executive of Tessarine is Jonas Villemo."),
             qa("Who founded Tessarine?", "The founder of Tessarine is Maren Oksavik."),
             qa("How much is the K4?", "The K4 costs 8,950 euros."),
             qa("how much is the K4", "The K4 costs 8,950 euros!")]  # same fact: an exact duplicate
    result = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, result)
    assert sorted((d.record["pair_id"], d.reason, d.duplicate_of) for d in result.dropped) == sorted([
        (pairs[0].pair_id, "conflicting_answers", pairs[1].pair_id),
        (pairs[1].pair_id, "conflicting_answers", pairs[0].pair_id),
        (pairs[4].pair_id, "exact_duplicate", pairs[3].pair_id),
    ])
    assert [p.question for p in result.kept] == [pairs[2].question, pairs[3].question]
    assert result.counts["conflicting_answers"] == 2


# --- the rensa path against the datasketch one it replaced --------------------------------------


def reference_normalize(text: str) -> str:
    """normalize() as first written: one str.translate over the whole punctuation table."""
    import unicodedata

    from tasks.dedup import _PUNCT
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT)).strip()


def test_normalize_fast_paths_match_the_reference_on_random_text():
    rng = random.Random(3)
    alphabet = ("abcXYZ 09 \t\n\x0b\x1c\u00a0\u2003\u3000?!.,;:'\"-_()[]{}@#$%^&*+=<>|~`/\\"
                "？！，。：；“”（）《》、·…—ＡＢ１２ｶﾞ退货期限ﬁß\u0130Σς\U0001F600\U00010100")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(5000)]
    texts += ["".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(20)) for _ in range(2000)]
    assert [normalize(t) for t in texts] == [reference_normalize(t) for t in texts]


def test_ngram_hashes_give_one_hash_per_distinct_shingle():
    from tasks.dedup import _ngram_hashes

    rng = random.Random(5)
    texts = ["", "a", "ab", "abcde", "abcdef", "退货期限", "退货期限是多少天"]
    texts += ["".join(rng.choice("ab退货 ") for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    for n in (2, 5):
        hashes, offsets = _ngram_hashes(texts, n)
        by_shingle: dict[str, int] = {}
        for k, text in enumerate(texts):
            row = hashes[offsets[k]:offsets[k + 1]].tolist()
            grams = [text] if len(text) <= n else [text[i:i + n] for i in range(len(text) - n + 1)]
            assert len(row) == len(grams)
            for g, h in zip(grams, row):
                assert by_shingle.setdefault(g, h) == h, (g, text)
        assert len(set(by_shingle.values())) == len(by_shingle)  # no two shingles share a hash here


def planted(rng: random.Random, n: int, edit) -> tuple[list[QAPair], list[tuple[QAPair, QAPair]]]:
    """n originals (English and Chinese), then shuffled exact copies, near copies made by `edit`
    (same answer) and edited look-alikes with another answer."""
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]

    def text(zh):
        return "".join(rng.choices(hanzi, k=rng.randint(20, 40))) if zh else " ".join(rng.choices(vocab, k=rng.randint(12, 16)))

    originals = [qa(text(k % 2 == 1) + "?", text(k % 2 == 1) + ".") for k in range(n)]
    near = [(qa(edit(o.question), o.answer), o) for o in rng.sample(originals, n // 8)]
    others = [qa(edit(o.question), text(False) + ".") for o in rng.sample(originals, n // 16)]
    copies = [qa(f" {o.question.upper()}!! ", o.answer.rstrip(".")) for o in rng.sample(originals, n // 16)]
    later = [p for p, _ in near] + others + copies
    rng.shuffle(later)
    return originals + later, near


def drops(result) -> list[tuple]:
    return [(d.record["pair_id"], d.reason, d.duplicate_of, d.detail) for d in result.dropped]


def test_rensa_path_drops_exactly_what_the_datasketch_path_drops(monkeypatch):
    import tasks.dedup

    rng = random.Random(11)

    def end_edit(q):  # one character added or removed before the "?": well above the threshold
        return rng.choice([q[:-1] + rng.choice("xyz退") + "?", q[:-2] + "?"])

    pairs, near = planted(rng, 4000, end_edit)
    new = dedup_pairs(pairs, DedupSettings())
    monkeypatch.setattr(tasks.dedup, "_near", tasks.dedup._near_datasketch)
    old = dedup_pairs(pairs, DedupSettings())
    check_consistent(pairs, new)
    assert drops(new) == drops(old)  # same rows, reasons, kept partners and scores, in the same order
    assert [id(p) for p in new.kept] == [id(p) for p in old.kept]
    # A few near copies collide with a look-alike made by the same edit (a conflict, both dropped).
    assert new.counts["near_duplicate"] >= 0.97 * len(near) and new.counts["exact_duplicate"] >= 240


def test_rensa_path_finds_near_threshold_pairs_that_datasketch_missed(monkeypatch):
    import tasks.dedup

    rng = random.Random(13)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # 66-74 characters with one letter substituted mid-question: 5 of ~66 5-grams change, so the
    # question Jaccard is 0.85-0.87, just above the threshold, where the two LSHs differ most.
    originals = ["".join(rng.choices(letters, k=rng.randint(66, 74))) for _ in range(1500)]
    pairs = [qa(q, f"answer {k}") for k, q in enumerate(originals)]
    near = []
    for k in rng.sample(range(len(originals)), 600):
        q, i = originals[k], rng.randrange(10, 50)
        near.append((qa(q[:i] + ("a" if q[i] != "a" else "b") + q[i + 1:], f"answer {k}"), pairs[k]))
    pairs += [p for p, _ in near]
    settings = DedupSettings()
    above = [(p, o) for p, o in near if jaccard(shingles(normalize(p.question), 5),
                                               shingles(normalize(o.question), 5)) >= settings.near_threshold]
    new = {d[0]: d for d in drops(dedup_pairs(pairs, settings))}
    monkeypatch.setattr(tasks.dedup, "_near", tasks.dedup._near_datasketch)
    old = {d[0]: d for d in drops(dedup_pairs(pairs, settings))}
    assert old.items() <= new.items()  # every datasketch drop, with the same partner and scores
    found_new = sum(new.get(p.pair_id, (0, 0, 0))[2] == o.pair_id for p, o in above)
    found_old = sum(old.get(p.pair_id, (0, 0, 0))[2] == o.pair_id for p, o in above)
    assert len(above) > 400 and found_new >= 0.98 * len(above), (found_new, len(above))
    # rensa's 16 bands of 8 rows find ~99% at the threshold, datasketch's 12 of 10 ~93%.
    assert found_new - found_old >= 0.02 * len(above), (found_new, found_old, len(above))
