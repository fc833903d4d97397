from doctune.settings import LLMSettings
from tasks.replay import looping, replay_pairs


def test_replay_answers_every_shipped_prompt_of_the_languages(scripted):
    llm = LLMSettings(base_url=scripted.base_url, model=scripted.model, concurrency=4)
    result = replay_pairs(llm, ["en", "zh"])
    assert result.calls == scripted.calls["other"] == 25
    assert len(result.pairs) == 25 and {p.language for p in result.pairs} == {"en", "zh"}
    assert all(p.source == "replay" and p.answer == "Hello." for p in result.pairs)


def test_looping_answers_are_detected():
    assert looping("The answer is the answer is the answer is " * 6)
    assert not looping("Boil water, put the egg in for nine minutes, then cool it in cold water and peel it.")
