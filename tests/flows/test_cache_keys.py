"""What misses the cache: a run with only the endpoint's call settings changed misses nothing; an
edited prompt file or module misses exactly the tasks whose code reads it. The code is a copy in a
temp folder (prefect_utils.ROOT pointed at it), so the tests edit files without touching the tree."""

import asyncio
import re
import shutil
import uuid

import pytest

from doctune import prefect_utils
from doctune.settings import BuildSettings, LLMSettings, SynthSettings
from flows.build_dataset import build_dataset
from tests.endpoints import ScriptedEndpoint
from tests.flows.test_build_dataset import latest_table, task_states, write_docs

pytestmark = pytest.mark.usefixtures("prefect_server")
UNCACHED = {"preflight", "write_dataset_task", "prepare"}  # run every time by design (prepare caches per file)


def base_name(task_run_name: str) -> str:
    name = task_run_name.split(" ")[0] if task_run_name.startswith(("synthesize ", "prepare ", "preflight ")) \
        else re.sub(r"-\w{3}$", "", task_run_name)
    return task_run_name if name == "synthesize" else name


@pytest.fixture
def code_copy(tmp_path, monkeypatch):
    code = tmp_path / "code"
    for folder in ("doctune", "tasks", "flows", "prompts"):
        shutil.copytree(prefect_utils.ROOT / folder, code / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc"))
    monkeypatch.setattr(prefect_utils, "ROOT", code)
    prefect_utils.code_digest.cache_clear()
    prefect_utils.code_files_of.cache_clear()
    yield code
    prefect_utils.code_digest.cache_clear()
    prefect_utils.code_files_of.cache_clear()


def test_an_edit_misses_exactly_the_tasks_that_read_the_file(tmp_path, code_copy):
    server = ScriptedEndpoint(model=f"m-{uuid.uuid4().hex[:8]}")
    folder = write_docs(tmp_path / "docs")
    settings = BuildSettings(
        llm=LLMSettings(base_url=server.base_url, model=server.model, concurrency=2, max_retries=1),
        synth=SynthSettings(mode="fact", questions_per_fact=2, min_pairs=3), output_dir=str(tmp_path / "out"))

    def missed(settings) -> set[str]:
        state = build_dataset(str(folder), settings, return_state=True)
        assert state.is_completed(), state.message
        states = asyncio.run(task_states(state.state_details.flow_run_id))
        return {base_name(n) for n, s in states.items() if s != "Cached"} - UNCACHED

    def edit(relpath: str) -> None:
        path = code_copy / relpath
        path.write_text(path.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
        prefect_utils.code_digest.cache_clear()
        prefect_utils.code_files_of.cache_clear()

    def files_from_cache() -> int:
        return {r["what"]: r["count"] for r in asyncio.run(latest_table("ingest"))}["from the cache"]

    synthesis = {"synthesize handbook.md", "synthesize products.md", "synthesize faq.csv", "choose_mode_task",
                 # the exam reads fact mode's fact extraction and checks
                 "exam handbook.md", "exam products.md", "exam faq.csv"}
    try:
        # Tasks without the endpoint among their inputs (prepared files, cloze) may come from earlier tests' runs
        # over the same documents: the copy's code is the same until edited.
        assert missed(settings) >= synthesis | {"replay_task", "dedup_task"}
        n_calls = len(server.requests)

        # How the endpoint is called is no part of any result.
        tuned = settings.model_copy(deep=True)
        tuned.llm = tuned.llm.model_copy(update={"concurrency": 7, "timeout_s": 33.0, "max_retries": 2,
                                                 "task_retries": 0, "retry_delays_s": [1.0], "retry_jitter": 0.1,
                                                 "api_key_env": "SOME_OTHER_KEY_VARIABLE"})
        tuned.documents_at_once = 2
        assert missed(tuned) == set() and len(server.requests) == n_calls

        edit("prompts/replay.yaml")
        assert missed(settings) == {"replay_task"}
        edit("prompts/fact_questions.en.yaml")  # cloze imports synthesize's fact extraction
        assert missed(settings) == synthesis | {"cloze_task"}
        edit("prompts/judge.md")  # the evaluation's prompt: nothing here reads it
        assert missed(settings) == set()
        edit("prompts/exam_questions.en.yaml")  # the exam's own prompt: the training questions stay
        assert missed(settings) == {"exam handbook.md", "exam products.md", "exam faq.csv"}
        edit("doctune/llm.py")  # every task that talks to an endpoint, and those importing them
        assert missed(settings) == synthesis | {"cloze_task", "replay_task", "dedup_task"}
        assert files_from_cache() == 3
        edit("tasks/chunk.py")  # every file is chunked again
        assert missed(settings) == synthesis | {"cloze_task"} and files_from_cache() == 0
    finally:
        server.close()
