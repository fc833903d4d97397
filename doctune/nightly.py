"""Settings and the small decisions of the nightly flow (flows/nightly.py only orchestrates).

One Pydantic model nests the build, train and eval settings, so a nightly deployment's run form in
the Prefect UI is one form with every field described."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from doctune.exam import EXAM_FILE, ExamSettings, exam_digest
from doctune.gold import gold_bytes, gold_files
from doctune.loop import LoopSettings, after_evaluation, close_without_training, missed
from doctune.model_settings import EvalSettings, ExportSettings, TrainSettings
from doctune.records import read_jsonl
from doctune.registry import check_model_name, earlier_decision, model_name_for, read_current
from doctune.runs import full_model_of, settings_hash
from doctune.settings import BuildSettings

log = logging.getLogger(__name__)


AUTO_GOLD = "auto"


class NightlySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    build: BuildSettings = Field(default_factory=BuildSettings, description="Ingest, chunk, synthesize, dedup.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Fine-tuning (see configs/train.yaml).")
    exam: ExamSettings = Field(default_factory=ExamSettings, description="Questions about every document, kept out "
                               "of training; they decide promotion when the folder has no gold questions.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Base vs fine-tuned, and promotion.")
    model_name: str | None = Field(
        None, description="The model this folder trains: its registry is <output_dir>/registry/<name>/ and `doctune "
        "serve` offers it as promoted/<name>, so two folders on one output folder never compare against each other. "
        "None: the folder's name (lower case, e.g. 'docs' for data/docs).")
    output_dir: str = Field(
        "outputs",
        description="Root of datasets/, models/, evals/ and registry/ (build.output_dir is set to it); the workers "
        "of both pools must see the same folder.",
    )
    gold_path: str | None = Field(
        AUTO_GOLD,
        description="Hand-written gold questions about the documents; promotion is decided on them when there are "
        "some. 'auto': every *.jsonl in the folder's own gold/ (left out of training), none when it has no such "
        "file; a path: that JSONL file or folder of JSONL files; null: no gold. Without gold, the exam the build makes "
        "from the documents decides.",
    )
    init_from: Literal["base", "promoted"] = Field(
        "base",
        description="base: train fresh LoRA weights (or, with train.method full, every weight) from the base model; "
        "promoted: continue from the promoted model's adapter (or its full model/) on the new dataset (cheaper for a "
        "folder that grows; the base is used while none is promoted, or when the promoted run is of the other kind).",
    )
    train_deployment: str = Field(
        "train/train", description="Deployment ('flow/deployment') that trains; it runs on the gpu work pool."
    )
    evaluate_on: Literal["deployment", "in_process"] = Field(
        "deployment",
        description="deployment: evaluation is a run of evaluate_deployment (on the gpu pool, next to the model); "
        "in_process: the nightly run evaluates itself.",
    )
    evaluate_deployment: str = Field("evaluate/evaluate", description="Deployment that evaluates and promotes.")
    local_llm: Literal["auto", "off"] = Field(
        "auto",
        description="auto: when build.llm.base_url is this machine's and nothing answers there, start `doctune serve` "
        "for synthesis and stop it before training (two torch processes on one small machine stall each other); "
        "off: never start one.",
    )
    loop: LoopSettings = Field(default_factory=LoopSettings, description="The closed loop: the exam questions the "
                               "candidate missed get new question wordings in the next nights' builds, for at "
                               "most loop.max_rounds rounds per document version (doctune/loop.py).")
    export_after_promotion: bool = Field(
        False, description="When tonight's model is promoted, also export it (merged/, GGUF, Modelfile, llama.cpp check)."
    )
    export: ExportSettings = Field(default_factory=ExportSettings, description="What an export writes and checks.")
    child_timeout_s: float | None = Field(
        None, gt=0, description="Give up waiting for a training or evaluation run after this long; None: wait."
    )


def build_settings(settings: NightlySettings) -> BuildSettings:
    return settings.build.model_copy(update={"output_dir": settings.output_dir})


def model_name(folder: str | Path, settings: NightlySettings) -> str:
    return check_model_name(settings.model_name) if settings.model_name else model_name_for(folder)


def registry_dir(settings: NightlySettings, name: str) -> Path:
    """The registry of the model `name`: `<output_dir>/registry/<name>/`."""
    return Path(settings.output_dir) / "registry" / name


def resolve_gold(folder: str | Path, settings: NightlySettings) -> str | None:
    """Tonight's gold file: the folder's own gold/ ('auto'), or the one gold_path names, copied whole under
    `<output_dir>/gold/<sha256[:12]>.jsonl` (the training pool sees outputs/, not always the document folder;
    the copy keeps the questions each decision was made on). None when there is no gold. Files are joined in
    name order, so one file's copy has that file's own sha256 and the registry can compare its scores."""
    if settings.gold_path is None:
        return None
    if settings.gold_path == AUTO_GOLD:
        path = Path(folder) / "gold"
        if not path.is_dir() or not gold_files(path):
            return None
    else:
        path = Path(settings.gold_path)
        if not path.exists() or not gold_files(path):
            raise FileNotFoundError(f"gold_path={settings.gold_path!r}: no gold file there; give a JSONL file or a "
                                    f"folder of them, 'auto' for the document folder's gold/ ({Path(folder) / 'gold'}),"
                                    f" or null for none")
    data = gold_bytes(path)  # read once: its digest names the copy
    out = Path(settings.output_dir) / "gold" / f"{hashlib.sha256(data).hexdigest()[:12]}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{out.name}")
        tmp.write_bytes(data)
        tmp.replace(out)
    return str(out)


def train_settings(settings: NightlySettings, registry: Path) -> TrainSettings:
    """The training settings of tonight's candidate: init_from=promoted continues the promoted adapter, or the
    promoted model/ of a full fine-tune when tonight trains in full too. A promoted run of the other kind
    (an adapter while tonight trains in full, or the other way round) cannot be continued: training starts
    from the base, and the log says so."""
    current = read_current(registry)
    if settings.init_from != "promoted" or not current:
        return settings.train
    run_dir = Path(current["run_dir"])
    full = full_model_of(run_dir)
    if (full is not None) != (settings.train.method == "full"):
        log.warning("init_from promoted: %s is %s but tonight's training is %s; training starts from the base model",
                    run_dir, "a full fine-tune" if full is not None else "a LoRA adapter",
                    "a full fine-tune (method full)" if full is None else f"an adapter (method {settings.train.method})")
        return settings.train
    return settings.train.model_copy(update={"init_adapter": str(full or run_dir / "adapter")})


def nothing_new(registry: Path, dataset_sha256: str, train: TrainSettings) -> str | None:
    """Why tonight needs no training, or None. The dataset is named after the documents' content, so the
    same hash means unchanged documents (and unchanged build settings and code)."""
    current = read_current(registry)
    if current and current.get("dataset_sha256") == dataset_sha256:
        return (f"documents unchanged since {current['promoted_at']}: the dataset is the one the promoted model "
                f"`{current['run_dir']}` was trained on, so it stays; no training, no evaluation")
    earlier = earlier_decision(registry, dataset_sha256, settings_hash(train))
    if earlier:
        verdict = "promoted" if earlier["promoted"] else "not promoted"
        return (f"a candidate with this dataset and these training settings was already evaluated on "
                f"{earlier['decided_at']} ({verdict}: {earlier['reason']}); no training, no evaluation")
    return None


def loop_after_evaluation(registry: Path, dataset_dir: str, decision: dict, report, settings: LoopSettings) -> list[dict] | None:
    """The loop's bookkeeping after tonight's evaluation: the candidate's exam misses close the open rounds and
    open the next (doctune/loop.py). None when the loop is off or the dataset has no exam."""
    exam_file = Path(dataset_dir) / EXAM_FILE
    if not settings.max_rounds or not exam_file.exists():
        return None
    items = read_jsonl(exam_file)
    examples = read_jsonl(Path(decision["eval_dir"]) / "examples.jsonl")
    return after_evaluation(registry, missed(examples, items), items, report.candidate, exam_digest(exam_file),
                            settings)


def loop_without_training(registry: Path, why: str, settings: LoopSettings) -> list[dict] | None:
    """Tonight trained nothing: an open round's material changed nothing, so it gained nothing."""
    return (close_without_training(registry, why) or None) if settings.max_rounds else None


