"""What `doctune serve` serves: the base model, the registries' promoted adapters (`promoted/NAME` per model,
and `promoted`: the only one, or the one promoted last) and named adapters (NAME=RUN_DIR), all over one base. Reading a run folder's adapter is doctune/runs.py's."""

from __future__ import annotations

import logging
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


def plan_models(model: str | None, adapter_specs: list[str], outputs: Path | None,
                served_name: str) -> tuple[str | None, dict[str, str]]:
    """(base model, {name: adapter folder}) for `doctune serve`: the promoted adapters of `outputs/registry/`
    as `promoted` and `promoted/NAME` (outputs=None: none), then every NAME=RUN_DIR.
    The base is `model` or, when None, the one the adapters were trained on (None if there are
    none: the caller picks the default). Raises ValueError/FileNotFoundError naming the file and the fix."""
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
    return base, {s.name: str(s.folder) for s in sources}


# ---------------------------------------------------------------- reading run folders and the registry


def adapter_system_prompts(adapters: dict[str, str]) -> dict[str, str]:
    """{name: the system prompt that adapter was trained with} for the adapters of training runs (their
    run.json, else the run's settings or dataset); a request without a system message gets it."""
    found = {name: find_adapter(name, Path(folder)).system_prompt for name, folder in adapters.items()}
    return {name: prompt for name, prompt in found.items() if prompt}
