"""The dataset writer: held-out splits are paraphrases of facts still taught in training, and the
files other trainers read (LLaMA-Factory's dataset_info.json, OpenAI fine-tuning JSONL) load in them."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import load_dataset, load_from_disk

from doctune.records import QAPair
from doctune.settings import DatasetSettings
from tasks.dataset import held_out_split, write_dataset

LLAMAFACTORY = Path(__file__).resolve().parents[1] / ".venv" / "extras" / "llamafactory"


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


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """24 pairs (20/2/2 split); one pair brings its own system prompt and one has non-ASCII text."""
    pairs = [QAPair(question=f"How is thing {a} described, take {q}?", answer=f"Thing {a} is blue.",
                    source="synthesized", language="en", path="doc.md") for a in range(8) for q in range(3)]
    pairs[0] = pairs[0].model_copy(update={"system": "Answer in one sentence."})
    pairs[1] = pairs[1].model_copy(update={"question": "Hvor står «ting 0» beskrevet?"})
    return write_dataset(pairs, [], {}, DatasetSettings(test_size=0.1, validation_size=0.1),
                         tmp_path_factory.mktemp("out"))


def test_openai_files_hold_only_messages_for_train_and_validation(dataset):
    for split in ("train", "validation"):
        rows = _read(dataset / f"{split}.openai.jsonl")
        assert rows and all(list(row) == ["messages"] for row in rows)
        assert [r["messages"] for r in rows] == [r["messages"] for r in _read(dataset / f"{split}.messages.jsonl")]
    assert not (dataset / "test.openai.jsonl").exists()
    card = (dataset / "card.md").read_text()
    assert "dataset_info.json" in card and "<split>.openai.jsonl" in card


def test_dataset_info_maps_columns_and_roles_every_row_has(dataset):
    info = json.loads((dataset / "dataset_info.json").read_text())
    assert set(info) == {f"doctune_{s}_{f}" for s in ("train", "validation", "test") for f in ("messages", "alpaca")}
    for name, entry in info.items():
        rows = _read(dataset / entry["file_name"])
        assert rows, f"{name}: {entry['file_name']} is empty"
        for row in rows:
            assert set(entry["columns"].values()) <= set(row), f"{name}: {row}"
        if entry["formatting"] == "alpaca":
            continue
        assert entry["formatting"] == "sharegpt"
        tags = entry["tags"]
        for row in rows:
            messages = row[entry["columns"]["messages"]]
            assert all(set(m) == {tags["role_tag"], tags["content_tag"]} for m in messages)
            # sharegpt wants the system turn first, then user and assistant turns alternating.
            assert [m[tags["role_tag"]] for m in messages] == [tags["system_tag"], tags["user_tag"],
                                                                tags["assistant_tag"]]


def test_empty_splits_get_no_entry_and_no_openai_file(tmp_path):
    pairs = [QAPair(question=f"What is item {i}?", answer=f"Item {i}.", source="synthesized") for i in range(4)]
    out = write_dataset(pairs, [], {}, DatasetSettings(), tmp_path)
    assert set(json.loads((out / "dataset_info.json").read_text())) == {"doctune_train_messages",
                                                                       "doctune_train_alpaca"}
    assert [p.name for p in sorted(out.glob("*.openai.jsonl"))] == ["train.openai.jsonl"]


def test_a_dataset_without_held_out_rows_loads_for_training_and_evaluation(tmp_path):
    """Fewer than 10 rows (or nothing but passage/cloze/replay rows) leave validation and test
    empty: training and evaluation must still read the folder (datasets cannot load an empty split)."""
    from doctune.runs import dataset_system_prompt
    from tasks.evaluate import load_test_split
    from doctune.training.data import load_train_split, load_validation

    pairs = [QAPair(question=f"What is item {i}?", answer=f"Item {i}.", source="synthesized") for i in range(4)]
    out = write_dataset(pairs, [], {}, DatasetSettings(system_prompt="S"), tmp_path)
    assert len(load_train_split(out)) == 4
    assert load_validation(out, 10) == [] and load_test_split(out, 10) == []
    assert dataset_system_prompt(out) == "S"
    assert (out / "test.messages.jsonl").read_text() == ""


@pytest.fixture
def llamafactory(monkeypatch):
    """LLaMA-Factory's own parser, converter and DataArguments, from the copy `make install` puts in
    .venv/extras/llamafactory (outside our venv, so its pins never touch ours). The `llamafactory.data`
    and `llamafactory.hparams` package __init__ files import the whole trainer, down to torchaudio for
    multimodal templates; parser.py, converter.py and data_args.py themselves need only what doctune
    installs already (torch, transformers, peft, datasets). So those two packages are registered without running their
    __init__, and the three modules run unchanged."""
    if not (LLAMAFACTORY / "llamafactory" / "data" / "converter.py").exists():
        pytest.skip(f"LLaMA-Factory is not in {LLAMAFACTORY}; run `make install`, or `.venv/bin/pip install "
                    "--no-deps --target .venv/extras/llamafactory llamafactory==0.9.5`")
    monkeypatch.syspath_prepend(str(LLAMAFACTORY))
    for package in ("llamafactory.data", "llamafactory.hparams"):
        module = types.ModuleType(package)
        module.__path__ = [str(LLAMAFACTORY.joinpath(*package.split(".")))]
        sys.modules[package] = module
    try:
        yield SimpleNamespace(parser=importlib.import_module("llamafactory.data.parser"),
                              converter=importlib.import_module("llamafactory.data.converter"),
                              constants=importlib.import_module("llamafactory.extras.constants"),
                              DataArguments=importlib.import_module("llamafactory.hparams.data_args").DataArguments)
    finally:
        for name in [n for n in sys.modules if n == "llamafactory" or n.startswith("llamafactory.")]:
            del sys.modules[name]


def test_llamafactory_reads_every_entry_as_our_questions_answers_and_system_prompts(dataset, llamafactory,
                                                                                    tmp_path):
    info = json.loads((dataset / "dataset_info.json").read_text())
    attrs = llamafactory.parser.get_dataset_list(list(info), str(dataset))
    data_args = llamafactory.DataArguments(dataset_dir=str(dataset), dataset=",".join(info))
    hf = load_from_disk(str(dataset / "hf"))
    for name, attr in zip(info, attrs):
        # What LLaMA-Factory's loader does for a local file (_load_single_dataset, load_from == "file").
        assert attr.load_from == "file"
        path = dataset / attr.dataset_name
        rows = load_dataset(llamafactory.constants.FILEEXT2TYPE[path.suffix[1:]], data_files=[str(path)],
                            split=attr.split, cache_dir=str(tmp_path))
        aligned = llamafactory.converter.align_dataset(rows, attr, data_args, SimpleNamespace(local_process_index=0))
        want = hf[name.split("_")[1]]
        assert len(aligned) == len(want) > 0, name
        for got, row in zip(aligned, want):
            assert got["_prompt"] == [{"role": "user", "content": row["question"]}], name
            assert got["_response"] == [{"role": "assistant", "content": row["answer"]}], name
            assert got["_system"] == row["system"], name
    # The rows compared above include a pair's own system prompt, not only the default one.
    assert "Answer in one sentence." in {row["system"] for split in hf.values() for row in split}


def test_text_rows_are_written_as_a_split_a_file_and_llamafactorys_pt_dataset(tmp_path, llamafactory):
    from doctune.records import Chunk
    from tasks.dataset import text_rows

    pairs = [QAPair(question=f"How is thing {a} described?", answer=f"Thing {a} is blue.", source="synthesized",
                    language="en", path="doc.md") for a in range(4)]
    table = "| Model | Price |\n| --- | --- |"
    chunks = [Chunk(chunk_id="d:0", doc_id="d", path="doc.md", index=0, text="Thing 0 is blue.",
                    heading_path=["Things", "Colours"], start=0, end=16, n_tokens=5, title="Things"),
              Chunk(chunk_id="d:1", doc_id="d", path="doc.md", index=1, text="| Kestrel K4 | 8,950 EUR |",
                    start=17, end=40, n_tokens=9, title="Things", table_header=table)]
    texts = text_rows(chunks)
    assert [t["text"] for t in texts] == ["# Things\n## Colours\n\nThing 0 is blue.",
                                          f"# Things\n\n{table}\n| Kestrel K4 | 8,950 EUR |"]
    out = write_dataset(pairs, [], {}, DatasetSettings(), tmp_path, texts)
    assert set(load_from_disk(str(out / "hf"))) == {"train"}  # hf/ keeps question/answer rows only
    assert [r["text"] for r in _read(out / "text.jsonl")] == [t["text"] for t in texts]
    assert json.loads((out / "manifest.json").read_text())["text_rows"] == 2 and "Text-completion rows: 2" in (
        out / "card.md").read_text()
    # LLaMA-Factory reads doctune_text as its pt stage reads a dataset: the text as the prompt, no response.
    info = json.loads((out / "dataset_info.json").read_text())
    (attr,) = llamafactory.parser.get_dataset_list(["doctune_text"], str(out))
    data_args = llamafactory.DataArguments(dataset_dir=str(out), dataset="doctune_text")
    rows = load_dataset("json", data_files=[str(out / info["doctune_text"]["file_name"])], split="train",
                        cache_dir=str(tmp_path / "cache"))
    aligned = llamafactory.converter.align_dataset(rows, attr, data_args, SimpleNamespace(local_process_index=0))
    assert [a["_prompt"][0]["content"] for a in aligned] == [t["text"] for t in texts]
    # Off: the dataset is the one written before text rows existed.
    assert write_dataset(pairs, [], {}, DatasetSettings(text_rows=False), tmp_path, texts).name == \
        write_dataset(pairs, [], {}, DatasetSettings(text_rows=False), tmp_path).name


def test_text_rows_train_on_every_token_in_windows():
    from doctune.base_model import prepare_base_model
    from doctune.training.data import tokenize_texts
    from doctune.training.model import load_tokenizer

    tok = load_tokenizer(str(prepare_base_model()))
    text = "The Kestrel K4 survey drone costs 8,950 euros. " * 30
    (short,) = tokenize_texts(tok, ["Thing 0 is blue."], 64)
    assert short.labels == short.input_ids and short.input_ids[-1] == tok.eos_token_id
    windows = tokenize_texts(tok, [text], 64)
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for w in windows for t in w.input_ids] == ids and all(len(w.input_ids) <= 64 for w in windows)
