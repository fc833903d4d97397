"""Greedy answers from a model loaded for them: the real offline base model."""

import pytest

from doctune.generation import generate_answers


@pytest.mark.slow
def test_generate_answers_with_the_real_base_model():
    from doctune.base_model import prepare_base_model

    questions = ["What is the capital of France?", "Name a primary colour."]
    replies = generate_answers(prepare_base_model(), questions, "You are a helpful assistant.",
                               max_new_tokens=16, batch_size=2)
    assert len(replies) == 2 and all(r.strip() for r in replies)
    assert "Paris" in replies[0]
    assert not any("<|im_end|>" in r or "<|im_start|>" in r for r in replies)
