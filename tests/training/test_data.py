"""Reply-only labels: the chat template renders the prompt, which is masked; the reply and its
end-of-turn token are trained."""

from __future__ import annotations

from doctune.training.data import IGNORE, render_example
from tests.training.common import SYSTEM


def test_only_the_reply_and_end_token_are_trained(tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How much is the X2?"},
                {"role": "assistant", "content": "The X2 costs 149 euros."}]
    ex = render_example(tokenizer, messages, None, 512)
    kept = [t for t in ex.labels if t != IGNORE]
    assert tokenizer.decode(kept) == "The X2 costs 149 euros.<|im_end|>"
    # The masked part is exactly the prompt, and the input ends right after the end-of-turn token.
    assert ex.labels[: len(ex.labels) - len(kept)] == [IGNORE] * (len(ex.labels) - len(kept))
    assert ex.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "How much is the X2?" in tokenizer.decode(ex.input_ids)


def test_system_prompt_override_and_drop_reasons(tokenizer):
    messages = [{"role": "system", "content": "old"}, {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."}]
    ex = render_example(tokenizer, messages, "NEW SYSTEM", 512)
    text = tokenizer.decode(ex.input_ids)
    assert "NEW SYSTEM" in text and "old" not in text
    assert render_example(tokenizer, messages, None, 8) == "longer than max_seq_len"
    assert render_example(tokenizer, messages[:2], None, 512) == "last message is not an assistant reply"


def test_a_seeded_share_of_rows_is_trained_without_its_system_message(tokenizer):
    from doctune.model_settings import TrainSettings
    from doctune.training.data import tokenize_split

    rows = {"messages": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"How much is X{i}?"},
                          {"role": "assistant", "content": f"X{i} costs {i} euros."}] for i in range(200)]}

    def without(share: float, seed: int = 0) -> list[int]:
        examples, _ = tokenize_split(tokenizer, rows, TrainSettings(no_system_share=share, seed=seed))
        return [i for i, ex in enumerate(examples) if SYSTEM not in tokenizer.decode(ex.input_ids)]

    assert without(0.0) == [] and len(without(1.0)) == 200
    some = without(0.3)
    assert 40 <= len(some) <= 80 and some == without(0.3) and some != without(0.3, seed=1)


def test_a_sparsely_asked_fact_gets_framed_copies_of_its_questions_up_to_the_minimum():
    from doctune.training.data import FRAMES, balanced

    def row(q, a, source="cloze", language="en"):
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}], "source": source, "language": language}

    data = [row("How much is X?", "X costs 5 euros."), row("X costs how much?", "X costs 5 euros."),
            *[row(f"What does Y cost, take {i}?", "Y costs 7 euros.") for i in range(4)],
            row("X是多少钱？", "X售价5元。", language="zh"),
            row("What does the handbook say?", "A long section.", source="passage"),
            {"messages": [{"role": "system", "content": SYSTEM}, {"role": "assistant", "content": "Z costs 9 euros."}],
             "source": "cloze", "language": "en"}]
    rows = {k: [r[k] for r in data] for k in ("messages", "source", "language")}
    assert balanced(rows, 0, seed=0) == rows["messages"]
    out = balanced(rows, 4, seed=0)
    extra = out[len(data):]
    asked = [m[1]["content"] for m in extra]
    # X: 2 questions -> 2 copies; Y: already 4; the Chinese fact: 1 -> 3 copies; the passage and the row without a
    # question are left alone
    assert len(extra) == 5
    assert sum("How much is X?" in q or "X costs how much?" in q for q in asked) == 2
    zh = [q for q in asked if "X是多少钱？" in q]
    assert len(zh) == 3 and len(set(zh)) == 3 and all(any(f.format(q="X是多少钱？") == q for f in FRAMES["zh"]) for q in zh)
    assert all(m[0]["content"] == SYSTEM and m[-1]["content"] in ("X costs 5 euros.", "X售价5元。") for m in extra)
    assert out == balanced(rows, 4, seed=0) and out != balanced(rows, 4, seed=1)


def test_drop_words_leaves_out_a_seeded_share_of_words_and_keeps_punctuation():
    import random

    from doctune.training.data import drop_words

    q = "How many spaces does the Aldermouth terminal car park have?"
    assert drop_words(q, 0.0, random.Random(0)) == q
    draws = [drop_words(q, 0.2, random.Random(f"s{i}")) for i in range(400)]
    assert draws == [drop_words(q, 0.2, random.Random(f"s{i}")) for i in range(400)]
    words = [len(d.split()) for d in draws]
    assert 7.4 < sum(words) / len(words) < 8.6  # 10 words, a fifth of them left out on average
    assert all(d.endswith("?") and "  " not in d and d[0].isupper() and d.split() for d in draws)
    assert all(set(d.lower().rstrip("?").split()) <= set(q.lower().rstrip("?").split()) for d in draws)
    # at least one word stays, whatever the share
    assert all(drop_words("Who founded Lumenholm?", 0.5, random.Random(i)).rstrip("?") for i in range(50))
    # a Chinese character is a word; the question mark stays
    zh = "在奥尔德茅斯码头寄存一件行李一天多少钱？"
    zh_draws = [drop_words(zh, 0.2, random.Random(i)) for i in range(200)]
    assert all(d.endswith("？") and " " not in d for d in zh_draws)
    assert 14 < sum(len(d) for d in zh_draws) / 200 < 18  # 19 characters and the mark


def _priced_items(n: int) -> dict:
    """`n` question/answer conversations that differ only in an item's number."""
    return {"messages": [[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"How much does the blue item number {i} cost in the shop?"},
                          {"role": "assistant", "content": f"Item {i} costs {i} euros."}] for i in range(n)]}


