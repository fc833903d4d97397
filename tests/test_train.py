"""Fine-tuning: settings validation, and train() end to end on a tiny random Llama (hidden 64, 2 layers)
with SmolLM2's tokenizer: loss falls, adapter changes, resume reaches the same result, merge is
equivalent, QLoRA runs on CPU. The library's parts (masking, batching, packed attention boundaries,
the model, checkpoints, merge) are tested in tests/training/."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from doctune.runs import dataset_hash, run_dir_for, settings_hash
from doctune.training.checkpoint import checkpoints
from doctune.training.model import initial_plan, load_model
from doctune.training.report import loss_markdown
from tasks import train as tr
from doctune.model_settings import SMALL_MODEL, TrainSettings, check_full_fits, for_base_model, load_train_settings
from tasks.train import TrainingInterrupted, train
from tests.training.common import SYSTEM, _row, adapter_weights, dataset_dir, one_thread, tiny_settings  # noqa: F401 (fixtures)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_validate(path):
    settings = load_train_settings(path)
    assert isinstance(settings, TrainSettings)


def test_shipped_config_sets_every_knob_with_a_comment():
    text = (CONFIGS / "train.yaml").read_text()
    keys = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert keys == set(TrainSettings.model_fields)
    assert all("#" in line for line in text.splitlines() if line and not line.startswith("#"))


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(ValueError) as err:
        load_train_settings(path)
    assert str(path) in str(err.value)
    assert "unknown key 'lora_rank'" in str(err.value)
    assert "did you mean 'lora_r'?" in str(err.value)


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("lora_alpha: -1", "lora_alpha must be > 0"),
        ("lora_dropout: 1.5", "lora_dropout must be < 1"),
        ("batching: pack", "batching must be one of"),
        ("cpu_dtype: fp16", "cpu_dtype must be one of"),
        ("max_steps: 0\nnum_epochs: null", "set max_steps > 0 or num_epochs"),
        ("per_device_batch_size: 0", "per_device_batch_size must be >= 1"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path, yaml_text, expected):
    path = tmp_path / "train.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ValueError, match="train.yaml: ") as err:
        load_train_settings(path)
    assert expected in str(err.value)


def test_unset_rate_and_noise_follow_the_base_models_size():
    small, said = for_base_model(TrainSettings(), 134_515_008)
    assert (small.learning_rate, small.neftune_alpha, small.question_dropout) == (1e-3, 15, 0.15)
    assert "135M parameters" in said and "question_dropout 0.15" in said
    large, _ = for_base_model(TrainSettings(), 7 * SMALL_MODEL)
    assert (large.learning_rate, large.neftune_alpha, large.question_dropout) == (2e-4, 0, 0)
    unknown, said = for_base_model(TrainSettings(), None)
    assert unknown == large and "unknown parameter count" in said
    kept, said = for_base_model(TrainSettings(learning_rate=3e-4, neftune_alpha=0, question_dropout=0), 10**8)
    assert kept == TrainSettings(learning_rate=3e-4, neftune_alpha=0, question_dropout=0) and said == ""
    partly, _ = for_base_model(TrainSettings(neftune_alpha=5), 10**8)
    assert (partly.learning_rate, partly.neftune_alpha) == (1e-3, 5)


def test_a_run_records_the_rate_and_noise_it_chose_and_keeps_its_name(tiny_model, dataset_dir, tmp_path,
                                                                        caplog):
    settings = tiny_settings(tiny_model, max_steps=2, learning_rate=None, neftune_alpha=None, question_dropout=None)
    with caplog.at_level("INFO", logger="tasks.train"):
        run_dir = train(dataset_dir, settings, tmp_path, progress=False)
    assert run_dir == run_dir_for(dataset_dir, settings, tmp_path)  # the name comes from the settings as given
    run = json.loads((run_dir / "run.json").read_text())
    # a tiny model: the small-model values
    assert (run["learning_rate"], run["neftune_alpha"], run["question_dropout"]) == (1e-3, 15, 0.15)
    assert run["settings_sha256"] == settings_hash(settings)
    assert load_train_settings(run_dir / "settings.yaml") == settings
    assert any("learning_rate 0.001, neftune_alpha 15, question_dropout 0.15 for a base model of" in r.message
               for r in caplog.records)
    assert any("question_dropout 0.15: each epoch drops" in r.message for r in caplog.records)
    assert run["question_insertion"] == 0 and not any("question_insertion" in r.message for r in caplog.records)


def test_question_insertion_alone_varies_the_questions(tiny_model, dataset_dir, tmp_path, caplog):
    settings = tiny_settings(tiny_model, max_steps=2, question_dropout=0, question_insertion=0.2)
    with caplog.at_level("INFO", logger="tasks.train"):
        run_dir = train(dataset_dir, settings, tmp_path, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["question_insertion"] == 0.2
    assert any("question_insertion 0.2: each epoch puts" in r.message for r in caplog.records)
    assert not any("question_dropout" in r.message and "each epoch drops" in r.message for r in caplog.records)
    assert run_dir != run_dir_for(dataset_dir, settings.model_copy(update={"question_insertion": 0}), tmp_path)


# --------------------------------------------------------------------------- training


def test_train_loss_falls_adapter_changes_and_outputs(tiny_model, dataset_dir, tmp_path):
    settings = tiny_settings(tiny_model, max_steps=8)
    run_dir = train(dataset_dir, settings, tmp_path, progress=False)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = [r["loss"] for r in metrics["losses"]]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    assert metrics["tokens_per_s"] > 0 and metrics["peak_rss_mb"] > 0 and metrics["examples"] == 12
    # LoRA B matrices start at zero: non-zero means the adapter learned something.
    b_weights = [w for k, w in adapter_weights(run_dir).items() if "lora_B" in k]
    assert b_weights and all(w.abs().sum() > 0 for w in b_weights)

    run = json.loads((run_dir / "run.json").read_text())
    assert run["method"] in ("lora_fp32", "lora_bf16") and run["device"] == "cpu"
    assert run["system_prompt"] == SYSTEM  # the dataset's: what `doctune serve` gives requests without one
    assert "reason" in run["probe"] or {"fp32_s_per_micro_step", "bf16_s_per_micro_step"} <= set(run["probe"])
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "adapter" / "tokenizer_config.json").exists()
    assert load_train_settings(run_dir / "settings.yaml") == settings
    assert run_dir.parent.name == "models" and len(run_dir.name) == 12 + 1 + 8

    # Finished: a second call returns the same folder without training.
    mtime = (run_dir / "run.json").stat().st_mtime
    assert train(dataset_dir, settings, tmp_path, progress=False) == run_dir
    assert (run_dir / "run.json").stat().st_mtime == mtime
    markdown = loss_markdown(run_dir)
    assert "| 1 |" in markdown and "| 5 |" in markdown and "| 8 |" in markdown and "| 3 |" not in markdown
    assert "data:image/png;base64," in markdown

    # init_adapter (nightly init_from: promoted): the next run starts from these weights, not from zero.
    again = tiny_settings(tiny_model, init_adapter=str(run_dir / "adapter"))
    model = load_model(tiny_model, initial_plan(again), again)
    start = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    saved = adapter_weights(run_dir)
    assert saved and all(torch.equal(start[k], w) for k, w in saved.items())
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
    assert run_dir_for(dataset_dir, again, tmp_path) != run_dir  # another candidate, another folder
    assert run["dataset_sha256"] == dataset_hash(dataset_dir) and run["settings_sha256"] == settings_hash(settings)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        bad = tiny_settings(tiny_model, init_adapter=str(tmp_path))
        load_model(tiny_model, initial_plan(bad), bad)


def test_validation_every_n_steps_is_recorded_and_plotted(tiny_model, dataset_dir, tmp_path):
    settings = tiny_settings(tiny_model, max_steps=4, eval_every_steps=2, cpu_dtype="fp32")
    run_dir = train(dataset_dir, settings, tmp_path, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["step"] for e in metrics["validation"]] == [2, 4]
    for e in metrics["validation"]:
        assert e["questions"] == 4 and e["with_facts"] == 4  # "10", "11", ... are not in the questions
        assert 0 <= e["fact_recall"] <= 1 and 0 <= e["rouge_l"] <= 1
    assert metrics["selected_step"] == 4 and json.loads((run_dir / "run.json").read_text())["selected_step"] == 4
    assert not (run_dir / "best").exists()
    assert "validation fact recall" in loss_markdown(run_dir)


def test_best_checkpoint_is_the_adapter_of_the_best_validation_step(tiny_model, dataset_dir, tmp_path, monkeypatch):
    """The scorer is scripted (a tiny random model learns no facts); the weights are the real ones."""
    from peft import get_peft_model_state_dict

    scores = iter([0.25, 0.75, 0.75, 0.5])
    seen = {}

    def scripted(model, tokenizer, items, settings, plan):
        seen[len(seen) + 1] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return {"fact_recall": next(scores), "rouge_l": 0.1, "questions": len(items), "with_facts": len(items),
                "example": {"question": items[0]["question"], "reply": "-"}}

    monkeypatch.setattr(tr, "score_validation", scripted)
    settings = tiny_settings(tiny_model, max_steps=8, eval_every_steps=2, select_checkpoint="best", cpu_dtype="fp32")
    run_dir = train(dataset_dir, settings, tmp_path, progress=False)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(e["step"], e["fact_recall"]) for e in metrics["validation"]] == [(2, 0.25), (4, 0.75), (6, 0.75),
                                                                                (8, 0.5)]
    # A tie goes to the later step.
    assert metrics["selected_step"] == 6 and not (run_dir / "best").exists()
    saved = adapter_weights(run_dir)
    # peft saves without the adapter name in the keys.
    step6 = {k.replace(".default", ""): v for k, v in seen[3].items()}
    step8 = {k.replace(".default", ""): v for k, v in seen[4].items()}
    assert set(saved) == set(step6)
    assert all(torch.equal(saved[k], step6[k]) for k in saved)
    assert not all(torch.equal(saved[k], step8[k]) for k in saved)


def test_best_needs_a_validation_schedule_and_split(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="eval_every_steps > 0"):
        tiny_settings(tiny_model, select_checkpoint="best")
    from datasets import Dataset, DatasetDict

    rows = [_row(i, random.Random(i)) for i in range(4)]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "old" / "hf"))
    settings = tiny_settings(tiny_model, eval_every_steps=2, select_checkpoint="best")
    with pytest.raises(ValueError, match="no validation split"):
        train(tmp_path / "old", settings, tmp_path / "out", progress=False)


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_model, dataset_dir, tmp_path):
    # NEFTune and question_dropout on: the noise must continue from the checkpoint's random state, and the
    # questions' dropped words be drawn as in the uninterrupted run
    settings = tiny_settings(tiny_model, max_steps=6, save_every_steps=2, batching="length_grouped",
                             gradient_accumulation_steps=2, per_device_batch_size=3, cpu_dtype="fp32",
                             neftune_alpha=5, question_dropout=0.3)
    straight = train(dataset_dir, settings, tmp_path / "a", progress=False)
    plain = train(dataset_dir, settings.model_copy(update={"question_dropout": 0.0}), tmp_path / "a", progress=False)
    tokens = [json.loads((r / "metrics.json").read_text())["tokens"] for r in (straight, plain)]
    assert tokens[0] < tokens[1]  # the same micro-batches, with shorter questions

    with pytest.raises(TrainingInterrupted):
        train(dataset_dir, settings, tmp_path / "b", progress=False, stop_after_steps=3)
    crashed = run_dir_for(dataset_dir, settings, tmp_path / "b")
    assert [p.name for p in checkpoints(crashed)] == ["step-2"] and not (crashed / "run.json").exists()
    with pytest.raises(FileExistsError, match="resume=True"):
        train(dataset_dir, settings, tmp_path / "b", progress=False)
    resumed = train(dataset_dir, settings, tmp_path / "b", resume=True, progress=False)

    m_a = json.loads((straight / "metrics.json").read_text())
    m_b = json.loads((resumed / "metrics.json").read_text())
    assert m_b["steps"] == m_a["steps"] == 6 and len(m_b["losses"]) == 6
    assert [r["loss"] for r in m_b["losses"]] == pytest.approx([r["loss"] for r in m_a["losses"]], abs=1e-4)
    wa, wb = adapter_weights(straight), adapter_weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert [p.name for p in checkpoints(straight)] == ["step-2", "step-4"]  # only the last 2 kept


@pytest.mark.slow
def test_merge_gives_the_same_greedy_outputs(tiny_model, dataset_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = train(dataset_dir, tiny_settings(tiny_model, max_steps=4, merge=True, cpu_dtype="fp32"),
                    tmp_path, progress=False)
    check = json.loads((run_dir / "metrics.json").read_text())["merge_check"]
    assert check["prompts"] == 3 and check["all_identical"] and check["max_abs_logit_diff"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


@pytest.mark.slow
def test_qlora_runs_on_cpu_with_nf4_double_quant(tiny_model, dataset_dir, tmp_path):
    import bitsandbytes as bnb

    settings = tiny_settings(tiny_model, method="qlora", max_steps=2, cpu_dtype="fp32")
    plan = initial_plan(settings)
    model = load_model(tiny_model, plan, settings)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for layer in layers:
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    del model

    run_dir = train(dataset_dir, settings, tmp_path, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["method"] == "qlora_nf4_fp32"
    b_weights = [w for k, w in adapter_weights(run_dir).items() if "lora_B" in k]
    assert len(b_weights) == 14 and all(w.abs().sum() > 0 for w in b_weights)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_qlora_on_cuda_bf16_paged_adamw_8bit(tiny_model, dataset_dir, tmp_path):
    settings = tiny_settings(tiny_model, device="cuda", method="auto", max_steps=8)
    run_dir = train(dataset_dir, settings, tmp_path, progress=False)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["method"] == "qlora_nf4_bf16" and run["optimizer"] == "paged_adamw_8bit"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["losses"][-1]["loss"] < metrics["losses"][0]["loss"]
    assert metrics["peak_cuda_allocated_mb"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_train_task_fn_returns_the_run_dir(tiny_model, dataset_dir, tmp_path):
    settings = tiny_settings(tiny_model, max_steps=2, cpu_dtype="fp32")
    out = tr.train_task.fn(str(dataset_dir), dataset_hash(dataset_dir), settings, str(tmp_path))
    assert Path(out) == run_dir_for(dataset_dir, settings, tmp_path) and (Path(out) / "run.json").exists()


@pytest.mark.slow
def test_train_task_in_a_flow_publishes_the_loss_artifact(tiny_model, dataset_dir, tmp_path, prefect_server):
    """prefect_server: the session-wide test server from conftest.py."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    settings = tiny_settings(tiny_model, max_steps=3, cpu_dtype="fp32", seed=7)

    @flow
    def fine_tune(out: str) -> str:
        return tr.train_task(str(dataset_dir), dataset_hash(dataset_dir), settings, out)

    run_dir = Path(fine_tune(str(tmp_path)))
    assert (run_dir / "run.json").exists()

    async def loss_artifacts():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            # Filtered by the server: an unfiltered read returns only its first 200 artifacts.
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-loss"])))

    artifacts = asyncio.run(loss_artifacts())
    assert artifacts and any(run_dir.name in a.data and "| 3 |" in a.data for a in artifacts)


