"""What the training tests share: one thread, a tiny dataset folder in the build_dataset format, and
small TrainSettings for the tiny random Llama of tests/conftest.py. Fixtures here are registered by
tests/training/conftest.py; a test module elsewhere imports the ones it uses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from doctune.model_settings import TrainSettings

SYSTEM = "You answer questions about the catalogue."


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
    base = dict(base_model=tiny_model, max_steps=6, per_device_batch_size=4, learning_rate=5e-3, neftune_alpha=0,
                question_dropout=0, save_every_steps=0, logging_steps=2, device="cpu", lora_r=8, lora_alpha=16)
    return TrainSettings(**{**base, **kw})


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
