"""Passage pairs: a chunk's text, asked for by document and section, in English and Chinese."""

from __future__ import annotations

from doctune.records import Chunk
from tasks.passages import passage_pairs


def chunk(text, heading=("Staff Handbook", "Leave"), path="docs/handbook.md", title="Staff Handbook",
          language="en", index=0):
    return Chunk(chunk_id=f"{path}:{index}", doc_id=path, path=path, index=index, text=text,
                 heading_path=list(heading), start=0, end=len(text), n_tokens=len(text) // 4,
                 language=language, title=title)


LEAVE = "Every employee gets 27 days of annual leave.\nUnused days expire on 31 March."


def test_section_questions_name_document_and_section_and_answer_with_the_chunk_text():
    pairs = passage_pairs([chunk(LEAVE)], per_chunk=3)
    assert [p.question for p in pairs] == [
        "What does the Staff Handbook say about Leave?",
        'Summarise the "Leave" section of the Staff Handbook.',
        "Leave in the Staff Handbook: what does it say?",
    ]
    assert {p.answer for p in pairs} == {"Every employee gets 27 days of annual leave. Unused days expire on 31 March."}
    assert {(p.source, p.mode, p.chunk_id, p.path, p.prompt_version) for p in pairs} == {
        ("passage", "passage", "docs/handbook.md:0", "docs/handbook.md", "passage-1")}
    assert len({p.pair_id for p in pairs}) == 3


def test_a_chunk_without_sections_is_asked_for_by_its_title_or_file_name():
    pairs = passage_pairs([chunk("Kestrel K4: 8,950 euros.", heading=(), path="products/price_sheet_2025.pdf",
                                 title="")], per_chunk=1)
    assert [p.question for p in pairs] == ["What does the price sheet 2025 say?"]


def test_a_section_over_several_chunks_names_the_part_so_no_two_chunks_share_a_question():
    chunks = [chunk(LEAVE, index=0), chunk("Sick leave needs a note after 3 days.", index=1),
              chunk("Core hours run from 10:00 to 15:00.", heading=("Staff Handbook", "Working hours"), index=2)]
    pairs = passage_pairs(chunks, per_chunk=2)
    assert len(pairs) == 6 and len({p.question for p in pairs}) == 6
    assert pairs[0].question == "What does the Staff Handbook say about Leave, part 1?"
    assert pairs[2].question == "What does the Staff Handbook say about Leave, part 2?"
    assert pairs[4].question == "What does the Staff Handbook say about Working hours?"


def test_chinese_chunks_get_chinese_questions():
    text = "深圳办事处位于南山区科苑路88号。"
    pairs = passage_pairs([chunk(text, heading=("员工手册", "办公室"), title="员工手册", language="zh")], per_chunk=3)
    assert pairs[0].question == "《员工手册》中关于“办公室”的内容是什么？"
    assert all(p.language == "zh" and p.answer == text for p in pairs)


def test_zero_per_chunk_turns_passages_off():
    assert passage_pairs([chunk(LEAVE)], per_chunk=0) == []
