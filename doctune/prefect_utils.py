"""Prefect conventions shared by every task module."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import logging
import sys
import threading
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import CachePolicy, Inputs
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("doctune", "tasks", "flows")
# When this process loaded the project's code: prefect_utils comes in with the first task module.
_LOADED_AT = time.time()
log = logging.getLogger(__name__)


def _module_path(name: str, root: Path) -> Path | None:
    """The file of project module `name` (a.b.c → a/b/c.py or a/b/c/__init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports_and_strings(path: Path) -> tuple[set[str], set[str]]:
    """Project modules a file imports (anywhere, function bodies too) and its string constants
    (docstrings left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    modules, strings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.add(node.value)
    return {m for m in modules if m.split(".")[0] in PACKAGES}, strings


def code_files(module_file: str | Path, root: Path | None = None) -> list[Path]:
    """The files a task's result can depend on: its module, every project module it imports
    (transitively), and the prompt files named by a module that loads prompts: a string that is
    the file's name up to its first dot ("fact_questions" or f"fact_questions.{language}" for
    fact_questions.en.yaml and .zh.yaml) or its whole name ("judge.md"). Editing the chunker's
    helper must miss the chunk cache; editing the judge's prompt must not re-synthesize anything."""
    root = root or ROOT
    seen: set[Path] = set()
    names: set[str] = set()
    todo = [Path(module_file).resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        modules, strings = _imports_and_strings(path)
        if "doctune.prompts" in modules:
            names |= strings
        todo += [p for m in modules if (p := _module_path(m, root)) is not None]
    for prompt in (root / "prompts").glob("*"):
        stem = prompt.name.split(".")[0]
        if prompt.is_file() and any(n == prompt.name or n == stem or n.startswith(stem + ".") for n in names):
            seen.add(prompt)
    return sorted(seen)


_DIGEST_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def code_files_of(module_file: str | Path, root: Path | None = None) -> tuple[Path, ...]:
    """`code_files`, once per module and process (every task run asks). One thread parses at a time: task runs
    started side by side ask at once, and Python 3.11's ast.parse fails when two threads parse together ("AST
    constructor recursion depth mismatch"): that run's result would not be persisted, and the next night would
    repeat its LLM calls."""
    with _DIGEST_LOCK:
        return tuple(code_files(module_file, root))


@lru_cache(maxsize=None)
def code_digest(module_file: str | Path, root: Path | None = None) -> str:
    """sha256 over `code_files_of`, once per module and process."""
    root = root or ROOT
    h = hashlib.sha256()
    for f in code_files_of(module_file, root):
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def edited_since_loaded(files) -> list[Path]:
    """The files among `files` that this process loaded a module from and that changed on disk since it
    started: a flow still running while its code is edited. Asked on every task run, so the loaded modules
    are only looked through when a file is newer than the process."""
    newer = [f for f in files if f.stat().st_mtime > _LOADED_AT]
    if not newer:
        return []
    loaded = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    return [f for f in newer if f in loaded]


class ModuleSource(CachePolicy):
    """Like Prefect's TASK_SOURCE, but over the task's module, the project modules it imports and
    the prompts they name: TASK_SOURCE hashes only the task function's own lines, so a fix in a
    helper it calls (a filter, a parser) would keep serving results computed by the old code."""

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters: Optional[dict[str, Any]],
                    **kwargs: Any) -> Optional[str]:
        if not task_ctx:
            return None
        fn = task_ctx.task.fn
        # By module name under ROOT: the same file for a task shipped to a Dask worker.
        path = _module_path(fn.__module__, ROOT) or module_file(fn)
        if edited := edited_since_loaded(code_files_of(path, ROOT)):
            # The code on disk is not the code this process runs: a result filed under the disk's digest
            # would answer later runs of the new code with what the old code computed. A key of its own
            # misses the cache and is never asked for again (None would leave the inputs alone as the key).
            log.warning("%s changed after this process loaded it: %s runs uncached (restart the process to "
                        "cache it again)", ", ".join(sorted(f.name for f in edited)), fn.__name__)
            return f"edited-since-loaded-{uuid.uuid4().hex}"
        return code_digest(path, ROOT)


class OutputInputs(CachePolicy):
    """Prefect's INPUTS, except that a settings object with a `cache_view()` is hashed by what that
    returns: the fields that change a result. Tuning an endpoint's concurrency, timeout or retries
    must not re-synthesize every document. (Not a subclass of Inputs: Prefect replaces every Inputs
    in a compound policy by a plain one.)"""

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters: Optional[dict[str, Any]],
                    **kwargs: Any) -> Optional[str]:
        inputs = {k: _cache_view(v) for k, v in (inputs or {}).items()}
        return Inputs().compute_key(task_ctx, inputs, flow_parameters, **kwargs)


def _cache_view(value: Any) -> Any:
    """`value.cache_view()`, or a settings model with such a field (EvalSettings.judge_llm) as a
    dict of its fields' views; anything else as it is, for Prefect's own hashing."""
    if hasattr(value, "cache_view"):
        return value.cache_view()
    if isinstance(value, BaseModel):
        fields = {name: getattr(value, name) for name in type(value).model_fields}
        if any(_has_view(v) for v in fields.values()):
            return {"__model__": type(value).__qualname__, **{k: _cache_view(v) for k, v in fields.items()}}
    return value


def _has_view(value: Any) -> bool:
    return hasattr(value, "cache_view") or (
        isinstance(value, BaseModel) and any(_has_view(getattr(value, n)) for n in type(value).model_fields))


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
CACHE = OutputInputs() + ModuleSource()


def network_retries(llm) -> dict:
    """Prefect retry options for a task that talks to `llm`'s endpoint (LLMSettings.task_retries,
    retry_delays_s, retry_jitter): spaced out, so an endpoint restarting overnight gets time to come
    back, and jittered, so runs that failed together do not all come back at the same second. An
    error retrying cannot fix (a refused key, an unknown model) fails at once."""
    return dict(retries=llm.task_retries, retry_delay_seconds=list(llm.retry_delays_s),
                retry_jitter_factor=llm.retry_jitter or None, retry_condition_fn=_worth_retrying)


def _worth_retrying(task, task_run, state) -> bool:
    # Prefect hands over the exception as the failed state's data.
    return getattr(state.data, "transient", True) if isinstance(state.data, BaseException) else True


def with_network_retries(task, llm):
    """`task` as called against `llm`'s endpoint: its retries follow the settings of the run."""
    return task.with_options(**network_retries(llm))


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
