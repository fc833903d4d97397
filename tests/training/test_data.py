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
            row("What does the handbook say?", "A long section.", source="passage")]
    rows = {k: [r[k] for r in data] for k in ("messages", "source", "language")}
    assert balanced(rows, 0, seed=0) == rows["messages"]
    out = balanced(rows, 4, seed=0)
    extra = out[len(data):]
    asked = [m[1]["content"] for m in extra]
    # X: 2 questions -> 2 copies; Y: already 4; the Chinese fact: 1 -> 3 copies; the passage is left alone
    assert len(extra) == 5
    assert sum("How much is X?" in q or "X costs how much?" in q for q in asked) == 2
    zh = [q for q in asked if "X是多少钱？" in q]
    assert len(zh) == 3 and len(set(zh)) == 3 and all(any(f.format(q="X是多少钱？") == q for f in FRAMES["zh"]) for q in zh)
    assert all(m[0]["content"] == SYSTEM and m[-1]["content"] in ("X costs 5 euros.", "X售价5元。") for m in extra)
    assert out == balanced(rows, 4, seed=0) and out != balanced(rows, 4, seed=1)
