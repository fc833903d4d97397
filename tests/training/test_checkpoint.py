"""What counts as a checkpoint: only complete ones, and a resume clears torn folders; a checkpoint
reaches the disk before it gets its name. (Crashes of a real training run: tests/test_train_crash.py.)"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from doctune.training import checkpoint
from doctune.training.checkpoint import CHECKPOINT_FILES, WEIGHT_FILES, checkpoints, resume_checkpoint, save_checkpoint
from doctune.training.model import initial_plan, load_model, make_optimizer
from tests.training.common import tiny_settings


@pytest.fixture
def train_log(caplog):
    caplog.set_level(logging.INFO, logger="doctune.training")
    return caplog


def _fake_checkpoint(folder: Path, step: int, state: str | None = None, without: tuple[str, ...] = (),
                     weights: str = "adapter") -> Path:
    path = folder / f"step-{step}"
    for name in [*CHECKPOINT_FILES, *(f"{weights}/{f}" for f in WEIGHT_FILES[weights])]:
        if name not in without:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(b"x")
    (path / "state.json").write_text(json.dumps({"step": step}) if state is None else state)
    return path


def test_only_complete_checkpoints_count_and_a_resume_clears_the_rest(tmp_path, train_log):
    folder = tmp_path / "checkpoints"
    _fake_checkpoint(folder, 2)
    _fake_checkpoint(folder, 3, weights="model")  # a full fine-tune's
    _fake_checkpoint(folder, 5, without=("model/model.safetensors",), weights="model")
    _fake_checkpoint(folder, 4, state='{"step": 4, "micro_')  # state.json cut short
    _fake_checkpoint(folder, 6, without=("optimizer.pt",))  # a prune stopped halfway
    _fake_checkpoint(folder, 8, state=json.dumps({"step": 6}))  # a folder that is not what its name says
    (_fake_checkpoint(folder, 10) / "state.json").unlink()  # state.json, written last, never came
    (_fake_checkpoint(folder, 12) / "rng.pt").write_bytes(b"")  # a file that never reached the disk
    _fake_checkpoint(folder, 14).rename(folder / ".tmp-step-14")  # killed before the rename
    (folder / "step-16").write_text("not a folder")
    (folder / "step-x").mkdir()

    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert resume_checkpoint(tmp_path) == folder / "step-3"
    assert sorted(p.name for p in folder.iterdir()) == ["step-16", "step-2", "step-3", "step-x"]
    removed = [r.getMessage() for r in train_log.records if "unfinished checkpoint" in r.getMessage()]
    assert len(removed) == 7 and any(".tmp-step-14" in m for m in removed)

    assert resume_checkpoint(tmp_path / "fresh") is None  # a run that never saved: nothing to clear


def test_a_checkpoint_is_on_disk_before_it_gets_its_name(tiny_model, tmp_path, monkeypatch):
    """Every file and folder of the checkpoint is fsynced while it is still .tmp-step-N (the path an
    fsynced descriptor points at tells when), then the folder holding the renamed one."""
    from transformers import get_scheduler

    settings = tiny_settings(tiny_model, cpu_dtype="fp32")
    plan = initial_plan(settings)
    model = load_model(tiny_model, plan, settings)
    optimizer = make_optimizer(model, plan, settings)
    scheduler = get_scheduler("constant", optimizer)
    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", recording)
    state = {"step": 2, "micro_batches": 2, "losses": []}
    final = save_checkpoint(tmp_path, model, optimizer, scheduler, state).resolve()

    tmp = final.with_name(".tmp-step-2")
    inside = {p.relative_to(tmp) for p in synced if p.is_relative_to(tmp)}
    on_disk = {p.relative_to(final) for p in final.rglob("*")} | {Path(".")}
    assert inside == on_disk and Path("state.json") in inside
    assert synced[-2:] == [final.parent, tmp_path.resolve()]  # the rename itself, and the checkpoints/ entry
    assert [p.resolve() for p in checkpoints(tmp_path)] == [final]
