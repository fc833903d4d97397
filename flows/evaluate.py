"""evaluate: base, the model being served and the candidate on the gold set, the exam and the held-out split,
then the promotion rule."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from doctune.key_names import check_key_names
from doctune.logs import our_loggers_at_info
from doctune.model_settings import EvalSettings
from doctune.registry import check_model_name, read_current
from doctune.runs import base_model_of
from tasks.evaluate import evaluate_task, metrics_table
from tasks.promote import promote_task


@flow(name="evaluate", log_prints=True)
def evaluate(run_dir: str, dataset_dir: str | None = None, gold_path: str | None = None,
             settings: EvalSettings = EvalSettings(), output_dir: str = "outputs", model_name: str | None = None) -> dict:
    """Returns the metrics table and the promotion decision. model_name: the registry the decision goes to
    (`<output_dir>/registry/<name>/`, as the nightly names it); None: `<output_dir>/registry/` itself."""
    our_loggers_at_info()
    check_key_names(settings)  # the judge's api_key_env: a name, never a key
    base_model = base_model_of(run_dir)
    registry = Path(output_dir) / "registry" / (check_model_name(model_name) if model_name else "")
    current = read_current(registry)  # re-scored on tonight's questions beside the candidate
    report = evaluate_task(base_model, run_dir, dataset_dir, gold_path, settings, output_dir,
                           current["run_dir"] if current else None)
    decision = promote_task(report, str(registry), settings.promotion_margin)
    print(f"evaluation: {report.eval_dir}")
    print(f"promotion: {'PROMOTED' if decision.promoted else 'not promoted'}: {decision.reason}")
    return {"eval_dir": report.eval_dir, "metrics": metrics_table(report), "decision": decision.model_dump()}
