"""Prefect conventions shared by every task module."""

from __future__ import annotations

import hashlib
import importlib.util
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
        return code_digest(module_file(task_ctx.task.fn))


def module_file(fn) -> str:
    """The file of the module `fn` is defined in. By module name, not inspect.getsourcefile: a task
    shipped to a Dask worker is unpickled from code objects whose file reads '<dynamic-code>'."""
    try:
        spec = importlib.util.find_spec(fn.__module__)
    except (ValueError, ImportError):  # __main__, or a module that is not importable by name
        spec = None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return inspect.getsourcefile(fn)
    return spec.origin


# Inputs are records or content hashes, never a bare path, so a changed file misses the cache;
# ModuleSource makes a code or prompt change miss it too.
CACHE = INPUTS + ModuleSource()

# Tasks that talk to a network endpoint retry a bounded number of times.
NETWORK_RETRIES = dict(retries=2, retry_delay_seconds=[5, 30])


def synthesis_runner(runner: str, workers: int, dask_address: str | None = None):
    """The task runner documents are synthesized on (a context manager): a thread pool, or Dask
    (prefect-dask), either a running scheduler or a local in-process cluster of `workers` threads."""
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": workers, "processes": False,
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)
