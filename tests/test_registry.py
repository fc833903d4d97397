"""The registry a person reads, and the nightly flow's decision to stop early."""

import json

from doctune.nightly import NightlySettings, nothing_new, train_settings
from doctune.registry import earlier_decision, read_decisions, registry_markdown
from doctune.runs import settings_hash


def write_registry(root, current: dict | None, decisions: list[dict]):
    reg = root / "registry"
    reg.mkdir(parents=True)
    if current:
        (reg / "current.json").write_text(json.dumps(current))
    (reg / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    return reg


def decision(candidate, ds, st, promoted, when="2026-12-01T02:10:00+00:00"):
    return {"candidate": candidate, "dataset_sha256": ds, "settings_sha256": st, "promoted": promoted,
            "reason": "gold fact_recall: candidate 0.5 vs base 0.1 (+0.4) | margin", "decided_at": when,
            "scores": {"gold/all/fact_recall": 0.5, "exam/all/fact_recall": 0.6, "test/all/fact_recall": 0.7}}


def test_unchanged_documents_stop_early_and_say_since_when(tmp_path):
    settings = NightlySettings(output_dir=str(tmp_path))
    st = settings_hash(settings.train)
    write_registry(tmp_path, {"run_dir": "/o/models/a", "promoted_at": "2026-12-01T02:10:00+00:00",
                              "dataset_sha256": "d1", "metric": "fact_recall", "score": 0.5},
                   [decision("/o/models/a", "d1", st, True)])
    assert "documents unchanged since 2026-12-01T02:10:00+00:00" in nothing_new(tmp_path / "registry", "d1", settings.train)
    assert nothing_new(tmp_path / "registry", "d2", settings.train) is None


def test_a_candidate_already_evaluated_on_this_dataset_is_not_trained_again(tmp_path):
    settings = NightlySettings(output_dir=str(tmp_path))
    st = settings_hash(settings.train)
    write_registry(tmp_path, None, [decision("/o/models/b", "d2", st, False)])
    assert "already evaluated on 2026-12-01" in nothing_new(tmp_path / "registry", "d2", settings.train)
    other = settings.train.model_copy(update={"max_steps": 7})
    assert nothing_new(tmp_path / "registry", "d2", other) is None  # other settings: a new candidate
    assert earlier_decision(tmp_path / "registry", "d2", st)["candidate"] == "/o/models/b"


def test_init_from_promoted_continues_the_promoted_adapter(tmp_path):
    base = NightlySettings(output_dir=str(tmp_path), init_from="promoted")
    assert train_settings(base, tmp_path / "registry").init_adapter is None  # nothing promoted yet: the base model
    write_registry(tmp_path, {"run_dir": "/o/models/a", "promoted_at": "x"}, [])
    assert train_settings(base, tmp_path / "registry").init_adapter == "/o/models/a/adapter"
    assert train_settings(base.model_copy(update={"init_from": "base"}), tmp_path / "registry").init_adapter is None


def test_init_from_promoted_continues_a_full_fine_tune_only_in_full(tmp_path, caplog):
    full_run = tmp_path / "models" / "f"
    (full_run / "model").mkdir(parents=True)
    (full_run / "model" / "config.json").write_text("{}")
    write_registry(tmp_path, {"run_dir": str(full_run), "promoted_at": "x"}, [])
    full = NightlySettings(output_dir=str(tmp_path), init_from="promoted", train={"method": "full"})
    assert train_settings(full, tmp_path / "registry").init_adapter == str(full_run / "model")
    lora = NightlySettings(output_dir=str(tmp_path), init_from="promoted")
    with caplog.at_level("WARNING", logger="doctune.nightly"):
        assert train_settings(lora, tmp_path / "registry").init_adapter is None  # an adapter cannot start from it
    assert "is a full fine-tune but tonight's training is an adapter (method auto)" in caplog.text


def test_registry_markdown_lists_the_current_model_and_every_candidate_newest_first(tmp_path):
    reg = write_registry(tmp_path, {"run_dir": "/o/models/a", "promoted_at": "2026-12-01", "dataset_sha256": "d1" * 8,
                                    "metric": "fact_recall", "score": 0.5, "previous": None},
                         [decision("/o/models/a", "d1" * 8, "s1" * 8, True, "2026-12-01"),
                          {**decision("/o/models/b", "d2" * 8, "s1" * 8, False, "2026-12-02"),
                           "dataset_dir": "/o/datasets/ds-b"}])
    text = registry_markdown(reg)
    assert "**Current model:** `/o/models/a`" in text and "the base model" in text
    rows = [line for line in text.splitlines() if line.startswith("| 2026")]
    assert [r.split("|")[2].strip() for r in rows] == ["`b`", "`a`"]
    assert "| no |" in rows[0] and "**yes**" in rows[1] and "`ds-b`" in rows[0] and "`d1d1d1d1d1d1`" in rows[1] and "0.500" in rows[0] and "0.700" in rows[0]
    assert "0.600" in rows[0]  # the exam's score, beside gold and the test split
    assert "/ margin" in rows[0]  # a '|' in a reason would break the table
    assert len(read_decisions(reg)) == 2
    assert "none promoted yet" in registry_markdown(write_registry(tmp_path / "empty", None, []))


def test_each_model_has_its_registry_and_promoted_finds_them(tmp_path):
    from doctune.registry import model_name_for, named_registries
    from doctune.nightly import model_name
    from doctune.runs import promoted_registry

    assert model_name_for(tmp_path / "Sales Docs (2025)") == "sales-docs-2025"
    assert model_name("data/docs", NightlySettings()) == "docs"
    assert model_name("data/docs", NightlySettings(model_name="tessarine")) == "tessarine"
    import pytest
    with pytest.raises(ValueError, match="model_name='Bad Name'"):
        model_name("data/docs", NightlySettings(model_name="Bad Name"))
    assert promoted_registry("promoted", tmp_path) is None
    for name, when in (("alpha", "2026-12-01"), ("beta", "2026-12-03")):
        (tmp_path / "registry" / name).mkdir(parents=True)
        (tmp_path / "registry" / name / "current.json").write_text(json.dumps({"run_dir": f"/o/{name}",
                                                                                "promoted_at": when}))
    assert set(named_registries(tmp_path / "registry")) == {"alpha", "beta"}
    assert promoted_registry("promoted/alpha", tmp_path).name == "alpha"
    assert promoted_registry("promoted", tmp_path).name == "beta"  # the one promoted last
    with pytest.raises(FileNotFoundError, match="promoted models: alpha, beta"):
        promoted_registry("promoted/gamma", tmp_path)
    # The one registry of earlier versions stays what 'promoted' means while it is there.
    (tmp_path / "registry" / "current.json").write_text(json.dumps({"run_dir": "/o/old", "promoted_at": "x"}))
    assert promoted_registry("promoted", tmp_path) == tmp_path / "registry"
