"""What `doctune serve` serves: the base model, the registries' promoted adapters (`promoted/NAME` per model,
and `promoted`: the only one, or the one promoted last) and named adapters (NAME=RUN_DIR), all over one base; or
one full fine-tune, alone, under its names. Reading a run folder's weights is doctune/runs.py's."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from doctune.runs import PROMOTED, AdapterSource, find_adapter, promoted_adapters
from doctune.serving.jobs import BASE

log = logging.getLogger(__name__)

def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path or any(c.isspace() for c in name):
        raise ValueError(f"--adapter {spec!r}: expected NAME=RUN_DIR with a name without spaces, e.g. "
                         "--adapter tuned=outputs/models/<run>")
    return name, Path(path)


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


@dataclass
class ServePlan:
    """What one `doctune serve` loads: the engine's model (None: the offline base), the name it is asked for by
    and more names for it, LoRA adapters over it by name, and the system prompt each name's requests get when
    they bring none (the one it was trained with)."""

    model: str | None
    name: str
    aliases: list[str] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)
    system_prompts: dict[str, str] = field(default_factory=dict)


def plan_models(model: str | None, adapter_specs: list[str], outputs: Path | None, served_name: str) -> ServePlan:
    """What `doctune serve` serves: the promoted runs of `outputs/registry/` as `promoted` and `promoted/NAME`
    (outputs=None: none), then every NAME=RUN_DIR. LoRA adapters are served over one base: `model` or, when
    None, the one they were trained on (None if there are none: the caller picks the default), asked for by
    `served_name`. A full fine-tune is a model of its own: it is served alone, as the engine's model, under its
    names (its base is not served beside it). Raises ValueError/FileNotFoundError naming the file and the fix."""
    sources: list[AdapterSource] = []
    if outputs is not None:
        promoted = promoted_adapters(outputs)
        if not promoted:
            log.info("%s: no promoted model yet; serving the base model", outputs / "registry")
        sources += promoted
    for spec in adapter_specs:
        name, path = parse_adapter_spec(spec)
        clash = next((s for s in sources if s.name == name), None)
        if name == served_name:
            raise ValueError(f"--adapter {spec}: {name!r} is the base model's name (--name); pick another name")
        if clash is not None:
            hint = ("promoted adapters are served as 'promoted' and 'promoted/NAME'; pick another name or add "
                    "--no-promoted" if name.split("/")[0] == PROMOTED else "give each --adapter its own name")
            raise ValueError(f"--adapter {spec}: the name {name!r} is taken by {clash.folder}; {hint}")
        if name == BASE:
            raise ValueError(f"--adapter {spec}: {name!r} is reserved; pick another name")
        sources.append(find_adapter(name, path))
    systems = {s.name: prompt for s in sources if (prompt := s.system_prompt)}
    full = [s for s in sources if s.full]
    if full:
        return _plan_full(model, sources, full, systems)
    for s in sources:
        if model is not None and not _same_model(s.base_model, model):
            raise ValueError(f"adapter {s.name!r} was trained on {s.base_model} ({s.said_by}), but --model is "
                             f"{model}; drop --model to serve {s.base_model}, or leave that adapter out")
        first = sources[0]
        if not _same_model(s.base_model, first.base_model):
            raise ValueError(f"adapter {s.name!r} was trained on {s.base_model} ({s.said_by}), but adapter "
                             f"{first.name!r} on {first.base_model} ({first.said_by}); one server serves "
                             "adapters of one base: start one server per base")
    base = model if model is not None else (sources[0].base_model if sources else None)
    return ServePlan(base, served_name, [], {s.name: str(s.folder) for s in sources}, systems)


def _plan_full(model: str | None, sources: list[AdapterSource], full: list[AdapterSource],
               systems: dict[str, str]) -> ServePlan:
    """A full fine-tune served as the engine's model, under every name that points at it."""
    first = full[0]
    other = next((s for s in sources if not (s.full and _same_model(str(s.folder), str(first.folder)))), None)
    if other is not None:
        what = "the full fine-tune" if other.full else "the adapter"
        raise ValueError(f"{first.name!r} is a full fine-tune ({first.folder}), a model of its own, and one server "
                         f"serves one model's weights: {what} {other.name!r} ({other.folder}) cannot be served beside "
                         "it; serve them from two servers (--no-promoted --adapter NAME=RUN_DIR picks what one serves)")
    if model is not None and not _same_model(model, str(first.folder)):
        raise ValueError(f"--model {model}: {first.name!r} is a full fine-tune ({first.folder}) and is served as its "
                         "own model; drop --model, or serve the base from a second server")
    log.info("%r is a full fine-tune: serving its model %s (the base %s is not served beside it)", first.name,
             first.folder, first.base_model)
    return ServePlan(str(first.folder), first.name, [s.name for s in full[1:]], {}, systems)
