"""train: fine-tune the base model on a dataset folder (QLoRA on CUDA, LoRA on CPU, or every weight with method full).

Meant for the `gpu` work pool (concurrency 1). Retrying resumes from the last checkpoint."""

from __future__ import annotations

from prefect import flow

from doctune.logs import our_loggers_at_info
from doctune.model_settings import TrainSettings
from doctune.runs import dataset_hash
from tasks.train import train_task


@flow(name="train", log_prints=True)
def train(dataset_dir: str, settings: TrainSettings = TrainSettings(), output_dir: str = "outputs",
          resume: bool = True) -> str:
    """Returns the run folder (adapter/, metrics.json, loss.png, run.json)."""
    our_loggers_at_info()
    run_dir = train_task(dataset_dir, dataset_hash(dataset_dir), settings, output_dir, resume)
    print(f"model run: {run_dir}")
    return run_dir
