"""The run folder: what training writes, and what evaluation, export, serving and the nightly flow read.

A run is named after what it learned from and how, so the same dataset trained with the same settings
is the same folder, found again instead of trained again:

    outputs/models/<dataset_sha256[:12]>-<settings_sha256[:8]>/
        settings.yaml      the TrainSettings of the run (written first, before any model loads)
        checkpoints/       step-N/: adapter/ (or model/), optimizer.pt, scheduler.pt, rng.pt, state.json (written last;
                           a folder without it was never finished); the two newest are kept for resuming
        best/              while training with select_checkpoint=best: the best weights so far
        adapter/           the LoRA adapter chosen (peft's adapter_config.json + adapter_model.safetensors)
                           and the tokenizer with its chat template
        model/             instead of adapter/, for a full fine-tune (method full): the whole model chosen
                           (config.json + model.safetensors) with the tokenizer and its chat template
        merged/            with merge: true, the adapter folded into a full model (not for model/)
        loss.png           loss curve (and validation fact recall when evaluated)
        metrics.json       losses, validation scores, tokens/s, peak memory, the precision plan
        run.json           written last: its presence marks the run finished. base_model (the model the
                           adapter belongs on), dataset_dir, dataset_sha256, settings_sha256, init_adapter,
                           method, device, optimizer, probe, created, steps, selected_step, system_prompt
                           (the system message training used: `doctune serve` gives it to requests that
                           bring none)

`dataset_sha256` is the content hash of the dataset's hf/ folder and `settings_sha256` the hash of the
settings' JSON (`settings_hash`): field names, order, types and defaults of TrainSettings are part of
every run's name. The registry (`doctune/registry.py`) names the promoted run by its folder.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from doctune.model_settings import TrainSettings
from doctune.registry import named_registries, read_current

PROMOTED = "promoted"  # the name a run is asked for by when the registry's current model is meant


def dataset_hash(dataset_dir: str | Path) -> str:
    """Content hash of the hf/ folder, so a rebuilt dataset gets a new run folder."""
    hf = Path(dataset_dir) / "hf"
    h = hashlib.sha256()
    for p in sorted(x for x in hf.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(hf)).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# Fields added to TrainSettings after run names were pinned: left out of the name while at their default,
# so every run trained before them keeps its folder.
LATER_FIELDS = {"text_rows": False, "text_rows_unwritten": False, "no_system_share": 0.0, "min_rows_per_answer": 0,
                "question_dropout": 0.0, "question_insertion": 0.0}


def settings_hash(settings: TrainSettings) -> str:
    later = {k for k, default in LATER_FIELDS.items() if getattr(settings, k) == default}
    return hashlib.sha256(settings.model_dump_json(exclude=later).encode()).hexdigest()


def run_dir_for(dataset_dir: str | Path, settings: TrainSettings, output_root: str | Path) -> Path:
    return Path(output_root) / "models" / f"{dataset_hash(dataset_dir)[:12]}-{settings_hash(settings)[:8]}"


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and a rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    tmp.replace(path)


def read_json(path: Path) -> dict:
    """A JSON object from a run or registry file; a broken one raises ValueError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); restore it from the run that wrote it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def full_model_of(run_dir: str | Path) -> Path | None:
    """A full fine-tune's model/ folder (a whole transformers model); None for a LoRA run (adapter/)."""
    model = Path(run_dir) / "model"
    return model if (model / "config.json").is_file() else None


