"""The run folder as a contract: its name must not move when code moves, and its readers explain
what is missing."""

import json
from pathlib import Path

import pytest

from doctune.model_settings import TrainSettings, load_train_settings
from doctune.runs import (base_model_of, find_adapter, resolve_run, run_dir_for, settings_hash,
                          trained_system_prompt, write_json)

ROOT = Path(__file__).resolve().parent.parent


def _dataset(tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    (d / "hf" / "train").mkdir(parents=True)
    (d / "hf" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (d / "hf" / "train" / "data-00000-of-00001.arrow").write_bytes(bytes(range(256)) * 5)
    return d


def test_run_folder_names_are_pinned(tmp_path):
    # A change here re-trains every nightly candidate; make it knowingly. Last changed when question_dropout
    # became unset by default (None: 0.15 under a billion parameters) and demo.yaml set it to 0.15: both train
    # differently from before, so both get new names.
    assert settings_hash(TrainSettings()) == "20c9d7cc8a994f08f5daf21a0152555e641eea6ea9a251411a70210c9ec30fb1"
    assert settings_hash(load_train_settings(ROOT / "configs" / "demo.yaml")).startswith("13f2afdde053c7cd")
    ds = _dataset(tmp_path)
    assert run_dir_for(ds, TrainSettings(), "outputs") == Path("outputs/models/287415a9db4a-20c9d7cc")
    assert run_dir_for(ds, TrainSettings(lora_r=8, seed=3), "outputs").name == "287415a9db4a-5a7c98b4"
    # A run asked with question_dropout 0 keeps the name it had before the field existed.
    assert settings_hash(TrainSettings(question_dropout=0)).startswith("5e10521f199ddd1b")
    # A field added later changes the name only when it is set.
    assert settings_hash(TrainSettings(text_rows=True)) != settings_hash(TrainSettings())
    assert settings_hash(TrainSettings(text_rows_unwritten=True)) != settings_hash(TrainSettings())
    assert settings_hash(TrainSettings(question_insertion=0.15)) != settings_hash(TrainSettings())


def test_base_model_and_resolve_name_the_missing_file(tmp_path):
    run = tmp_path / "models" / "r1"
    run.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run.json is missing"):
        base_model_of(run)
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        resolve_run(str(run), tmp_path)
    with pytest.raises(FileNotFoundError, match="no model is promoted yet"):
        resolve_run("promoted", tmp_path)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    write_json(run / "run.json", {"base_model": "some/base"})
    assert base_model_of(run) == "some/base"
    assert resolve_run(str(run), tmp_path) == run
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "current.json").write_text(json.dumps({"run_dir": str(run)}))
    assert resolve_run("promoted", tmp_path) == run
    assert find_adapter("tuned", run).base_model == "some/base"
    (run / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json: not valid JSON"):
        base_model_of(run)


def test_the_trained_system_prompt_comes_from_run_json_then_settings_then_the_dataset(tmp_path):
    run = tmp_path / "models" / "r1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    write_json(run / "run.json", {"base_model": "b"})  # a run from before run.json recorded it
    from doctune.settings import DatasetSettings

    assert trained_system_prompt(run, None) == DatasetSettings().system_prompt
    (run / "settings.yaml").write_text("system_prompt: From the settings.\n")
    assert trained_system_prompt(run, None) == "From the settings."
    write_json(run / "run.json", {"base_model": "b", "system_prompt": "You answer about Brekke."})
    assert trained_system_prompt(run, None) == "You answer about Brekke."
    assert find_adapter("tuned", run).system_prompt == "You answer about Brekke."
    # An adapter folder outside a run has no training record to read it from.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text('{"base_model_name_or_path": "b"}')
    assert find_adapter("bare", bare).system_prompt is None
