from doctune.records import QAPair
from doctune.settings import LLMSettings, TranslateSettings
from tasks.translate import looks_translated, translate_pairs


def test_pairs_get_a_translated_copy_and_keep_the_original(scripted):
    llm = LLMSettings(base_url=scripted.base_url, model=scripted.model, concurrency=2)
    pairs = [QAPair(question="How much does the X2 cost?", answer="The X2 costs 149 euros.", chunk_id="d:0",
                    path="a.md", doc_id="d"),
             QAPair(question="退货期限是多少天？", answer="退货期限为30天。", language="zh", source="faq")]
    result = translate_pairs(pairs, llm, TranslateSettings(enabled=True, target_language="zh"), progress=False)
    assert scripted.calls["translate"] == 2  # question and answer of the English pair; the Chinese one is skipped
    (new,) = result.pairs
    assert new.source == "translated" and new.language == "zh" and new.translated_from == pairs[0].pair_id
    assert new.question == "这是一个翻译后的句子：How much does the X2 cost?"
    assert new.chunk_id == "d:0" and new.path == "a.md"  # still linked to its source chunk
    assert new.prompt_version.startswith("translate-")


def test_untranslated_replies_are_dropped_with_a_reason():
    assert looks_translated("这是翻译：X2 多少钱？", "zh")
    assert not looks_translated("How much does the X2 cost?", "zh")
    assert not looks_translated("价格 is 149 euros", "en")