def test_text_rows_are_trained_beside_the_questions_when_asked_for(tiny_model, dataset_dir, tmp_path):
    import shutil

    with_text = tmp_path / "with-text"
    shutil.copytree(dataset_dir, with_text)
    (with_text / "text.jsonl").write_text("".join(
        json.dumps({"text": text, "path": "catalogue.md", "chunk_id": f"d1:{i}", "language": lang}) + "\n"
        for i, (text, lang) in enumerate([(f"# Catalogue\n\nItem {i} costs {10 + i} euros and ships in two days.", "en")
                                          for i in range(5)] + [("# 目录\n\n电池保修12个月。", "zh")] * 2)))
    # the endpoint wrote no Chinese questions
    (with_text / "manifest.json").write_text(json.dumps({"counts": {"skipped_languages": ["zh"]}}))
    plain = train(with_text, tiny_settings(tiny_model, max_steps=2), tmp_path / "a", progress=False)
    mixed = train(with_text, tiny_settings(tiny_model, max_steps=2, text_rows=True), tmp_path / "b", progress=False)
    unwritten = train(with_text, tiny_settings(tiny_model, max_steps=2, text_rows_unwritten=True), tmp_path / "c",
                      progress=False)
    assert json.loads((plain / "metrics.json").read_text())["examples"] == 12  # off by default
    assert json.loads((mixed / "metrics.json").read_text())["examples"] == 12 + 7
    assert json.loads((unwritten / "metrics.json").read_text())["examples"] == 12 + 2  # the Chinese rows only


