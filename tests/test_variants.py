"""Representation variants by rule: each fact restated under its document and section, a chunk's facts
in other orders (seeded), FAQ rows as passages; all as text-completion rows."""

from __future__ import annotations

from doctune.records import Chunk, QAPair
from tasks.variants import permuted, restated, variant_rows

FACTS = ["Tessarine employees receive 27 days of paid annual leave per year.",
         "New parents at Tessarine receive 16 weeks of fully paid parental leave.",
         "Sick leave at Tessarine needs a doctor's note after three days.",
         "Unused leave at Tessarine expires on 31 March of the next year."]
CHUNK = Chunk(chunk_id="h:3", doc_id="h", path="handbook.md", index=3, text="\n\n".join(FACTS),
              heading_path=["Tessarine Company Handbook", "Leave"], start=0, end=10, n_tokens=60,
              title="Tessarine Company Handbook")


def test_every_fact_is_restated_under_its_document_and_section():
    assert restated(CHUNK) == [f"Tessarine Company Handbook > Leave: {f}" for f in FACTS]
    zh = Chunk(chunk_id="z:0", doc_id="z", path="手册.md", index=0, text="特萨林深圳办事处共有员工37人。",
               heading_path=["办公室"], start=0, end=15, n_tokens=20, language="zh", title="员工手册")
    assert restated(zh) == ["员工手册 > 办公室：特萨林深圳办事处共有员工37人。"]


def test_permutations_are_other_orders_of_the_same_facts_drawn_with_the_seed():
    orders = permuted(CHUNK, 3, seed=42)
    assert len(orders) == 3 and len(set(orders)) == 3
    for text in orders:
        head, body = text.split("\n\n")
        assert head == "# Tessarine Company Handbook > Leave"
        assert sorted(s.rstrip(".") for s in body.split(". ")) == sorted(f.rstrip(".") for f in FACTS)
        assert body != " ".join(FACTS)  # never the document's own order
    assert permuted(CHUNK, 3, seed=42) == orders and permuted(CHUNK, 3, seed=7) != orders
    short = CHUNK.model_copy(update={"text": "\n\n".join(FACTS[:2])})
    assert permuted(short, 3, seed=42) == []  # two sentences: reordering teaches nothing new


def test_variant_rows_carry_their_kind_and_faq_rows_become_passages():
    faq = [QAPair(question="How long is the warranty?", answer="Two years from delivery.", source="faq",
                  path="faq.csv", language="en"),
           QAPair(question="Hi", answer="Hello", source="instruction", path="chat.jsonl", language="en")]
    rows = variant_rows([CHUNK], faq, permutations=2, seed=0)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["restated"] * 4 + ["permuted"] * 2 + ["faq"]
    assert rows[-1]["text"] == "How long is the warranty?\nTwo years from delivery." and rows[-1]["path"] == "faq.csv"
    assert all(r["chunk_id"] == "h:3" for r in rows[:-1])