def is_finished(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    weights = (run_dir / "adapter" / "adapter_config.json").exists() or full_model_of(run_dir) is not None
    return (run_dir / "run.json").exists() and weights


def base_model_of(run_dir: str | Path) -> str:
    """The model a run's adapter was trained on (run.json's base_model)."""
    run_json = Path(run_dir) / "run.json"
    if not run_json.is_file():
        raise FileNotFoundError(f"{run_json} is missing: {run_dir} is not a finished training run (run.json is "
                                "written when training ends); pass outputs/models/<run>")
    return read_json(run_json)["base_model"]


def promoted_registry(ref: str, outputs: str | Path) -> Path | None:
    """The registry folder a 'promoted' reference means: 'promoted/NAME' the model NAME's; 'promoted' the one
    registry of earlier versions (`registry/current.json`) when there is one, else the only model's, else
    the model promoted last. None when nothing is promoted; an unknown NAME raises, listing the known ones."""
    root = Path(outputs) / "registry"
    named = named_registries(root)
    if ref.startswith(PROMOTED + "/"):
        name = ref.split("/", 1)[1]
        if name not in named:
            raise FileNotFoundError(f"{ref!r}: {root / name / 'current.json'} is missing: no model {name!r} is "
                                    f"promoted; promoted models: {', '.join(named) or 'none'}")
        return named[name]
    if (root / "current.json").is_file():
        return root
    if not named:
        return None
    return max(named.values(), key=lambda d: (read_current(d) or {}).get("promoted_at") or "")


def resolve_run(ref: str, output_dir: str | Path = "outputs") -> Path:
    """A run folder from 'promoted' / 'promoted/NAME' (a registry's current model) or a path."""
    if ref == PROMOTED or ref.startswith(PROMOTED + "/"):
        registry = promoted_registry(ref, output_dir)
        current = read_current(registry) if registry else None
        if current is None:
            raise FileNotFoundError(f"{output_dir}/registry/ has no current.json: no model is promoted yet; "
                                    "run `doctune nightly` (or export a run folder by its path)")
        ref = current["run_dir"]
    run_dir = Path(ref)
    if not is_finished(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a finished training run (run.json and adapter/ or model/ are "
                                "written when training ends); pass outputs/models/<run>, 'promoted' or 'promoted/NAME'")
    return run_dir


# ----------------------------------------------------------------------------- the system prompt


def dataset_system_prompt(dataset_dir: str | Path | None) -> str:
    """The system prompt the model was trained with: the commonest one in the dataset."""
    if dataset_dir and (Path(dataset_dir) / "hf").exists():
        from datasets import load_from_disk

        splits = load_from_disk(str(Path(dataset_dir) / "hf"))
        systems = Counter(s for split in splits.values() if "system" in split.column_names for s in split["system"])
        if systems:
            return systems.most_common(1)[0][0]
    from doctune.settings import DatasetSettings

    return DatasetSettings().system_prompt


def trained_system_prompt(run_dir: Path, dataset_dir: str | None) -> str:
    """The system prompt training used: run.json's (written since runs record it), else the run's own
    setting, else the dataset's (as training chose it)."""
    import yaml

    run_json = run_dir / "run.json"
    recorded = read_json(run_json).get("system_prompt") if run_json.is_file() else None
    if recorded is not None:
        return recorded
    saved = run_dir / "settings.yaml"
    own = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("system_prompt") if saved.exists() else None
    return own or dataset_system_prompt(dataset_dir)


# ----------------------------------------------------------------------------- adapters


@dataclass
class AdapterSource:
    name: str
    folder: Path  # holds adapter_config.json; for a full fine-tune, the run's model/ folder (a whole model)
    base_model: str  # the model it was trained on
    said_by: Path  # the file that names base_model
    full: bool = False  # a full fine-tune: served as its own model, not as an adapter over base_model

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the adapter was trained with; None for an adapter folder outside a run."""
        run_dir = self.folder.parent
        if self.said_by != run_dir / "run.json":
            return None
        return trained_system_prompt(run_dir, read_json(self.said_by).get("dataset_dir"))


def find_adapter(name: str, path: Path, what: str | None = None) -> AdapterSource:
    """The adapter of a run folder (`<run>/adapter/` + `<run>/run.json`) or an adapter folder itself,
    with the base model it was trained on; for a full fine-tune's run folder (or its model/ folder), its
    whole model (`full`). `what` names where `path` came from, for errors."""
    what = what or f"--adapter {name}={path}"
    full = False
    if (path / "adapter_config.json").is_file():
        folder, run_json = path, path.parent / "run.json"
    elif (path / "adapter" / "adapter_config.json").is_file():
        folder, run_json = path / "adapter", path / "run.json"
    elif (path / "run.json").is_file() and full_model_of(path) is not None:
        folder, run_json, full = path / "model", path / "run.json", True
    elif path.name == "model" and (path.parent / "run.json").is_file() and full_model_of(path.parent) is not None:
        folder, run_json, full = path, path.parent / "run.json", True
    elif not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist; give a run folder (outputs/models/<run>) "
                                "or its adapter/ folder")
    else:
        raise FileNotFoundError(f"{what}: {path} has neither adapter/adapter_config.json nor model/config.json (a "
                                "run folder) nor adapter_config.json (an adapter folder); is the run finished "
                                "(run.json is written last)?")
    if run_json.is_file():
        said_by, base = run_json, read_json(run_json).get("base_model")
    else:  # an adapter folder outside a run: peft records the base it was made on
        said_by = folder / "adapter_config.json"
        base = read_json(said_by).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{what}: {said_by} names no base model (base_model / base_model_name_or_path); "
                         "pass the base it was trained on with --model")
    return AdapterSource(name, folder, str(base), said_by, full)


def _registry_adapter(name: str, current_json: Path, outputs: Path) -> AdapterSource:
    run_dir = read_json(current_json).get("run_dir")
    if not run_dir:
        raise ValueError(f"{current_json}: no run_dir field; it is written by the evaluate stage's promotion, "
                         "restore it or serve without it (--no-promoted)")
    # run_dir is as the worker wrote it, maybe relative to another working directory; the run is
    # also found under this outputs folder by its name.
    tried = [Path(run_dir)]
    if not tried[0].is_absolute():
        tried.append(outputs / "models" / tried[0].name)
    for path in tried:
        if path.exists():
            return find_adapter(name, path, what=f"{current_json}: run_dir")
    raise FileNotFoundError(f"{current_json}: run_dir {run_dir!r} does not exist (looked in "
                            f"{', '.join(map(str, tried))}); restore the run folder, or serve without it "
                            "(--no-promoted)")


def promoted_adapters(outputs: Path) -> list[AdapterSource]:
    """The promoted adapters under `outputs`: `promoted/NAME` for every model with a registry, and `promoted`
    (promoted_registry's choice: the only model, or the one promoted last). Empty when nothing is promoted."""
    registry = promoted_registry(PROMOTED, outputs)
    if registry is None:
        return []
    named = named_registries(outputs / "registry")
    return ([_registry_adapter(PROMOTED, registry / "current.json", outputs)]
            + [_registry_adapter(f"{PROMOTED}/{name}", d / "current.json", outputs) for name, d in named.items()])

