"""Prompt files live in prompts/ beside the code; load them relative to this file, never the cwd."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from jinja2 import Environment, StrictUndefined

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
_env = Environment(undefined=StrictUndefined, keep_trailing_newline=False)


@lru_cache(maxsize=None)
def load_prompt(name: str, required: tuple[str, ...] = ("version", "system", "user")) -> dict:
    path = PROMPTS_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt missing; expected one of {sorted(p.stem for p in PROMPTS_DIR.glob('*.yaml'))}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in required:
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    data.setdefault("examples", [])
    return data


def render(template: str, **fields) -> str:
    # StrictUndefined: a field the caller forgot fails here instead of sending "" to the LLM.
    return _env.from_string(template).render(**fields)
