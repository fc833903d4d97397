"""Fine-tuning: settings validation, reply-only masking, batching, packed attention boundaries,
and train() end to end on a tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer:
loss falls, adapter changes, resume reaches the same result, merge is equivalent, QLoRA runs on CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks import train as tr
from tasks.train import (
    IGNORE, TrainSettings, TrainingInterrupted, collate, epoch_batches, load_train_settings, render_example, train,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEM = "You answer questions about the catalogue."


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A hidden-64 model gains nothing from a second thread, and on 2 cores shared with other jobs
    two OpenMP threads can stall each other: the resume test once took 71 s with 2 threads and
    4.4 s with 1, back to back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _row(i: int, rng: random.Random) -> dict:
    q = f"What is the price of item {i}?" + " Please be precise." * rng.randint(0, 5)
    a = f"Item {i} costs {10 + i} euros." + " It ships in two days." * rng.randint(0, 6)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                {"role": "assistant", "content": a}]
    return {"pair_id": f"p{i}", "question": q, "answer": a, "system": SYSTEM, "source": "synthesized",
            "language": "en", "doc_id": "d1", "path": "catalogue.md", "chunk_id": f"d1:{i}", "messages": messages}


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """A tiny dataset folder in the build_dataset format (only hf/ matters to training)."""
    from datasets import Dataset, DatasetDict

    out = tmp_path_factory.mktemp("dataset")
    rng = random.Random(0)
    rows = [_row(i, rng) for i in range(16)]
    validation = [{**row, "question": f"How much is item {i}?", "pair_id": f"v{i}"}
                  for i, row in enumerate(rows[:4])]
    DatasetDict({"train": Dataset.from_list(rows[:12]), "validation": Dataset.from_list(validation),
                 "test": Dataset.from_list(rows[12:])}).save_to_disk(str(out / "hf"))
    return out


def tiny_settings(tiny_model: str, **kw) -> TrainSettings:
    base = dict(base_model=tiny_model, max_steps=6, per_device_batch_size=4, learning_rate=5e-3,
                save_every_steps=0, logging_steps=2, device="cpu", lora_r=8, lora_alpha=16)
    return TrainSettings(**{**base, **kw})


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


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
        ("max_steps: 0", "set max_steps > 0 or num_epochs"),
        ("per_device_batch_size: 0", "per_device_batch_size must be >= 1"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path, yaml_text, expected):
    path = tmp_path / "train.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ValueError, match="train.yaml: ") as err:
        load_train_settings(path)
    assert expected in str(err.value)


def test_max_steps_zero_with_epochs_is_valid():
    s = TrainSettings(max_steps=0, num_epochs=2, per_device_batch_size=4, gradient_accumulation_steps=2)
    assert tr.total_steps(s, n_examples=10) == 3  # 3 micro-batches per epoch x 2 epochs / 2


# --------------------------------------------------------------------------- masking and batching


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


def test_epoch_batches_cover_every_example_and_are_reproducible():
    lengths = [random.Random(i).randint(5, 300) for i in range(103)]
    for batching in ("padded", "length_grouped", "packed"):
        a = epoch_batches(lengths, 8, batching, seed=1, epoch=0)
        assert sorted(i for b in a for i in b) == list(range(103))
        assert a == epoch_batches(lengths, 8, batching, seed=1, epoch=0)
        assert a != epoch_batches(lengths, 8, batching, seed=1, epoch=1)

    def pad_waste(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, "length_grouped", 1, 0)
    assert pad_waste(grouped) < pad_waste(epoch_batches(lengths, 8, "padded", 1, 0)) / 3


def test_packed_batches_attend_within_their_own_sequence(tiny_model, tokenizer):
    """Packed rows must give every sequence the logits it gets alone (no cross-attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    rng = random.Random(3)
    examples = [render_example(tokenizer, _row(i, rng)["messages"], None, 512) for i in range(5)]
    batch = collate(examples, "packed", tokenizer.pad_token_id, max_seq_len=400)
    assert batch["input_ids"].shape[0] < len(examples)  # several sequences share a row
    assert batch["n_tokens"] == sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            n = len(ex.input_ids)
            row, start = next(  # find where the sequence landed
                (r, s) for r in range(batch["input_ids"].shape[0]) for s in range(batch["input_ids"].shape[1] - n + 1)
                if batch["input_ids"][r, s : s + n].tolist() == ex.input_ids and batch["position_ids"][r, s] == 0
            )
            torch.testing.assert_close(packed[row, start : start + n], alone, atol=1e-4, rtol=1e-4)
    # The same labels are trained either way (first token of each sequence is never a target).
    padded = collate(examples, "padded", tokenizer.pad_token_id, 400)
    assert (batch["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()


def test_neftune_noises_the_embeddings_only_while_training(tiny_model):
    settings = tiny_settings(tiny_model, neftune_alpha=5)
    model = tr.load_model(tiny_model, tr.initial_plan(settings), settings)
    embed = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model.eval()
    clean = embed(ids)
    model.train()
    first, second = embed(ids), embed(ids)
    bound = 5 / (6 * 64) ** 0.5  # alpha / sqrt(length x hidden size)
    assert 0 < (first - clean).abs().max() <= bound and not torch.equal(first, second)
    model.eval()
    assert torch.equal(embed(ids), clean)
    off = tiny_settings(tiny_model)
    plain = tr.load_model(tiny_model, tr.initial_plan(off), off).train().get_input_embeddings()
    assert torch.equal(plain(ids), plain(ids))


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_bf16_frozen_weights_cast_once_leave_loss_and_gradients_unchanged(tiny_model, dataset_dir, tokenizer):
    """The frozen base weights stored in bf16 once give the very losses and LoRA gradients that
    autocast's per-forward casts give; the embeddings stay fp32 and the tied head gets its own copy."""
    settings = tiny_settings(tiny_model, cpu_dtype="bf16", lora_dropout=0.1)
    examples, _ = tr.tokenize_split(tokenizer, tr.load_train_split(dataset_dir), settings)
    batch = collate(examples[:4], "packed", tokenizer.pad_token_id, settings.max_seq_len)
    runs = []
    for cast in (False, True):
        plan = tr.initial_plan(settings)
        torch.manual_seed(0)
        model = tr.load_model(tiny_model, plan, settings).train()
        n = tr.store_frozen_in_compute_dtype(model, plan) if cast else 0
        torch.manual_seed(1)  # the same dropout masks on both sides
        loss = tr.micro_step_loss(model, batch, plan)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        runs.append((n, loss.item(), grads, model))
    (n0, loss0, grads0, _), (n1, loss1, grads1, model) = runs
    assert n0 == 0 and n1 == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert loss1 == loss0
    assert grads1.keys() == grads0.keys() and all(torch.equal(grads1[k], grads0[k]) for k in grads0)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and not head.requires_grad
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # fp32 compute keeps every weight as loaded
    fp32 = tiny_settings(tiny_model, cpu_dtype="fp32")
    plan = tr.initial_plan(fp32)
    assert tr.store_frozen_in_compute_dtype(tr.load_model(tiny_model, plan, fp32), plan) == 0


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
    assert "reason" in run["probe"] or {"fp32_s_per_micro_step", "bf16_s_per_micro_step"} <= set(run["probe"])
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "adapter" / "tokenizer_config.json").exists()
    assert load_train_settings(run_dir / "settings.yaml") == settings
    assert run_dir.parent.name == "models" and len(run_dir.name) == 12 + 1 + 8

    # Finished: a second call returns the same folder without training.
    mtime = (run_dir / "run.json").stat().st_mtime
    assert train(dataset_dir, settings, tmp_path, progress=False) == run_dir
    assert (run_dir / "run.json").stat().st_mtime == mtime
    markdown = tr._loss_markdown(run_dir)
    assert "| 1 |" in markdown and "| 5 |" in markdown and "| 8 |" in markdown and "| 3 |" not in markdown
    assert "data:image/png;base64," in markdown

    # init_adapter (nightly init_from: promoted): the next run starts from these weights, not from zero.
    again = tiny_settings(tiny_model, init_adapter=str(run_dir / "adapter"))
    model = tr.load_model(tiny_model, tr.initial_plan(again), again)
    start = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    saved = adapter_weights(run_dir)
    assert saved and all(torch.equal(start[k], w) for k, w in saved.items())
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
    assert tr.run_dir_for(dataset_dir, again, tmp_path) != run_dir  # another candidate, another folder
    assert run["dataset_sha256"] == tr.dataset_hash(dataset_dir) and run["settings_sha256"] == tr.settings_hash(settings)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        bad = tiny_settings(tiny_model, init_adapter=str(tmp_path))
        tr.load_model(tiny_model, tr.initial_plan(bad), bad)


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
    assert "validation fact recall" in tr._loss_markdown(run_dir)


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
    # NEFTune on: its noise, too, must continue from the checkpoint's random state
    settings = tiny_settings(tiny_model, max_steps=6, save_every_steps=2, batching="length_grouped",
                             gradient_accumulation_steps=2, per_device_batch_size=3, cpu_dtype="fp32",
                             neftune_alpha=5)
    straight = train(dataset_dir, settings, tmp_path / "a", progress=False)

    with pytest.raises(TrainingInterrupted):
        train(dataset_dir, settings, tmp_path / "b", progress=False, stop_after_steps=3)
    crashed = tr.run_dir_for(dataset_dir, settings, tmp_path / "b")
    assert [p.name for p in tr.checkpoints(crashed)] == ["step-2"] and not (crashed / "run.json").exists()
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
    assert [p.name for p in tr.checkpoints(straight)] == ["step-2", "step-4"]  # only the last 2 kept


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
    plan = tr.initial_plan(settings)
    model = tr.load_model(tiny_model, plan, settings)
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
    out = tr.train_task.fn(str(dataset_dir), tr.dataset_hash(dataset_dir), settings, str(tmp_path))
    assert Path(out) == tr.run_dir_for(dataset_dir, settings, tmp_path) and (Path(out) / "run.json").exists()


@pytest.mark.slow
def test_train_task_in_a_flow_publishes_the_loss_artifact(tiny_model, dataset_dir, tmp_path, prefect_server):
    """prefect_server: the session-wide test server from conftest.py."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    settings = tiny_settings(tiny_model, max_steps=3, cpu_dtype="fp32", seed=7)

    @flow
    def fine_tune(out: str) -> str:
        return tr.train_task(str(dataset_dir), tr.dataset_hash(dataset_dir), settings, out)

    run_dir = Path(fine_tune(str(tmp_path)))
    assert (run_dir / "run.json").exists()

    async def loss_artifacts():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            # Filtered by the server: an unfiltered read returns only its first 200 artifacts.
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-loss"])))

    artifacts = asyncio.run(loss_artifacts())
    assert artifacts and any(run_dir.name in a.data and "| 3 |" in a.data for a in artifacts)
