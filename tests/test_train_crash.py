"""Training crash and resume for real: a training process killed with SIGKILL, checkpoint folders a
torn write leaves, and a Prefect task retry all continue from the last complete checkpoint to the
adapter an uninterrupted run ends with, and none of them touches the promoted model."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from doctune.runs import run_dir_for
from doctune.training.checkpoint import _step_of, checkpoints
from tasks import train as tr
from tasks.train import TrainingInterrupted, train
from tests.training.common import adapter_weights, dataset_dir, one_thread, tiny_settings  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]

# Saves at steps 2, 4, 6 and 8, each step ~0.1 s here: a kill once step-2 or step-4 shows up lands
# a second or more before the run could finish. NEFTune noise and LoRA dropout draw random numbers
# every step, so a resume matches only if the random state came back from the checkpoint too.
CRASH = dict(max_steps=10, save_every_steps=2, cpu_dtype="fp32", neftune_alpha=5)

# The child is a plain training process, nothing patched: whatever the kill leaves is what a real
# crash leaves.
CHILD = """
import logging, sys
import torch
torch.set_num_threads(1)
from tasks import train as tr
logging.basicConfig(force=True, level=logging.INFO, format="%(name)s %(message)s")
dataset_dir, settings, output_root = sys.argv[1:]
tr.train(dataset_dir, tr.TrainSettings.model_validate_json(settings), output_root, progress=False)
"""


@pytest.fixture(scope="module")
def crash_settings(tiny_model):
    return tiny_settings(tiny_model, **CRASH)


@pytest.fixture(scope="module")
def straight(crash_settings, dataset_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every crashed one must end up equal to."""
    return train(dataset_dir, crash_settings, tmp_path_factory.mktemp("straight"), progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def outputs(tmp_path, straight) -> Path:
    """An outputs folder with a promoted model (a finished run of its own, in the registry the way a
    promotion writes it) that the crashed run trains beside."""
    out = tmp_path / "outputs"
    promoted = out / "models" / "promoted-run"
    shutil.copytree(straight, promoted)
    (out / "registry").mkdir(parents=True)
    run = json.loads((promoted / "run.json").read_text())
    current = {"run_dir": str(promoted), "base_model": run["base_model"], "metric": "fact_recall", "score": 0.5,
               "gold_sha256": "0" * 64, "eval_dir": str(out / "evals" / "e1"),
               "dataset_sha256": run["dataset_sha256"], "settings_sha256": run["settings_sha256"],
               "promoted_at": "2024-01-01T00:00:00+00:00", "previous": None, "scores": {"gold/all/fact_recall": 0.5}}
    (out / "registry" / "current.json").write_text(json.dumps(current, indent=2))
    return out


def promoted_files(out: Path) -> dict[str, bytes]:
    return {"registry": _files(out / "registry"), "run": _files(out / "models" / "promoted-run")}


def assert_same_run(run_dir: Path, straight: Path) -> None:
    m_a = json.loads((straight / "metrics.json").read_text())
    m_b = json.loads((run_dir / "metrics.json").read_text())
    assert m_b["steps"] == m_a["steps"] == CRASH["max_steps"] and len(m_b["losses"]) == CRASH["max_steps"]
    assert [r["loss"] for r in m_b["losses"]] == pytest.approx([r["loss"] for r in m_a["losses"]], abs=1e-4)
    wa, wb = adapter_weights(straight), adapter_weights(run_dir)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


@pytest.fixture
def train_log(caplog):
    caplog.set_level(logging.INFO, logger="tasks.train")
    caplog.set_level(logging.INFO, logger="doctune.training")  # checkpoint clean-up logs from there
    return caplog


def _spy_loads(monkeypatch) -> list[str]:
    loaded, load = [], tr.load_checkpoint

    def spy(path, *args):
        loaded.append(path.name)
        return load(path, *args)

    monkeypatch.setattr(tr, "load_checkpoint", spy)
    return loaded


# --------------------------------------------------------------------------- crashes


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [("step-2",), (".tmp-step-4", "step-4")], ids=["after-a-save", "during-a-save"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(crash_settings, dataset_dir, straight, outputs, kill_at,
                                                          train_log, monkeypatch):
    before = promoted_files(outputs)
    run_dir = run_dir_for(dataset_dir, crash_settings, outputs)
    folder = run_dir / "checkpoints"
    log_path = outputs.parent / "child.log"
    with log_path.open("wb") as child_log:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(dataset_dir), crash_settings.model_dump_json(), str(outputs)],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=child_log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240  # the child spends most of it importing torch and transformers
            while not any((folder / name).exists() for name in kill_at):
                assert proc.poll() is None, f"training exited ({proc.returncode}) first:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"no {kill_at} after 240 s:\n{log_path.read_text()}"
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    left = sorted(p.name for p in folder.iterdir())
    assert not (run_dir / "run.json").exists(), f"the run finished before the kill; left {left}"
    # Known independently of checkpoints(): our writer renames a folder to step-N only once state.json is in.
    complete = sorted((p for p in folder.glob("step-*") if (p / "state.json").exists()), key=_step_of)
    assert complete, f"nothing to resume from: {left}"
    loaded = _spy_loads(monkeypatch)

    resumed = train(dataset_dir, crash_settings, outputs, resume=True, progress=False)

    messages = [r.getMessage() for r in train_log.records]
    assert loaded == [complete[-1].name], left
    assert f"resuming {run_dir} from {complete[-1].name}" in messages, left
    for name in left:
        if name.startswith(".tmp-"):
            assert any(name in m and "unfinished checkpoint" in m for m in messages), left
    assert not list(folder.glob(".tmp-*")) and [p.name for p in checkpoints(resumed)] == ["step-6", "step-8"]
    assert_same_run(resumed, straight)
    assert promoted_files(outputs) == before


@pytest.mark.slow
def test_a_torn_checkpoint_is_ignored(crash_settings, dataset_dir, straight, outputs, train_log, monkeypatch):
    before = promoted_files(outputs)
    with pytest.raises(TrainingInterrupted):
        train(dataset_dir, crash_settings, outputs, progress=False, stop_after_steps=4)
    run_dir = run_dir_for(dataset_dir, crash_settings, outputs)
    folder = run_dir / "checkpoints"
    # What a torn write of step 4 leaves: its .tmp- folder half full, and a step-4 whose last file,
    # state.json, never reached the disk.
    shutil.copytree(folder / "step-4", folder / ".tmp-step-4")
    (folder / ".tmp-step-4" / "optimizer.pt").unlink()
    (folder / ".tmp-step-4" / "state.json").unlink()
    (folder / "step-4" / "state.json").unlink()
    assert [p.name for p in checkpoints(run_dir)] == ["step-2"]
    loaded = _spy_loads(monkeypatch)

    resumed = train(dataset_dir, crash_settings, outputs, resume=True, progress=False)

    assert loaded == ["step-2"]
    removed = [r.getMessage() for r in train_log.records if "unfinished checkpoint" in r.getMessage()]
    assert sorted(Path(m.split()[1].rstrip(":")).name for m in removed) == [".tmp-step-4", "step-4"]
    assert_same_run(resumed, straight)
    assert promoted_files(outputs) == before


async def _task_runs(flow_run_id, wait_s: float = 30.0):
    """The flow run's task runs with their state histories, once every one has a final state (they
    reach the server as events a moment after the flow returns)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = asyncio.get_running_loop().time() + wait_s
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs and all(r.state is not None and r.state.is_final() for r in runs):
                return [(r, [s.name for s in await client.read_task_run_states(r.id)]) for r in runs]
            assert asyncio.get_running_loop().time() < deadline, f"task runs without a final state: {runs}"
            await asyncio.sleep(0.5)


@pytest.mark.slow
def test_a_prefect_retry_resumes_from_the_checkpoint(crash_settings, dataset_dir, straight, outputs, prefect_server,
                                                    monkeypatch):
    """The train flow's task crashes right after saving step-2; its one retry must resume from there."""
    from flows.train import train as train_flow

    before = promoted_files(outputs)
    crashed, save = [], tr.save_checkpoint

    def crash_after_step_2(run_dir, model, optimizer, scheduler, state, keep=2):
        path = save(run_dir, model, optimizer, scheduler, state, keep)
        if state["step"] == 2 and not crashed:
            crashed.append(path)
            raise RuntimeError("the process died right after saving step-2")
        return path

    monkeypatch.setattr(tr, "save_checkpoint", crash_after_step_2)
    loaded = _spy_loads(monkeypatch)

    state = train_flow(str(dataset_dir), crash_settings, str(outputs), return_state=True)

    assert state.is_completed(), state.message
    assert crashed and loaded == ["step-2"]
    [(task_run, history)] = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert task_run.run_count == 2 and history.count("Running") == 1 and "Retrying" in history, history
    assert history[-1] == "Completed", history
    assert_same_run(Path(state.result()), straight)
    assert promoted_files(outputs) == before
