"""LLM rewrites of the chunks (tasks/rewrite.py): the checks that keep a rewrite, the calls per chunk and style
against the scripted endpoint, and what a language the endpoint cannot write gets (nothing)."""

from __future__ import annotations

from doctune.records import Chunk
from doctune.settings import LLMSettings, RewriteSettings
from tasks.rewrite import check_rewrite, clean_rewrite, names, rewrite_chunks, rewrite_messages, values

TEXT = ("The Vindel lamp costs 1,349 crowns. The Vindel lamp is made of recycled oak. "
        "The Fjord kettle holds 1.7 litres and ships in 3 colours.")


def chunk(text: str = TEXT, language: str = "en", chunk_id: str = "c1") -> Chunk:
    return Chunk(doc_id="d1", chunk_id=chunk_id, path="products.md", index=0, start=0, end=len(text), title="Products",
                 heading_path=["Products", "Kitchen"], text=text, language=language, n_tokens=40)


def test_values_ignore_list_marks_and_thousands_separators_names_ignore_sentence_starts():
    assert values("1. The lamp costs 1,349 crowns.\n2) It holds 1.7 litres.\n- 3 colours") == {"1349", "1.7", "3"}
    assert names("Entities: Vindel lamp.\n- Fjord kettle\n1. Brekke. In the Lumenhall, the Vindel") == {"Lumenhall", "Vindel"}


def test_a_rewrite_is_kept_only_with_the_chunks_values_and_nothing_invented():
    settings = RewriteSettings(styles=["notes"])
    kept = ("- The Vindel lamp costs 1349 crowns.\n- The Vindel lamp is built from recycled oak.\n"
            "- The Fjord kettle has room for 1.7 litres of water.\n- The Fjord kettle comes in 3 colours.")
    assert check_rewrite(kept, chunk(), settings) is None
    reason, detail = check_rewrite(kept.replace("1.7", "1.9"), chunk(), settings)
    assert reason == "invented_value" and "1.9" in detail
    lost = ("- The Vindel lamp is affordable and built from recycled oak.\n- The Fjord kettle is a generous "
            "size and comes in 3 colours, a choice for every kitchen.")
    reason, detail = check_rewrite(lost, chunk(), settings)
    assert reason == "lost_values" and "kept 1 of the chunk's 3 values" in detail
    assert check_rewrite(lost, chunk(), RewriteSettings(min_value_share=0.3)) is None
    reason, detail = check_rewrite(kept.replace("The Fjord kettle has", "The Nordmark kettle has"), chunk(), settings)
    assert reason == "invented_name" and detail == "not in the chunk: Nordmark"
    zh = chunk("文德尔台灯售价1349克朗，由再生橡木制成，适合书房和卧室使用。", "zh")
    assert check_rewrite("- 文德尔台灯：价格是1349克朗。\n- 文德尔台灯：材料是再生橡木。", zh, settings) is None
    assert check_rewrite("- 文德尔台灯：价格是1500克朗。\n- 文德尔台灯：材料是再生橡木。", zh, settings)[0] == "invented_value"
    assert check_rewrite("I cannot help.", chunk(), settings)[0] == "too_short"
    assert check_rewrite(TEXT.replace("costs", "is"), chunk(), settings)[0] == "copies_source"


def test_a_preamble_and_a_fence_are_taken_off():
    assert clean_rewrite("Here are the notes:\n- The lamp costs 1,349 crowns.") == "- The lamp costs 1,349 crowns."
    assert clean_rewrite("```markdown\n- a\n- b\n```") == "- a\n- b"
    assert clean_rewrite("Sure: the lamp costs 1,349 crowns.") == "Sure: the lamp costs 1,349 crowns."


def test_the_prompt_asks_in_the_chunks_language_with_its_place():
    messages, version = rewrite_messages(chunk(), "relations")
    assert version.startswith("rewrite-") and "entities" in messages[0]["content"]
    assert messages[1]["content"].startswith("Products > Kitchen\n\n") and TEXT in messages[1]["content"]
    zh, _ = rewrite_messages(chunk("文德尔台灯售价1349克朗。", "zh"), "notes")
    assert "学习笔记" in zh[0]["content"]


def test_every_chunk_in_every_style_one_call_each_checked(scripted):
    llm = LLMSettings(base_url=scripted.base_url, model=scripted.model, concurrency=2)
    settings = RewriteSettings(styles=["notes", "relations", "paraphrase"])
    chunks = [chunk(), chunk("The Brekke garage has 40 spaces. Parking costs 12 crowns a day.", "en", "c2"), chunk("文德尔台灯售价1349克朗。", "zh", "c3")]
    result = rewrite_chunks(chunks, llm, settings, skip_languages=["zh"])
    assert result.calls == scripted.calls["rewrite"] == 6  # two chunks x three styles; Chinese is skipped
    kept = {(r["chunk_id"], r["kind"]) for r in result.rows}
    assert kept == {("c1", "rewrite:notes"), ("c2", "rewrite:notes")}
    dropped = {(d.record["chunk_id"], d.record["kind"]): d.reason for d in result.dropped}
    assert dropped == {("c1", "rewrite:relations"): "invented_value", ("c2", "rewrite:relations"): "invented_value",
                       ("c1", "rewrite:paraphrase"): "copies_source", ("c2", "rewrite:paraphrase"): "copies_source"}
    notes = next(r for r in result.rows if r["chunk_id"] == "c1")
    assert notes["text"].startswith("# Products > Kitchen\n\n- Products > Kitchen: The Vindel lamp costs 1,349 crowns.")
    assert notes["model"] == scripted.model and notes["language"] == "en"
    seeds = [r["seed"] for r in scripted.requests]
    assert len(set(seeds)) == 6  # one per chunk and style, the same on every run
    again = rewrite_chunks(chunks, llm, settings, skip_languages=["zh"])
    assert sorted(r["seed"] for r in scripted.requests[6:]) == sorted(seeds)
    assert again.rows == result.rows


def test_no_styles_no_calls(scripted):
    llm = LLMSettings(base_url=scripted.base_url, model=scripted.model)
    assert rewrite_chunks([chunk()], llm, RewriteSettings(), []).calls == 0 and not scripted.requests