# --------------------------------------------------------------------------- method full


def full_weights(run_dir: Path, folder: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / folder / "model.safetensors"))


def test_a_full_fine_tune_changes_every_layer_and_leaves_a_whole_model(tiny_model, dataset_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    from doctune.generation import generate_answers, load_model as load_for_answers
    from doctune.runs import is_finished, resolve_run
    from tasks.evaluate import model_fingerprint
    from tasks.export import merge_run

    settings = tiny_settings(tiny_model, method="full", max_steps=6, learning_rate=1e-3, save_every_steps=2,
                             merge=True, cpu_dtype="fp32")
    with caplog.at_level("INFO", logger="tasks.train"):
        run_dir = train(dataset_dir, settings, tmp_path, progress=False)
    assert not (run_dir / "adapter").exists() and not (run_dir / "merged").exists()
    assert any("model/ is a whole model already" in r.message for r in caplog.records)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["method"] == "full_fp32" and run["base_model"] == tiny_model
    losses = [r["loss"] for r in json.loads((run_dir / "metrics.json").read_text())["losses"]]
    assert losses[-1] < losses[0] - 0.2

    base, tuned = load_file(str(Path(tiny_model) / "model.safetensors")), full_weights(run_dir)
    assert tuned.keys() == base.keys()
    # every weight of every layer trains, the norms and the (tied) embeddings included
    assert all(not torch.equal(tuned[k], base[k]) for k in base if ".layers." in k or "norm" in k)
    assert (tuned["model.embed_tokens.weight"] != base["model.embed_tokens.weight"]).any()
    model_config = json.loads((run_dir / "model" / "config.json").read_text())
    assert model_config["use_cache"] is True  # training switched it off; the saved model generates with it
    assert (run_dir / "model" / "tokenizer_config.json").exists()
    # a finished full run drops its checkpoints (each one the whole model and two optimizer states)
    assert not (run_dir / "checkpoints").exists()
    assert any("/checkpoints (" in r.message and "the run is finished" in r.message for r in caplog.records)

    # what reads a run folder takes model/ for the weights
    assert is_finished(run_dir) and resolve_run(str(run_dir)) == run_dir
    model, _ = load_for_answers(run_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.equal(model.get_parameter("model.norm.weight"), tuned["model.norm.weight"])
    assert len(generate_answers(run_dir, ["How much is item 1?"], SYSTEM, max_new_tokens=4)) == 1
    before = model_fingerprint(run_dir)
    (run_dir / "model" / "generation_config.json").write_text("{}")
    assert model_fingerprint(run_dir) != before  # the exam cache misses when the model changes
    merged = merge_run(run_dir, tmp_path / "export" / "merged")  # export: the whole model as it is
    assert full_weights(merged.parent, "merged").keys() == tuned.keys()

    # init_adapter (nightly init_from: promoted): the next full run starts from these weights
    again = tiny_settings(tiny_model, method="full", init_adapter=str(run_dir / "model"))
    start = load_model(tiny_model, initial_plan(again), again).state_dict()
    assert all(torch.equal(start[k], w) for k, w in tuned.items())
    with pytest.raises(FileNotFoundError, match="model/ folder of a finished full run"):
        bad = tiny_settings(tiny_model, method="full", init_adapter=str(tmp_path))
        load_model(tiny_model, initial_plan(bad), bad)


def test_full_takes_a_tenth_of_the_adapter_rate_and_is_refused_on_large_models(tiny_model, dataset_dir, tmp_path):
    full, said = for_base_model(TrainSettings(method="full"), 134_515_008)
    assert (full.learning_rate, full.neftune_alpha) == (1e-4, 15) and "trained in full" in said
    assert for_base_model(TrainSettings(method="full", learning_rate=3e-4), 10**8)[0].learning_rate == 3e-4
    with pytest.raises(ValueError, match=r"7.0B parameters; a full fine-tune needs about 104 GiB.*method: auto"):
        check_full_fits(TrainSettings(method="full"), 7 * SMALL_MODEL, "/models/big")
    check_full_fits(TrainSettings(), 7 * SMALL_MODEL, "/models/big")  # LoRA: any size

    # through train(): refused from the safetensors header alone, before a run folder exists
    big = tmp_path / "big"
    big.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [40_000, 40_000], "data_offsets": [0, 0]}}).encode()
    (big / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    settings = TrainSettings(base_model=str(big), method="full", max_steps=1)
    with pytest.raises(ValueError, match="1.6B parameters"):
        train(dataset_dir, settings, tmp_path / "out", progress=False)
    assert not run_dir_for(dataset_dir, settings, tmp_path / "out").exists()


@pytest.mark.slow
def test_a_full_fine_tune_resumed_after_a_crash_matches_an_uninterrupted_one(tiny_model, dataset_dir, tmp_path):
    settings = tiny_settings(tiny_model, method="full", max_steps=5, save_every_steps=2, cpu_dtype="fp32",
                             neftune_alpha=5, learning_rate=1e-3)
    straight = train(dataset_dir, settings, tmp_path / "a", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(dataset_dir, settings, tmp_path / "b", progress=False, stop_after_steps=3)
    crashed = run_dir_for(dataset_dir, settings, tmp_path / "b")
    assert [p.name for p in checkpoints(crashed)] == ["step-2"]  # the whole model, for the resume
    assert set(full_weights(crashed / "checkpoints" / "step-2")) == set(full_weights(straight))
    resumed = train(dataset_dir, settings, tmp_path / "b", resume=True, progress=False)
    m_a = json.loads((straight / "metrics.json").read_text())
    m_b = json.loads((resumed / "metrics.json").read_text())
    assert [r["loss"] for r in m_b["losses"]] == pytest.approx([r["loss"] for r in m_a["losses"]], abs=1e-4)
    wa, wb = full_weights(straight), full_weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
