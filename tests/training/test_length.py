"""Training length follows the data, and its time is said before training starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from doctune.model_settings import TrainSettings
from doctune.training.length import duration, expected_training, steps_for


def _dataset(root: Path, train: int, text: int) -> Path:
    d = root / f"ds-{train}-{text}"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"train": train, "text_rows": text}))
    return d


def _finished_run(root: Path, name: str, base_model: str, batch: int, s_per_step: float, mtime: float,
                  validation: tuple[int, float] = (0, 0.0), method: str = "auto") -> None:
    run = root / "models" / name
    run.mkdir(parents=True)
    (run / "settings.yaml").write_text(yaml.safe_dump({"base_model": base_model, "per_device_batch_size": batch,
                                                       "gradient_accumulation_steps": 1, "method": method}))
    passes, seconds = validation
    (run / "metrics.json").write_text(json.dumps({"s_per_step": s_per_step, "eval_seconds": seconds,
                                                  "validation": [{"step": i} for i in range(passes)]}))
    (run / "run.json").write_text("{}")
    os.utime(run / "run.json", (mtime, mtime))


def test_a_folder_twice_as_big_trains_twice_as_long_by_default(tmp_path):
    s = TrainSettings()
    assert s.max_steps == 0 and s.num_epochs == 6
    assert steps_for(s, 380) == 6 * 48
    assert steps_for(s, 760) == 6 * 95
    assert steps_for(s.model_copy(update={"max_steps": 50}), 760) == 50  # a fixed count stays fixed
    # Text rows count only when training mixes them in, and then get steps in proportion.
    ds = _dataset(tmp_path, 380, 160)
    assert expected_training(ds, s, tmp_path).steps == 6 * 48
    with_text = s.model_copy(update={"text_rows": True})
    e = expected_training(ds, with_text, tmp_path)
    assert (e.steps, e.qa_rows, e.text_rows) == (6 * 68, 380, 160)
    assert "6 epochs over 380 question/answer rows + 160 text rows" in e.text(with_text)


def test_text_rows_of_the_unwritten_languages_count_alone(tmp_path):
    from doctune.training.data import text_rows_for

    ds = _dataset(tmp_path, 380, 3)
    (ds / "manifest.json").write_text(json.dumps({"train": 380, "text_rows": 3, "counts": {"skipped_languages": ["zh"]}}))
    (ds / "text.jsonl").write_text("".join(json.dumps({"text": t, "language": lang}, ensure_ascii=False) + "\n" for t, lang in
                                           [("The K4 costs 8,950 euros.", "en"), ("电池保修12个月。", "zh"), ("员工37人。", "zh")]),
                                   encoding="utf-8")
    unwritten = TrainSettings(text_rows_unwritten=True)
    assert text_rows_for(ds, unwritten) == ["电池保修12个月。", "员工37人。"]
    assert text_rows_for(ds, TrainSettings()) == []
    assert len(text_rows_for(ds, unwritten.model_copy(update={"text_rows": True}))) == 3  # text_rows: every language
    e = expected_training(ds, unwritten, tmp_path)
    assert (e.qa_rows, e.text_rows, e.steps) == (380, 2, steps_for(unwritten, 382))
    (ds / "manifest.json").write_text(json.dumps({"train": 380, "text_rows": 3, "counts": {"skipped_languages": []}}))
    assert text_rows_for(ds, unwritten) == [] and expected_training(ds, unwritten, tmp_path).text_rows == 0


def test_the_time_comes_from_the_newest_run_of_the_same_base_model(tmp_path):
    s = TrainSettings(per_device_batch_size=8)
    ds = _dataset(tmp_path, 80, 0)  # 10 batches x 6 epochs = 60 steps
    e = expected_training(ds, s, tmp_path)
    assert e.seconds is None and "not known yet" in e.text(s) and "after the first step" in e.text(s)
    _finished_run(tmp_path, "old", "", 8, 9.0, 1_000)
    _finished_run(tmp_path, "new", "", 4, 1.0, 2_000, validation=(3, 30.0))  # 0.25 s per example, 10 s a pass
    _finished_run(tmp_path, "other-model", "some/7b", 8, 50.0, 3_000)
    (tmp_path / "models" / "unfinished").mkdir()  # no run.json: never read
    e = expected_training(ds, s, tmp_path)
    assert e.measured_on == "new" and e.seconds == 60 * 8 * 0.25
    assert e.text(s).endswith(f"about {duration(120)} at the pace of new")
    # Validation every 25 steps of 60 (after 25, 50 and 60): three passes of 10 s on top.
    assert expected_training(ds, s.model_copy(update={"eval_every_steps": 25}), tmp_path).seconds == 120 + 30
    assert duration(120) == "2 min" and duration(45) == "45 s" and duration(3900) == "1 h 05 min"
    # a full fine-tune paces by full fine-tunes, an adapter by adapters
    _finished_run(tmp_path, "full", "", 8, 4.0, 4_000, method="full")
    assert expected_training(ds, s, tmp_path).measured_on == "new"
    assert expected_training(ds, s.model_copy(update={"method": "full"}), tmp_path).measured_on == "full"


def test_the_framed_copies_of_sparsely_asked_facts_count_in_the_expected_steps(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = _dataset(tmp_path, 16, 0)
    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i // 2}."}],
             "source": "cloze", "language": "en"} for i in range(16)]  # 8 facts asked twice each
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(ds / "hf"))
    s = TrainSettings(per_device_batch_size=8)
    assert expected_training(ds, s, tmp_path).qa_rows == 16
    assert expected_training(ds, s.model_copy(update={"min_rows_per_answer": 4}), tmp_path).qa_rows == 32
