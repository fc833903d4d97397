"""export: a trained run (or the promoted model) as a merged model, GGUF files and an Ollama Modelfile,
checked by llama.cpp itself; the folder's README is published as an artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from doctune.logs import our_loggers_at_info
from doctune.model_settings import ExportSettings
from tasks.export import export_task


@flow(name="export", log_prints=True)
def export_model(run: str = "promoted", output_dir: str = "outputs", settings: ExportSettings = ExportSettings()) -> str:
    """Returns the export folder (outputs/exports/<run>-<settings digest>/)."""
    our_loggers_at_info()
    out = export_task(run, output_dir, settings)
    create_markdown_artifact((Path(out) / "README.md").read_text(encoding="utf-8"), key="export",
                             description="Exported files, sizes, and llama.cpp's agreement with the merged model")
    print(f"export: {out}")
    return out
