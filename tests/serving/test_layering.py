"""The serving package's dependency direction holds: api -> handlers -> engine -> {batch, embedding,
sampling, kv_cache, attention, loading, jobs}. The engine, and everything it imports, knows no HTTP: neither
the wire format (protocol), the app (api), the handlers, nor fastapi/starlette. Imports are absolute,
since the cache digest scanner skips relative ones."""

from __future__ import annotations

import ast
from pathlib import Path

import doctune.serving

SERVING = Path(doctune.serving.__file__).parent
HTTP = {"doctune.serving.protocol", "doctune.serving.api", "doctune.serving.handlers", "doctune.serving",
        "fastapi", "starlette"}


def imports(module: str) -> set[str]:
    """The absolute module names `doctune/serving/<module>.py` imports (`from a import b`: a and a.b)."""
    tree = ast.parse((SERVING / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def knows_http(name: str) -> bool:
    return any(name == h or (h != "doctune.serving" and name.startswith(h + ".")) for h in HTTP)


def test_the_engine_and_what_it_imports_know_no_http():
    seen, todo = set(), ["engine"]
    while todo:
        module = todo.pop()
        seen.add(module)
        names = imports(module)
        assert not [n for n in names if knows_http(n)], f"doctune/serving/{module}.py imports HTTP code"
        todo += [n.split(".")[2] for n in names if n.startswith("doctune.serving.") and n.count(".") == 2
                 and (SERVING / f"{n.split('.')[2]}.py").exists() and n.split(".")[2] not in seen]
    assert {"engine", "batch", "embedding", "sampling", "kv_cache", "attention", "loading", "jobs"} <= seen


def test_no_relative_imports_in_the_package():
    for path in SERVING.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        relative = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
        assert not relative, f"{path.name}: relative imports at lines {relative}; the digest scanner skips them"
