"""The nightly deployment end to end on real parts: the session's Prefect server, the project's own
scripts/services.sh starting both work pools' workers and deploying prefect.yaml, a scripted
OpenAI-compatible endpoint on loopback, a tiny random Llama trained for a few steps on the gpu pool."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName,
                                            FlowRunFilter, FlowRunFilterParentFlowRunId)
from prefect.deployments import run_deployment

from doctune.records import read_jsonl
from doctune.registry import read_current, read_decisions
from tests.flows.test_build_dataset import latest_artifact, task_states, write_docs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

GOLD = [
    {"id": "g1", "question": "When does the Brekke office open?", "answer": "At 7:45 every weekday.",
     "facts": ["7:45"], "language": "en"},
    {"id": "g2", "question": "What does the Vindel lamp cost?", "answer": "349 crowns.", "facts": ["349"],
     "language": "en"},
]


def services(env: dict, *args: str) -> str:
    done = subprocess.run(["bash", str(ROOT / "scripts/services.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Both pools' workers and the deployments, through the project's own script, on the test server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(home),
           "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
           "DOCTUNE_RUN_DIR": str(home / "run"), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "OMP_NUM_THREADS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "DOCTUNE_ZOMBIE_AFTER_S": "75"}
    print(services(env, "up", "workers", "deploy"))
    yield env
    services(env, "down")
    for log in sorted((home / "run").glob("worker-*.log")):
        print(f"--- {log.name}\n{log.read_text()[-3000:]}")


def nightly_parameters(folder: Path, out: Path, endpoint, tiny_model: str) -> dict:
    # The folder's own gold/, found by the deployment's gold_path: auto (no path passed).
    gold = folder / "gold" / "gold.jsonl"
    gold.parent.mkdir(parents=True, exist_ok=True)
    gold.write_text("".join(json.dumps(g) + "\n" for g in GOLD))
    return {"folder": str(folder), "settings": {
        "build": {"llm": {"base_url": endpoint.base_url, "model": endpoint.model, "max_retries": 1},
                  "synth": {"mode": "fact", "questions_per_fact": 2, "min_pairs": 3, "replay_share": 0}},
        "train": {"base_model": tiny_model, "max_steps": 4, "per_device_batch_size": 4, "lora_r": 4,
                  "lora_alpha": 8, "device": "cpu", "cpu_dtype": "fp32", "save_every_steps": 2, "logging_steps": 1},
        # A random model learns no facts: margin 0 lets a tie promote, so the promotion path runs.
        "eval": {"max_new_tokens": 8, "max_test_examples": 4, "promotion_margin": 0.0},
        # Off by default; a random model misses every exam question, so test_the_loop_... turns it on itself.
        "loop": {"max_rounds": 0},
        "output_dir": str(out)}}


async def _children(parent_id) -> list:
    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


async def _train_runs() -> list:
    async with get_client() as client:
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))


def run_nightly(params: dict):
    run = run_deployment("nightly/nightly", parameters=params, timeout=600, poll_interval=2)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    return run, run.state.result()


def test_nightly_deployment_trains_on_the_gpu_pool_then_stops_early_then_retrains_one_change(
        workers, tmp_path, scripted, tiny_model):
    folder, out = write_docs(tmp_path / "docs"), tmp_path / "out"
    params = nightly_parameters(folder, out, scripted, tiny_model)

    # The deployments as prefect.yaml writes them, the schedule as stored on the server.
    async def deployments():
        async with get_client() as client:
            deps = await client.read_deployments()
            pool = await client.read_work_pool("gpu")
            return {f"{d.name}": d for d in deps}, pool
    deps, gpu = asyncio.run(deployments())
    assert set(deps) == {"nightly", "build-dataset", "train", "evaluate"}
    assert gpu.concurrency_limit == 1
    assert deps["train"].work_pool_name == deps["evaluate"].work_pool_name == "gpu"
    assert deps["nightly"].work_pool_name == "cpu"
    # One nightly at a time; a second one (from the UI, or a late schedule) waits for the first.
    limit, options = deps["nightly"].global_concurrency_limit, deps["nightly"].concurrency_options
    assert (limit.limit, options.collision_strategy.value) == (1, "ENQUEUE")
    (schedule,) = deps["nightly"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)

    # 1. First night: a dataset, a training child on the gpu pool, an evaluation child, a promotion.
    run, result = run_nightly(params)
    assert result["status"] == "promoted", result
    children = {c.name: c for c in asyncio.run(_children(run.id))}
    kinds = sorted(c.deployment_id == deps["train"].id and "train" or c.deployment_id == deps["evaluate"].id
                   and "evaluate" or "build" for c in children.values())
    assert kinds == ["build", "evaluate", "train"], kinds
    train_child = next(c for c in children.values() if c.deployment_id == deps["train"].id)
    assert train_child.work_pool_name == "gpu" and train_child.state.is_completed()
    current = read_current(out / "registry" / "docs")
    assert current["run_dir"] == result["run_dir"]
    # Judged on the folder's own gold questions, as copied under outputs/gold/ for the gpu pool.
    (copy,) = (out / "gold").glob("*.jsonl")
    assert copy.read_bytes() == (folder / "gold" / "gold.jsonl").read_bytes()
    assert {r["set"] for r in result["metrics"]} >= {"gold"} and current["gold_sha256"].startswith(copy.stem)
    # The exam the build made beside the dataset is scored too; gold decides when the folder has both.
    assert (Path(result["dataset_dir"]) / "exam.jsonl").exists() and "exam" in {r["set"] for r in result["metrics"]}
    assert current["set"] == "gold" and "95%" in result["reason"]
    assert (Path(result["run_dir"]) / "checkpoints").is_dir()  # save_every_steps: 2 wrote checkpoints
    facts_first = scripted.calls["fact"]
    registry = asyncio.run(latest_artifact("model-registry-docs"))
    assert Path(result["run_dir"]).name in registry and "**yes**" in registry
    assert Path(result["dataset_dir"]).name in registry
    assert "promoted" in asyncio.run(latest_artifact("nightly-summary-docs"))
    for key in ("train-loss", "eval-metrics", "promotion-decision", "dedup-counts", "sample-pairs"):
        assert asyncio.run(artifact_count(key)) >= 1, key

    # 2. Unchanged folder: the dataset is cached, no LLM call, no training child, the model stays.
    trained = len(asyncio.run(_train_runs()))
    run2, result2 = run_nightly(params)
    assert result2["status"] == "unchanged" and "documents unchanged since" in result2["reason"]
    assert scripted.calls["fact"] == facts_first
    assert len(asyncio.run(_train_runs())) == trained
    assert read_current(out / "registry" / "docs")["run_dir"] == current["run_dir"]

    # 3. One document edited: only its chunks are synthesized again, and a new candidate is evaluated.
    products = folder / "products.md"
    products.write_text(products.read_text() + "The Fjord kettle boils water in 90 seconds.\n")
    run3, result3 = run_nightly(params)
    assert result3["status"] in ("promoted", "not promoted") and result3["run_dir"] != current["run_dir"]
    assert len(asyncio.run(_train_runs())) == trained + 1
    build3 = next(c for c in asyncio.run(_children(run3.id)) if c.deployment_id is None)
    states = asyncio.run(task_states(build3.id))
    synth = {name: state for name, state in states.items() if name.startswith("synthesize ")}
    assert synth == {"synthesize products.md": "Completed", "synthesize handbook.md": "Cached",
                     "synthesize faq.csv": "Cached"}, synth
    assert 0 < scripted.calls["fact"] - facts_first < facts_first
    assert [d["candidate"] for d in read_decisions(out / "registry" / "docs")] == [current["run_dir"], result3["run_dir"]]
    # The served model answered tonight's questions beside the candidate, and the decision compares the two.
    assert all("current" in r for r in result3["metrics"]) and "vs current" in result3["reason"]

    # 4. A second folder on the same output folder is another model with its own registry: it is compared with
    #    the base, never with the first folder's model, and an unchanged second night trains nothing.
    other = write_docs(tmp_path / "Other Docs")
    (other / "extra.md").write_text("# Extra\n\nThe Lunde depot stores 310 pallets.\n")
    params2 = {**params, "folder": str(other)}
    _, first_other = run_nightly(params2)
    assert first_other["model_name"] == "other-docs" and first_other["status"] == "promoted", first_other
    assert "vs base" in first_other["reason"]
    assert read_current(out / "registry" / "other-docs")["run_dir"] == first_other["run_dir"]
    docs_current = read_current(out / "registry" / "docs")
    assert docs_current["run_dir"] in (current["run_dir"], result3["run_dir"])  # untouched by the other model
    trained, facts = len(asyncio.run(_train_runs())), scripted.calls["fact"]
    _, again = run_nightly(params2)
    assert again["status"] == "unchanged" and scripted.calls["fact"] == facts
    assert len(asyncio.run(_train_runs())) == trained
    assert "other-docs" in asyncio.run(latest_artifact("model-registry-other-docs"))


def test_the_loop_gives_only_the_missed_facts_new_questions_then_stops_and_costs_nothing(
        workers, tmp_path, scripted, tiny_model):
    from doctune.loop import loop_targets, read_loop
    from tasks.dedup import jaccard, normalize, shingles

    folder, out = write_docs(tmp_path / "docs"), tmp_path / "out"
    params = nightly_parameters(folder, out, scripted, tiny_model)
    params["settings"]["loop"] = {"max_rounds": 2, "questions_per_fact": 2}
    params["settings"]["exam"] = {"facts_per_question": 2}
    registry = out / "registry" / "docs"

    # Night 1: trained and evaluated; the random model misses the exam, so round 1 opens for those facts.
    _, first = run_nightly(params)
    assert first["status"] == "promoted", first
    misses = json.loads((registry / "misses.json").read_text())["misses"]
    exam = [json.loads(line) for line in (Path(first["dataset_dir"]) / "exam.jsonl").read_text().splitlines()]
    assert misses and {m["id"] for m in misses} <= {e["id"] for e in exam}
    targets = loop_targets(registry)
    assert {t["fact"] for t in targets} == {m["fact"] for m in misses} and {t["round"] for t in targets} == {1}
    assert any(r["status"] == "open" for r in first["loop"])

    # Night 2, folder unchanged: new questions for exactly the missed facts, none near an exam question; trained.
    facts_before = len(scripted.facts)
    trained = len(asyncio.run(_train_runs()))
    _, second = run_nightly(params)
    asked = scripted.facts[facts_before:]
    assert asked and all(any(t["fact"] in prompt for t in targets) for prompt in asked)
    assert len(asked) == 2 * len([t for t in targets if t["language"] == "en"])
    assert second["dataset_dir"] != first["dataset_dir"] and len(asyncio.run(_train_runs())) == trained + 1
    rows = read_jsonl(Path(second["dataset_dir"]) / "train.messages.jsonl")
    questions = [r["messages"][-2]["content"] for r in rows]
    new = set(questions) - {r["messages"][-2]["content"]
                            for r in read_jsonl(Path(first["dataset_dir"]) / "train.messages.jsonl")}
    assert new
    exam_shingles = [shingles(normalize(e["question"]), 5) for e in exam]
    assert all(jaccard(shingles(normalize(q), 5), e) < 0.5 for q in new for e in exam_shingles)
    assert json.loads((Path(second["dataset_dir"]) / "manifest.json").read_text())["counts"]["loop_pairs"] > 0
    # The random model gained nothing: every document stops after round 1.
    docs = read_loop(registry)["documents"]
    assert docs and all(d["stopped"] for d in docs.values()), docs
    assert asyncio.run(artifact_count("loop-rounds-docs")) >= 1

    # Night 3: the loop does not move, so the dataset is night 2's from the cache: no LLM call, no training.
    calls = sum(scripted.calls.values())
    _, third = run_nightly(params)
    assert third["status"] == "unchanged", third
    assert sum(scripted.calls.values()) == calls and len(asyncio.run(_train_runs())) == trained + 1


def test_a_worker_killed_mid_training_leaves_the_promoted_model_and_the_rerun_resumes(
        workers, tmp_path, scripted, tiny_model):
    folder, out = write_docs(tmp_path / "docs"), tmp_path / "out"
    params = nightly_parameters(folder, out, scripted, tiny_model)
    params["settings"]["train"].update(max_steps=400, save_every_steps=5)
    # A promoted model that tonight's candidate cannot beat (a perfect gold score on this gold file).
    from doctune.records import sha256_bytes

    registry = out / "registry" / "docs"  # the model is named after its folder
    registry.mkdir(parents=True)
    current = {"run_dir": str(out / "models" / "earlier"), "base_model": tiny_model, "metric": "fact_recall",
               "score": 1.0, "gold_sha256": sha256_bytes((folder / "gold" / "gold.jsonl").read_bytes()),
               "dataset_sha256": "0" * 64, "promoted_at": "2026-12-01T02:00:00+00:00", "previous": None,
               "scores": {"gold/all/fact_recall": 1.0}}
    (registry / "current.json").write_text(json.dumps(current))
    before = (registry / "current.json").read_bytes()

    parent = run_deployment("nightly/nightly", parameters=params, timeout=0)
    deadline = time.monotonic() + 300
    while not list(out.glob("models/*/checkpoints/step-*")):
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    pid = int((Path(workers["DOCTUNE_RUN_DIR"]) / "worker-gpu.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the worker and the training process it started, as a dying machine would
    (run_dir,) = [p.parent.parent for p in out.glob("models/*/checkpoints/step-*")][:1]
    assert not (run_dir / "run.json").exists()

    # The heartbeat automation marks the training run Crashed; the nightly run fails and says why.
    async def final(run_id):
        async with get_client() as client:
            while True:
                run = await client.read_flow_run(run_id)
                if run.state.is_final():
                    return run
                await asyncio.sleep(2)
    failed = asyncio.run(asyncio.wait_for(final(parent.id), 300))
    assert failed.state.is_failed(), failed.state
    assert "The promoted model is unchanged" in failed.state.message and "Crashed" in failed.state.message
    assert (registry / "current.json").read_bytes() == before

    # Workers back, nightly again: training continues from the checkpoint; the model stays.
    services(workers, "up", "workers")
    _, result = run_nightly(params)
    assert result["status"] == "not promoted" and result["run_dir"] == str(run_dir), result
    assert (registry / "current.json").read_bytes() == before
    trains = sorted(asyncio.run(_train_runs()), key=lambda r: r.created)
    assert [r.state.name for r in trains[-2:]] == ["Crashed", "Completed"]
    logs = asyncio.run(flow_logs(trains[-1].id))
    assert any(f"resuming {run_dir} from step-" in line for line in logs), logs[-20:]
    assert len(json.loads((run_dir / "metrics.json").read_text())["losses"]) == 400


async def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


async def artifact_count(key: str) -> int:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        return len(await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))
