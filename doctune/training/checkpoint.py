"""Checkpoints and adapters on disk, written so that a crash at any moment leaves either the old
folder or the new one: files go into a .tmp- sibling, are fsynced, and the folder is renamed. A
checkpoint (checkpoints/step-N/) is complete once its state.json, written last, is in; resuming
clears the torn folders a crash left and continues from the newest complete one. A LoRA run's
checkpoint holds its adapter/, a full fine-tune's its model/ (every weight)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from doctune.records import replacing_dir

log = logging.getLogger(__name__)

# What a checkpoint holds besides its weights; state.json is written last, so a folder without it was never finished.
CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")
# The weights, one of: a LoRA run's adapter, a full fine-tune's model.
WEIGHT_FILES = {"adapter": ("adapter_config.json", "adapter_model.safetensors"),
                "model": ("config.json", "model.safetensors")}


def weights_name(model) -> str:
    """The folder a model's trained weights go to: adapter/ for a peft model, model/ for a whole one."""
    return "adapter" if hasattr(model, "peft_config") else "model"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders holding them: a rename is durable only once
    what it points at is on disk, else a power cut can leave a complete-looking folder of empty files."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _is_complete(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("step") != _step_of(path):
        return False

    def there(name: str) -> bool:
        return (path / name).is_file() and (path / name).stat().st_size > 0

    weights = any(all(there(f"{folder}/{f}") for f in files) for folder, files in WEIGHT_FILES.items())
    return weights and all(there(name) for name in CHECKPOINT_FILES)


def _step_folders(run_dir: Path) -> list[Path]:
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first; `.tmp-*` folders and torn `step-*` ones are skipped."""
    return [p for p in _step_folders(run_dir) if _is_complete(p)]


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from, after removing what an interrupted save or prune left behind."""
    folder = run_dir / "checkpoints"
    stale = sorted(folder.glob(".tmp-*")) + [p for p in _step_folders(run_dir) if not _is_complete(p)]
    for path in stale:
        log.info("removing %s: an unfinished checkpoint (the run stopped while writing or deleting it)", path)
        shutil.rmtree(path)
    found = checkpoints(run_dir)
    if not found and folder.exists():
        log.info("%s has no complete checkpoint; training from step 0", run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    final = run_dir / "checkpoints" / f"step-{state['step']}"
    # A crash mid-save leaves only a .tmp- folder, never a half checkpoint; a torn folder of the same step,
    # from before a crash, is replaced.
    with replacing_dir(final) as tmp:
        model.save_pretrained(tmp / weights_name(model), max_shard_size="100GB")  # one file: WEIGHT_FILES
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        _fsync_tree(tmp)
    _fsync_dir(final.parent)
    _fsync_dir(run_dir)  # the checkpoints/ entry itself, after the first save
    for old in checkpoints(run_dir)[:-keep]:
        # state.json first: a crash while deleting leaves a folder checkpoints() no longer lists.
        (old / "state.json").unlink()
        shutil.rmtree(old)
    return final


def load_full_state(model, weights: Path) -> None:
    """A whole model's saved weights into `model`. save_pretrained leaves out a tensor tied to another (the
    output head sharing the input embeddings): that one may be missing, nothing else."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if unexpected or untied:
        raise ValueError(f"{weights}: does not fit the model being trained (missing {untied[:3]}, unexpected "
                         f"{unexpected[:3]}); delete the run folder to start over")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if weights_name(model) == "adapter":
        set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    else:
        load_full_state(model, path / "model" / "model.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)  # our own file: python's RNG state is a tuple
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def save_weights(run_dir: Path, model, tokenizer, name: str | None = None) -> None:
    """The trained weights with the tokenizer in run_dir/`name` (default: adapter/ or model/, weights_name).
    A whole model is saved with its KV cache on (training switched it off), ready to generate."""
    name = name or weights_name(model)
    use_cache = model.config.use_cache
    if weights_name(model) == "model":
        model.config.use_cache = True
    try:
        with replacing_dir(run_dir / name) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        model.config.use_cache = use_cache