def child_failure(kind: str, child, ui_url: str | None) -> str:
    link = f"{ui_url.rstrip('/')}/runs/flow-run/{child.id}" if ui_url else f"flow run id {child.id}"
    state = child.state
    return (f"the {kind} run {child.name!r} ended {state.name if state else 'without a state'}: "
            f"{(state.message if state else '') or 'no message'} ({link}). The promoted model is unchanged; run "
            f"nightly again to retry (the dataset is cached and training resumes from its last checkpoint).")


def summary_markdown(folder: str, result: dict) -> str:
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"## Nightly {when}: `{folder}` (model `{result.get('model_name', '?')}`, served as "
             f"`promoted/{result.get('model_name', '?')}`)", "", f"**{result['status']}**: {result['reason']}", "",
             f"- dataset: `{result['dataset_dir']}`"]
    if result.get("run_dir"):
        lines.append(f"- candidate: `{result['run_dir']}`")
    if result.get("training"):
        lines.append(f"- training, as expected before it started: {result['training']}")
    if result.get("eval_dir"):
        lines.append(f"- evaluation: `{result['eval_dir']}/report.md`")
    if g := result.get("general"):
        lines.append(f"- general prompts (forgetting check): loss shift {g['mean_shift']:+.3f} nats/token on the base's "
                     f"own answers to {g['prompts']} prompts, tolerance {g['tolerance']:.3f}: "
                     f"{'kept' if g['passed'] else 'forgotten'}")
    if loop := result.get("loop"):
        open_ = sum(r["status"] == "open" for r in loop)
        stopped = sorted({r["document"] for r in loop if r["status"] not in ("open", "continues")})
        lines.append(f"- closed loop: {open_} rounds open for the next build (facts tonight's candidate missed on the exam)"
                     + (f"; stopped: {', '.join(stopped)}" if stopped else ""))
    for r in result.get("metrics", []):
        if r["set"] in ("gold", "exam", "test") and r["language"] == "all" and None not in (r["base"], r["fine-tuned"]):
            now = f", current {r['current']:.3f}" if r.get("current") is not None else ""
            lines.append(f"- {r['set']} {r['metric']} ({r['n']} questions): base {r['base']:.3f}{now}, fine-tuned "
                         f"{r['fine-tuned']:.3f}")
    return "\n".join(lines) + "\n"
