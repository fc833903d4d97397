"""The dataset writer: held-out splits are paraphrases of facts still taught in training."""

from __future__ import annotations

import json

from datasets import load_from_disk

from doctune.records import QAPair
from doctune.settings import DatasetSettings
from tasks.dataset import held_out_split, write_dataset


def _row(question: str, answer: str, source: str = "synthesized") -> dict:
    return {"question": question, "answer": answer, "source": source}


def test_held_out_questions_are_paraphrases_of_trained_answers():
    rows = [_row(f"question {q} about fact {a}?", f"Fact {a} is true.") for a in range(10) for q in range(3)]
    rows += [_row(f"faq {i}?", f"FAQ answer {i}.", "faq") for i in range(5)]
    rows += [_row(f"general {i}?", f"General reply {i}.", "replay") for i in range(3)]
    rows += [_row(f"What does the handbook say about section {i}?", f"Section {i} text.", "passage") for i in range(9)]
    split = held_out_split(rows, test_size=0.1, validation_size=0.1, seed=1)

    # Shares are of the rows that may be held out: replay and passage rows stay in training.
    assert len(split["test"]) == len(split["validation"]) == round(0.1 * 35) == 4
    assert sorted(split["train"] + split["validation"] + split["test"]) == list(range(len(rows)))
    assert not set(split["test"]) & set(split["validation"])
    trained = {rows[i]["answer"] for i in split["train"]}
    for i in split["test"] + split["validation"]:
        assert rows[i]["source"] == "synthesized" and rows[i]["answer"] in trained
    assert all(rows[i]["source"] not in ("replay", "passage") for i in split["test"] + split["validation"])
    assert held_out_split(rows, 0.1, 0.1, seed=1) == split
    assert held_out_split(rows, 0.1, 0.1, seed=2) != split


def test_held_out_quota_filled_from_single_question_answers_when_paraphrases_run_out():
    rows = [_row("Why?", "Because A."), _row("How come?", "Because A.")]
    rows += [_row(f"faq {i}?", f"FAQ answer {i}.", "faq") for i in range(18)]
    split = held_out_split(rows, test_size=0.1, validation_size=0.1, seed=0)
    assert len(split["test"]) == len(split["validation"]) == 2
    held = split["test"] + split["validation"]
    # The one paraphrase group gives one question, and keeps the other for training.
    assert sum(rows[i]["answer"] == "Because A." for i in held) == 1


def test_no_held_out_split_when_sizes_are_zero():
    rows = [_row(f"q{i}?", "Same answer.") for i in range(12)]
    assert held_out_split(rows, 0, 0, seed=0) == {"train": list(range(12)), "validation": [], "test": []}


def test_written_dataset_has_three_splits_and_a_card(tmp_path):
    pairs = [QAPair(question=f"How is thing {a} described, take {q}?", answer=f"Thing {a} is blue.",
                    source="synthesized", language="en", path="doc.md") for a in range(8) for q in range(3)]
    out = write_dataset(pairs, [], {}, DatasetSettings(test_size=0.1, validation_size=0.1), tmp_path)
    ds = load_from_disk(str(out / "hf"))
    assert {name: len(ds[name]) for name in ds} == {"train": 20, "validation": 2, "test": 2}
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["train"], manifest["validation"], manifest["test"]) == (20, 2, 2)
    for split in ("train", "validation", "test"):
        assert len((out / f"{split}.messages.jsonl").read_text().splitlines()) == len(ds[split])
    assert "20 training, 2 validation and 2 test" in (out / "card.md").read_text()
