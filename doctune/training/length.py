"""How long a training run will be, said before it starts.

The step count follows the data: `num_epochs` passes over the training rows (the question/answer rows, and
the text-completion rows when `text_rows` mixes them in, so those get steps in proportion), unless
`max_steps` fixes it. A folder twice as big trains about twice as long.

The time is the step count times the seconds per step of the newest finished run of the same base model
under the same output folder (its metrics.json), scaled by the batch size, plus its time per validation pass
for each pass these settings make; without such a run it is not guessed: the training log states it after
the first step."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from doctune.model_settings import TrainSettings


def steps_for(settings: TrainSettings, n_rows: int) -> int:
    """Optimizer steps: `max_steps` when set, else `num_epochs` passes over `n_rows` rows."""
    if settings.max_steps > 0:
        return settings.max_steps
    per_epoch = math.ceil(n_rows / settings.per_device_batch_size)
    return max(1, math.ceil(settings.num_epochs * per_epoch / settings.gradient_accumulation_steps))


def duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 05 min': an estimate, said as a person would."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class Expected:
    steps: int
    qa_rows: int
    text_rows: int
    seconds: float | None  # None: no earlier run to measure by
    measured_on: str | None  # the run whose seconds per step were used

    def text(self, settings: TrainSettings) -> str:
        rows = f"{self.qa_rows} question/answer rows" + (f" + {self.text_rows} text rows" if self.text_rows else "")
        how = (f"max_steps {settings.max_steps}, {rows}" if settings.max_steps > 0 else
               f"{settings.num_epochs:g} epochs over {rows}")
        steps = f"{self.steps} steps ({how}, batch {settings.per_device_batch_size * settings.gradient_accumulation_steps})"
        if self.seconds is None:
            return (f"{steps}; the time per step is not known yet (no earlier run of this base model under this output "
                    f"folder): the training log states it after the first step")
        return f"{steps}, about {duration(self.seconds)} at the pace of {self.measured_on}"


def dataset_rows(dataset_dir: str | Path, min_rows_per_answer: int = 0) -> tuple[int, int]:
    """(training question/answer rows, text-completion rows) from the dataset's manifest; with
    `min_rows_per_answer`, the question/answer rows counted with their framed copies (data.balanced)."""
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text(encoding="utf-8"))
    qa = int(manifest.get("train", 0))
    if min_rows_per_answer and (Path(dataset_dir) / "hf").is_dir():
        from doctune.training.data import balanced, load_train_split

        qa = len(balanced(load_train_split(dataset_dir), min_rows_per_answer, seed=0))
    return qa, int(manifest.get("text_rows", 0))


def _pace(output_root: Path, settings: TrainSettings) -> tuple[float, float, str] | None:
    """Seconds per example and per validation pass of the newest finished run of this base model trained the same
    way, as an adapter or in full (method full paces differently); None when there is none."""
    finished = sorted((output_root / "models").glob("*/run.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for run_json in finished:  # newest first: the first of this base model is the one
        run = run_json.parent
        try:
            metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
            trained = yaml.safe_load((run / "settings.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if trained.get("base_model", "") != settings.base_model or not metrics.get("s_per_step"):
            continue
        if (trained.get("method") == "full") != (settings.method == "full"):
            continue
        batch = int(trained.get("per_device_batch_size", 8)) * int(trained.get("gradient_accumulation_steps", 1))
        passes = len(metrics.get("validation") or [])
        per_pass = metrics.get("eval_seconds", 0.0) / passes if passes else 0.0
        return metrics["s_per_step"] / max(batch, 1), per_pass, run.name
    return None


def expected_training(dataset_dir: str | Path, settings: TrainSettings, output_root: str | Path,
                      rows: tuple[int, int] | None = None) -> Expected:
    """The steps and time of training `dataset_dir` with `settings`; `rows` (question/answer, text) when the
    caller has counted the rows that fit max_seq_len, else the manifest's counts."""
    if rows:
        qa, text = rows
    else:
        qa, text = dataset_rows(dataset_dir, settings.min_rows_per_answer)
        if not settings.text_rows:  # text_rows_for reads nothing when no text rows train
            from doctune.training.data import text_rows_for

            text = len(text_rows_for(dataset_dir, settings))
    steps = steps_for(settings, qa + text)
    pace = _pace(Path(output_root), settings)
    batch = settings.per_device_batch_size * settings.gradient_accumulation_steps
    if not pace:
        return Expected(steps=steps, qa_rows=qa, text_rows=text, seconds=None, measured_on=None)
    per_example, per_pass, name = pace
    # Validation every eval_every_steps steps and after the last one, at the measured run's time per pass.
    passes = (steps // settings.eval_every_steps + bool(steps % settings.eval_every_steps)
              if settings.eval_every_steps else 0)
    return Expected(steps=steps, qa_rows=qa, text_rows=text, seconds=steps * batch * per_example + passes * per_pass,
                    measured_on=name)
