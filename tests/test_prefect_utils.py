"""The cache policy: inputs plus the code and prompts a task builds on."""

from __future__ import annotations

import random
from pathlib import Path

from prefect import flow, task

from doctune.prefect_utils import CACHE, code_digest
from tasks import synthesize


def test_code_digest_follows_the_module_text(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text("def keep(q):\n    return q.endswith('?')\n")
    first = code_digest(module)
    assert code_digest(module) == first
    other = tmp_path / "stage2.py"
    other.write_text("def keep(q):\n    return q.endswith(('?', '？'))\n")  # a helper fixed
    assert code_digest(other) != first
    assert code_digest(synthesize.__file__) not in (first, code_digest(other))


calls = []


@task(cache_policy=CACHE, persist_result=True)
def double(x: int) -> int:
    calls.append(x)
    return 2 * x


def test_a_task_with_the_policy_is_cached_on_its_inputs(prefect_server):
    @flow
    def twice(x: int) -> tuple[int, int]:
        return double(x), double(x)

    x = random.randrange(10**12)  # new each run, so no earlier run's cached result answers
    assert twice(x) == (2 * x, 2 * x)
    assert calls.count(x) == 1


def test_code_files_follow_imports_and_name_only_the_prompts_a_module_loads():
    from doctune.prefect_utils import ROOT, code_files

    def files(module: str) -> set[str]:
        return {str(p.relative_to(ROOT)) for p in code_files(ROOT / "tasks" / f"{module}.py")}

    assert files("chunk") == {"tasks/chunk.py", "doctune/prefect_utils.py", "doctune/records.py", "doctune/settings.py",
                              "doctune/tables.py"}
    synth = files("synthesize")
    assert {"tasks/chunk.py", "doctune/llm.py", "doctune/metrics.py", "prompts/fact_questions.en.yaml",
            "prompts/fact_questions.zh.yaml", "prompts/qa_pairs.en.yaml", "prompts/qa_pairs.zh.yaml"} <= synth
    assert not {p for p in synth if p.startswith("prompts/")} & {"prompts/judge.md", "prompts/replay.yaml"}
    assert {p for p in files("evaluate") if p.startswith("prompts/")} == {"prompts/judge.md", "prompts/judge_zh.md",
                                                                          "prompts/general_check.yaml"}
    exam = files("exam")  # its own prompts, and fact mode's (it reads fact mode's checks), never the judge's
    assert {"prompts/exam_questions.en.yaml", "prompts/exam_questions.zh.yaml", "prompts/cloze.yaml",
            "prompts/fact_questions.en.yaml"} <= exam and "prompts/judge.md" not in exam


class _Recording:
    """Stands in for prompts/ and notes which task module opened which prompt file (`task`: the module
    whose task reads through library code called outside a task frame, such as the judge's threads)."""

    def __init__(self, real, seen, task: str | None = None):
        self.real, self.seen, self.task = real, seen, task

    def __truediv__(self, name):
        import inspect

        from doctune.prefect_utils import ROOT

        caller = next((f.filename for f in inspect.stack()[1:] if f.filename.startswith(str(ROOT / "tasks"))),
                      self.task)
        path = self.real / name
        self.seen.add((caller, path))
        return path

    def glob(self, pattern):
        return self.real.glob(pattern)


def test_every_prompt_a_task_reads_is_in_its_cache_key(tmp_path, monkeypatch, prefect_server):
    """The guard for code_files' prompt scan: run the whole build (translation on) and the judge's
    prompts, note each prompt file read and by which task module, and check it is one of that
    module's code_files. A prompt loaded under a name the scan cannot see would fail here."""
    from doctune import prompts
    from doctune.prefect_utils import code_files
    from doctune.settings import BuildSettings, LLMSettings, SynthSettings, TranslateSettings
    from flows.build_dataset import build_dataset
    from doctune import judge
    from doctune.prefect_utils import ROOT
    from tests.endpoints import ScriptedEndpoint
    from tests.flows.test_build_dataset import write_docs

    seen: set = set()
    monkeypatch.setattr(prompts, "PROMPTS_DIR", _Recording(prompts.PROMPTS_DIR, seen))
    # The judge's prompts are read by the evaluate task (through doctune/judge.py, on its own threads).
    monkeypatch.setattr(judge, "PROMPTS_DIR", _Recording(judge.PROMPTS_DIR, seen, str(ROOT / "tasks" / "evaluate.py")))
    prompts.load_prompt.cache_clear()
    server = ScriptedEndpoint(model=f"prompts-{random.randrange(10**9)}")
    folder = write_docs(tmp_path / "docs")
    # A document of its own: tasks without the endpoint among their inputs (cloze, passages) would
    # otherwise come from earlier tests' caches and read no prompt.
    (folder / "unique.md").write_text(f"# Vault\n\nThe Brekke vault code is {random.randrange(10**9)}.\n")
    try:
        for mode in ("fact", "qa"):
            build_dataset(str(folder), BuildSettings(
                llm=LLMSettings(base_url=server.base_url, model=server.model, max_retries=0),
                synth=SynthSettings(mode=mode, min_pairs=1, min_keep_share=0), translate=TranslateSettings(enabled=True),
                output_dir=str(tmp_path / mode)))
        for language in ("en", "zh"):
            judge.judge_prompt("q", "reference", "reply", language)
    finally:
        server.close()
        prompts.load_prompt.cache_clear()
    read = {path.name for _, path in seen}
    assert {"fact_questions.en.yaml", "qa_pairs.en.yaml", "translate.yaml", "replay.yaml", "cloze.yaml",
            "passages.yaml", "judge.md", "judge_zh.md", "exam_questions.en.yaml"} <= read
    for module, path in seen:
        assert path.resolve() in code_files(module), f"{module} reads {path.name}, which is not in its cache key"


edited_calls = []


@task(cache_policy=CACHE, persist_result=True)
def triple(x: int) -> int:
    edited_calls.append(x)
    return 3 * x


def test_a_task_whose_loaded_code_was_edited_since_runs_uncached(prefect_server, monkeypatch):
    """A flow still running while its code is edited runs the old code: a result filed under the new code's
    digest would answer the next run of the new code with the old code's result."""
    from doctune import prefect_utils

    @flow
    def thrice(x: int) -> int:
        return triple(x)

    x = random.randrange(10**12)
    assert thrice(x) == 3 * x and thrice(x) == 3 * x
    assert edited_calls.count(x) == 1  # cached while the code on disk is the code loaded
    here = Path(__file__).resolve()
    assert prefect_utils.edited_since_loaded([here]) == []
    monkeypatch.setattr(prefect_utils, "_LOADED_AT", here.stat().st_mtime - 1)  # as if edited after loading
    assert prefect_utils.edited_since_loaded([here]) == [here]
    assert thrice(x) == 3 * x and thrice(x) == 3 * x
    assert edited_calls.count(x) == 3  # each run computed anew, none answered from (or filed into) the cache
