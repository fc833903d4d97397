"""nightly: document folder → dataset → (training on the gpu pool → evaluation → promotion), or an early
stop when the documents did not change. Only orchestration lives here: every stage is its own flow or task.

Training runs as a run of the `train` deployment, so the GPU part can live on another machine; this run
waits for it. A failed, crashed or cancelled child leaves the promoted model untouched, and running
nightly again resumes: the dataset is cached and training continues from its last checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_UI_URL

from doctune import artifacts
from doctune.key_names import check_key_names
from doctune.logs import our_loggers_at_info
from doctune import local_llm
from doctune.nightly import (NightlySettings, build_settings, child_failure, loop_after_evaluation,
                             loop_without_training, model_name, nothing_new, registry_dir, resolve_gold,
                             summary_markdown, train_settings)
from doctune.registry import artifact_key, publish_registry, read_decisions
from doctune.runs import dataset_hash, run_dir_for
from doctune.training.length import expected_training
from flows.build_dataset import build_dataset
from flows.evaluate import evaluate
from flows.export import export_model
from tasks.evaluate import EvalReport, metrics_table


def _run_child(kind: str, name: str, parameters: dict, settings: NightlySettings):
    child = run_deployment(name, parameters=parameters, timeout=settings.child_timeout_s)
    if child.state is None or not child.state.is_completed():
        raise RuntimeError(child_failure(kind, child, PREFECT_UI_URL.value()))
    return child


@flow(name="nightly", log_prints=True)
def nightly(folder: str = "data/docs", settings: NightlySettings = NightlySettings()) -> dict:
    """Retrain from a document folder and promote tonight's model only if it is better."""
    our_loggers_at_info()
    log = get_run_logger()
    check_key_names(settings)  # every endpoint's api_key_env: a name, never a key
    name = model_name(folder, settings)  # one registry per model: two folders never compare against each other
    out, registry = settings.output_dir, registry_dir(settings, name)
    log.info("model %r: registry %s; `doctune serve` offers it as promoted/%s", name, registry, name)

    # 1. Dataset (cached per document). The local model server, if we start it, is gone before training.
    build = build_settings(settings)
    with local_llm.serving(build.llm, start=settings.local_llm == "auto", log_dir=Path(out) / "logs") as how:
        log.info("synthesis endpoint: %s", how)
        dataset_dir = build_dataset(folder, build, settings.exam, settings.loop,
                                    str(registry) if settings.loop.max_rounds else None)
    ds_sha = dataset_hash(dataset_dir)
    # The folder's own gold questions (gold_path 'auto'), found before any training is spent; without them the
    # exam beside the dataset decides (tasks/exam.py).
    gold = resolve_gold(folder, settings)
    log.info("gold questions: %s", f"{gold} (gold_path {settings.gold_path!r})" if gold else
             f"none (gold_path {settings.gold_path!r}); the exam made from the documents decides" +
             ("" if settings.exam.enabled else f", but exam.enabled is off: add {Path(folder) / 'gold'}/*.jsonl"))

    # 2. Nothing new: stop before any training.
    train = train_settings(settings, registry)
    why = nothing_new(registry, ds_sha, train)
    if why:
        result = {"status": "unchanged", "reason": why, "dataset_dir": dataset_dir, "promoted": False}
        result["loop"] = loop_without_training(registry, why, settings.loop)
    else:
        # 3. Train on the gpu pool and wait.
        run_dir = str(run_dir_for(dataset_dir, train, out))
        expected = expected_training(dataset_dir, train, out).text(train)
        log.info("training %s on %s (%s): %s", dataset_dir, settings.train_deployment,
                 f"from {train.init_adapter}" if train.init_adapter else "from the base model", expected)
        _run_child("training", settings.train_deployment,
                   {"dataset_dir": dataset_dir, "settings": train.model_dump(mode="json"), "output_dir": out,
                    "resume": True}, settings)

        # 4. Evaluate base vs candidate and apply the promotion rule.
        args = {"run_dir": run_dir, "dataset_dir": dataset_dir, "gold_path": gold,
                "settings": settings.eval.model_dump(mode="json"), "output_dir": out, "model_name": name}
        if settings.evaluate_on == "deployment":
            _run_child("evaluation", settings.evaluate_deployment, args, settings)
        else:
            evaluate(**{**args, "settings": settings.eval})
        decision = [d for d in read_decisions(registry) if d["candidate"] == run_dir][-1]
        report = EvalReport.model_validate_json((Path(decision["eval_dir"]) / "report.json").read_text("utf-8"))
        result = {"status": "promoted" if decision["promoted"] else "not promoted", "reason": decision["reason"],
                  "dataset_dir": dataset_dir, "run_dir": run_dir, "eval_dir": decision["eval_dir"],
                  "promoted": decision["promoted"], "metrics": metrics_table(report), "training": expected}
        result["loop"] = loop_after_evaluation(registry, dataset_dir, decision, report, settings.loop)
        if report.general:
            result["general"] = {k: report.general[k] for k in ("prompts", "mean_shift", "tolerance", "passed")}
        if decision["promoted"] and settings.export_after_promotion:
            result["export_dir"] = export_model(run_dir, out, settings.export)

    # 5. What a person reads in the UI, under keys that stay the same night after night (one per model).
    result["model_name"] = name
    create_markdown_artifact(summary_markdown(folder, result), key=artifact_key("nightly-summary", name),
                             description=f"Tonight's outcome for model {name}: unchanged, promoted or not, and why")
    publish_registry(registry, key=artifact_key("model-registry", name))
    if result.get("loop") is not None:
        for row in result["loop"][:20]:
            log.info("closed loop: %s round %d (%d facts): gained %s; %s", row["document"], row["round"],
                     row["facts"], row["gained"], row["status"])
        if len(result["loop"]) > 20:
            log.info("closed loop: %d more rounds in the loop-rounds artifact", len(result["loop"]) - 20)
        artifacts.loop_rounds(result["loop"], str(registry), key=artifact_key("loop-rounds", name))
    print(f"nightly: {result['status']}: {result['reason']}")
    return result
