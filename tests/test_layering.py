"""Which way imports go: bench -> flows -> tasks -> doctune (the library). doctune/cli.py is the face and
may start flows; no other library module reaches up into the stages. And which files a task's cache key
digests: the model side must never re-key the build stages' caches (LLM synthesis of every document)."""

import ast
from pathlib import Path

import pytest

from doctune.prefect_utils import code_files

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted(p for p in (ROOT / "doctune").rglob("*.py") if p.name != "cli.py" or p.parent.name != "doctune")
BUILD_TASKS = ["ingest", "chunk", "prepare", "synthesize", "cloze", "passages", "translate", "replay", "dedup",
               "dataset"]
MODEL_SIDE = ["doctune/model_settings.py", "doctune/runs.py", "doctune/serving", "doctune/training"]


def imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import in the file, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def test_the_library_never_imports_stages():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in LIBRARY for line, mod, _ in imports(p)
             if mod.split(".")[0] in ("tasks", "flows")]
    assert not wrong, "library modules must not import tasks/ or flows/ (move the shared part down):\n" + "\n".join(wrong)


def test_tasks_never_import_flows():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in sorted((ROOT / "tasks").glob("*.py"))
             for line, mod, _ in imports(p) if mod.split(".")[0] == "flows"]
    assert not wrong, "\n".join(wrong)


def test_project_code_uses_absolute_imports():
    # The cache-key scanner (code_files) follows absolute imports only: a relative one would leave its
    # file out of a task's digest, and a fix there would keep serving results of the old code.
    files = LIBRARY + sorted((ROOT / "tasks").glob("*.py")) + sorted((ROOT / "flows").glob("*.py"))
    wrong = [f"{p.relative_to(ROOT)}:{line}" for p in files for line, _, level in imports(p) if level]
    assert not wrong, "relative imports: " + ", ".join(wrong)


@pytest.mark.parametrize("task", ["train", "evaluate", "export"])
def test_model_side_task_digests_cover_the_library_they_use(task):
    files = {str(p.relative_to(ROOT)) for p in code_files(ROOT / "tasks" / f"{task}.py", ROOT)}
    assert {"doctune/model_settings.py", "doctune/runs.py"} <= files
    if task == "train" and (ROOT / "doctune" / "training").is_dir():
        training = {str(p.relative_to(ROOT)) for p in (ROOT / "doctune" / "training").glob("*.py")
                    if p.name != "__init__.py"}
        assert training <= files, f"not in train_task's cache key: {sorted(training - files)}"


@pytest.mark.parametrize("task", BUILD_TASKS)
def test_build_task_digests_leave_the_model_side_out(task):
    files = [str(p.relative_to(ROOT)) for p in code_files(ROOT / "tasks" / f"{task}.py", ROOT)]
    wrong = [f for f in files if any(f == m or f.startswith(m + "/") for m in MODEL_SIDE)
             or f.startswith(("tasks/train", "tasks/evaluate", "tasks/export"))]
    assert not wrong, f"tasks/{task}.py's cache key digests model-side code: {wrong}"