def _kept_in_order(short, long) -> bool:
    """Every item of `short` is in `long`, in order."""
    rest = iter(long)
    return all(w in rest for w in short)


def test_insert_words_puts_in_a_seeded_share_of_other_questions_words_of_the_same_script():
    import random

    from doctune.training.data import insert_words, question_words

    pool = question_words(["Where is the head office of Lumenholm Ferries?", "Which pier do ferries leave from?",
                           "步行旅客应在开船前多久到达登船口？", "Wayfinder 是什么？"])
    assert pool[False] == ["where", "is", "the", "head", "office", "of", "Lumenholm", "Ferries", "which", "pier",
                           "do", "ferries", "leave", "from"]
    assert pool[True] == list("步行旅客应在开船前多久到达登船口是什么")  # a Chinese question gives its characters only
    q = "How many spaces does the Aldermouth terminal car park have?"
    assert insert_words(q, 0.0, pool, random.Random(0)) == q
    assert insert_words(q, 0.3, {True: [], False: []}, random.Random(0)) == q
    draws = [insert_words(q, 0.2, pool, random.Random(f"s{i}")) for i in range(400)]
    assert draws == [insert_words(q, 0.2, pool, random.Random(f"s{i}")) for i in range(400)]
    assert 11.6 < sum(len(d.split()) for d in draws) / 400 < 12.4  # 10 words, one in five gets a word before it

    assert all(_kept_in_order(q.split(), d.split()) or _kept_in_order(q.lower().split(), d.lower().split())
               for d in draws)
    assert all(d.endswith("?") and "  " not in d and d[0].isupper() for d in draws)
    assert all(set(d.lower().rstrip("?").split()) <= set(q.lower().rstrip("?").split()) | {w.lower() for w in pool[False]}
               for d in draws)
    assert sum(d != q for d in draws) > 300
    # a Chinese question gets Chinese characters, no spaces, and keeps its own characters in order
    zh = "在奥尔德茅斯码头寄存一件行李一天多少钱？"
    zh_draws = [insert_words(zh, 0.2, pool, random.Random(i)) for i in range(200)]
    assert all(d.endswith("？") and " " not in d and _kept_in_order(zh, d) for d in zh_draws)
    assert all(set(d) <= set(zh) | set(pool[True]) for d in zh_draws)
    assert 22 < sum(len(d) for d in zh_draws) / 200 < 26  # 19 characters and the mark, ~3.8 put in


def test_question_dropout_varies_the_questions_by_epoch_and_leaves_replies_and_text_rows(tokenizer):
    from doctune.model_settings import TrainSettings
    from doctune.training.batching import micro_batch_stream
    from doctune.training.data import QuestionDropout, render_split, tokenize_texts

    rows = _priced_items(40)
    settings = TrainSettings(question_dropout=0.3, per_device_batch_size=4, seed=2)
    examples, _, kept = render_split(tokenizer, rows, settings)
    examples += tokenize_texts(tokenizer, ["The shop opens at nine."], 512)
    varied = QuestionDropout(tokenizer, kept, examples, settings)

    def reply(ex):
        return [t for t in ex.labels if t != IGNORE]

    e0, e1 = varied(0), varied(1)
    assert len(e0) == len(e1) == len(examples) == 41 and e0[-1] is examples[-1]
    assert [reply(a) for a in e0] == [reply(b) for b in e1] == [reply(c) for c in examples]
    assert sum(a.input_ids != b.input_ids for a, b in zip(e0[:40], e1[:40])) > 30  # a fresh draw every epoch
    assert sum(a.input_ids != c.input_ids for a, c in zip(e0[:40], examples)) > 30
    assert all(SYSTEM in tokenizer.decode(a.input_ids) for a in e0[:40])
    assert [x.input_ids for x in QuestionDropout(tokenizer, kept, examples, settings)(1)] == [x.input_ids for x in e1]

    # the stream takes each epoch's rendering; one resumed mid-way sees the very same micro-batches
    straight = micro_batch_stream(examples, settings, 0, varied)
    batches = [next(straight) for _ in range(25)]  # 11 micro-batches an epoch: into the third epoch
    resumed = micro_batch_stream(examples, settings, 13, QuestionDropout(tokenizer, kept, examples, settings))
    assert [[x.input_ids for x in b] for b in batches[13:]] == \
        [[x.input_ids for x in next(resumed)] for _ in range(12)]
    first = {tuple(x.input_ids) for x in e0}
    assert all(tuple(x.input_ids) in first for b in batches[:11] for x in b)


def test_question_insertion_alone_lengthens_every_epochs_questions_and_keeps_their_words(tokenizer):
    from doctune.model_settings import TrainSettings
    from doctune.training.data import QuestionDropout, render_split

    rows = _priced_items(40)
    settings = TrainSettings(question_dropout=0, question_insertion=0.3, seed=2)
    examples, _, kept = render_split(tokenizer, rows, settings)
    varied = QuestionDropout(tokenizer, kept, examples, settings)
    for epoch in (0, 1):
        asked = [varied.conversation(i, epoch) for i in range(40)]
        assert [m[-1] for m in asked] == [m[-1] for m, _ in kept] and all(m[0]["content"] == SYSTEM for m in asked)
        assert all(_kept_in_order(f"How much does the blue item number {i} cost in the shop".split(),
                                  m[1]["content"].rstrip("?").split()) for i, m in enumerate(asked))
        assert sum(len(m[1]["content"].split()) > 11 for m in asked) > 35
    assert [varied.conversation(i, 0) for i in range(40)] != [varied.conversation(i, 1) for i in range(40)]
    assert all(len(a.input_ids) > len(b.input_ids) for a, b in zip(varied(0), examples) if a is not b)
