"""Prefect conventions shared by every task module."""

from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import INPUTS, CachePolicy

ROOT = Path(__file__).resolve().parent.parent
# Code and prompts every task module builds on: a change to any of them can change a result.
SHARED = [ROOT / "doctune", ROOT / "prompts"]


@lru_cache(maxsize=None)
def code_digest(module_file: str | Path) -> str:
    """sha256 of the task's module file, every doctune/*.py and every prompt file; read once per
    module and process (every task run asks for it)."""
    files = {Path(module_file).resolve()}
    for folder in SHARED:
        files |= {p for p in folder.rglob("*") if p.suffix in (".py", ".yaml", ".md") and p.is_file()}
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class ModuleSource(CachePolicy):
    """Like Prefect's TASK_SOURCE, but over the whole module the task is defined in and the shared
    code and prompts: TASK_SOURCE hashes only the task function's own lines, so a fix in a helper
    it calls (a filter, a parser) would keep serving results computed by the old code."""

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters: Optional[dict[str, Any]],
                    **kwargs: Any) -> Optional[str]:
        if not task_ctx:
            return None
        return code_digest(inspect.getsourcefile(task_ctx.task.fn))


# Inputs are records or content hashes, never a bare path, so a changed file misses the cache;
# ModuleSource makes a code or prompt change miss it too.
CACHE = INPUTS + ModuleSource()

# Tasks that talk to a network endpoint retry a bounded number of times.
NETWORK_RETRIES = dict(retries=2, retry_delay_seconds=[5, 30])
