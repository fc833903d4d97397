"""Gold questions belong to the document folder: found in its gold/ with no setting, copied whole under
outputs/ for the training pool, never another folder's."""

import hashlib
import json
from pathlib import Path

import pytest

from doctune.gold import gold_digest, gold_files
from doctune.nightly import NightlySettings, resolve_gold


def row(i: int) -> str:
    return json.dumps({"id": f"q{i}", "question": f"What is item {i}?", "answer": f"Item {i}.", "facts": [str(i)]}) + "\n"


def test_auto_finds_the_folders_own_gold_and_copies_it_under_outputs(tmp_path):
    folder, out = tmp_path / "docs", tmp_path / "out"
    (folder / "gold").mkdir(parents=True)
    (folder / "gold" / "b.jsonl").write_text(row(2))
    (folder / "gold" / "a.jsonl").write_text(row(1))
    (folder / "gold" / "README.md").write_text("not questions")
    settings = NightlySettings(output_dir=str(out))
    assert settings.gold_path == "auto"
    copy = Path(resolve_gold(folder, settings))
    assert copy.parent == out / "gold" and copy.read_text() == row(1) + row(2)  # name order, README left out
    assert copy.name == f"{gold_digest(folder / 'gold')[:12]}.jsonl" and gold_digest(copy) == gold_digest(folder / "gold")
    assert resolve_gold(folder, settings) == str(copy)  # the same questions, the same file


def test_one_file_keeps_its_own_digest_so_registry_scores_stay_comparable(tmp_path):
    folder = tmp_path / "docs"
    (folder / "gold").mkdir(parents=True)
    (folder / "gold" / "gold.jsonl").write_text(row(1) + row(2))
    expected = hashlib.sha256((row(1) + row(2)).encode()).hexdigest()
    assert gold_digest(folder / "gold") == gold_digest(folder / "gold" / "gold.jsonl") == expected
    assert gold_files(folder / "gold" / "gold.jsonl") == [folder / "gold" / "gold.jsonl"]


def test_a_folder_without_gold_has_none_and_a_named_one_must_exist(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    assert resolve_gold(folder, NightlySettings(output_dir=str(tmp_path / "out"))) is None
    (folder / "gold").mkdir()  # an empty gold/ is no gold either
    assert resolve_gold(folder, NightlySettings(output_dir=str(tmp_path / "out"))) is None
    assert resolve_gold(folder, NightlySettings(output_dir=str(tmp_path / "out"), gold_path=None)) is None
    with pytest.raises(FileNotFoundError, match=r"gold_path='elsewhere/q.jsonl': no gold file there.*'auto'"):
        resolve_gold(folder, NightlySettings(output_dir=str(tmp_path / "out"), gold_path="elsewhere/q.jsonl"))
    named = tmp_path / "mine.jsonl"
    named.write_text(row(3))
    assert Path(resolve_gold(folder, NightlySettings(output_dir=str(tmp_path / "out"),
                                                     gold_path=str(named)))).read_text() == row(3)


def test_the_sample_folder_carries_its_gold_and_ingest_leaves_it_out():
    from doctune.settings import IngestSettings
    from tasks.ingest import discover

    docs = Path(__file__).resolve().parent.parent / "data" / "docs"
    assert gold_files(docs / "gold") == [docs / "gold" / "gold.jsonl"]
    assert not [r for r in discover(docs, IngestSettings()) if r.relpath.startswith("gold/")]
