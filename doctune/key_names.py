"""Settings never hold a key, only where one lives: `api_key_env` names an environment variable and
`api_key_secret_block` a Prefect Secret block. A key pasted into `api_key_env` would be stored wherever the
settings are (a settings file, a deployment's or run's parameters in the Prefect database, shown in the UI),
and every message would scrub it to "[redacted]", so the user could not see the mistake: it is refused before
anything runs, with a message that never repeats it."""

from __future__ import annotations

import re

from pydantic import BaseModel

from doctune.settings import LLMSettings

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
KEY_PREFIX = re.compile(r"(?:sk|pk|rk|ak|hf|ghp|gho|github_pat|xox[abprs]|glpat)[-_]|AKIA")


def llm_settings_in(settings: BaseModel, where: str = "") -> list[tuple[str, LLMSettings]]:
    """Every LLMSettings inside `settings`, with its dotted place ('build.llm', 'eval.judge_llm')."""
    if isinstance(settings, LLMSettings):
        return [(where or "llm", settings)]
    found = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            found += llm_settings_in(value, f"{where}.{name}" if where else name)
    return found


def check_key_names(settings: BaseModel) -> None:
    """Raise ValueError when an `api_key_env` holds anything but an environment variable's name."""
    for where, llm in llm_settings_in(settings):
        name = llm.api_key_env
        if ENV_NAME.fullmatch(name) and not KEY_PREFIX.match(name):
            continue
        looks = "it looks like an API key" if KEY_PREFIX.match(name) or len(name) > 30 else "it is not a variable name"
        raise ValueError(
            f"{where}.api_key_env must name the environment variable that holds the key (like DOCTUNE_LLM_API_KEY), "
            f"but its {len(name)} characters are no such name: {looks}. Put the key in an environment variable "
            f"(export DOCTUNE_LLM_API_KEY=...) or a Prefect Secret block ({where}.api_key_secret_block) and name that "
            "here. If it was a real key, treat it as exposed wherever these settings were stored (a settings file, "
            "a deployment's or a run's parameters) and revoke it.")
