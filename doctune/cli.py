"""The `doctune` command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="doctune: from a document folder to a fine-tuned, evaluated LLM.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    from doctune.logs import our_loggers_at_info

    our_loggers_at_info()


def load_settings(path: Optional[Path], cls):
    """A YAML file validated against a settings model before anything starts; errors name the file,
    the key and the fix."""
    if path is None:
        return cls()
    from doctune.key_names import check_key_names
    from doctune.model_settings import load_settings_file

    try:
        settings = load_settings_file(path, cls)
        check_key_names(settings)
        return settings
    except ValueError as exc:
        raise typer.BadParameter(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None


@app.command("prepare-model")
def prepare_model(target: Optional[Path] = typer.Option(None, help="Folder to write (default: the cache).")):
    """Convert the offline SmolLM2-135M-Instruct GGUF into a safetensors folder (once)."""
    from doctune.base_model import prepare_base_model

    typer.echo(prepare_base_model(target))


@app.command()
def serve(
    model: Optional[Path] = typer.Option(
        None, help="Base model folder (default: the base the served adapters were trained on, per their "
        "run.json; with no adapter, the offline base model)."),
    host: str = typer.Option("127.0.0.1", help="Interface; loopback by default. Any other needs an API key."),
    port: int = typer.Option(8765),
    name: str = typer.Option("smollm2-135m-instruct", help="Model name clients ask for to get the base model."),
    outputs: Path = typer.Option(Path("outputs"), help="Output folder whose registry/<model>/current.json files "
                                 "name the promoted runs."),
    promoted: bool = typer.Option(True, help="Serve each model's promoted adapter as 'promoted/NAME', and the only "
                                  "(or last promoted) one as 'promoted'; --no-promoted serves only the base and "
                                  "--adapter ones."),
    adapter: list[str] = typer.Option(
        [], metavar="NAME=RUN_DIR", help="Also serve that LoRA adapter as model NAME; RUN_DIR is a run folder "
        "(outputs/models/<run>) or its adapter/ folder. Repeatable."),
    api_key_env: str = typer.Option("DOCTUNE_SERVE_API_KEY", help="Env var with the key clients must send "
                                    "(unset: no key, allowed on loopback only)."),
    max_body_mb: float = typer.Option(8.0, min=0.001, help="Larger request bodies get a 413."),
    max_embedding_tokens: int = typer.Option(65536, min=1, help="Most tokens one /v1/embeddings request may "
                                             "hold (a 400 beyond); embeddings run in pieces beside chats."),
):
    """Serve a local model over an OpenAI-compatible API (/v1/chat/completions, /v1/models, /v1/embeddings).

    Model names: --name is the base, 'promoted/NAME' the promoted run of each model in OUTPUTS/registry/,
    'promoted' the only one (or the one promoted last), NAME each --adapter.

    /v1/models lists each name with its folder as `root`; restart the server to pick up a newer promotion.

    A request to an adapter without a system message gets the system prompt that adapter was trained with.

    All adapters must share the base they were trained on (run.json base_model); --model must be that base.
    A full fine-tune (train method full: a run folder with model/) is a model of its own: it is served alone,
    under its names ('promoted', NAME), and the base is not served beside it."""
    from doctune.serving import check_exposure, plan_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = os.environ.get(api_key_env) or None
    try:
        check_exposure(host, api_key, api_key_env)  # before anything loads
        plan = plan_models(str(model) if model else None, adapter, outputs if promoted else None, name)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"doctune serve: {exc}", err=True)
        raise typer.Exit(2) from None
    from doctune.base_model import prepare_base_model
    from doctune.serving import run_server

    run_server(plan.model or str(prepare_base_model()), host=host, port=port, served_name=plan.name, api_key=api_key,
               adapters=plan.adapters, aliases=plan.aliases, max_body_mb=max_body_mb, system_prompts=plan.system_prompts,
               max_embedding_tokens=max_embedding_tokens)


@app.command("build-dataset")
def build_dataset_cmd(
    folder: Path = typer.Argument(Path("data/docs"), help="Document folder to ingest recursively."),
    settings: Optional[Path] = typer.Option(None, help="YAML file of BuildSettings."),
):
    """Run the build_dataset flow and print the dataset folder."""
    from doctune.settings import BuildSettings
    from flows.build_dataset import build_dataset

    typer.echo(build_dataset(str(folder), load_settings(settings, BuildSettings)))


@app.command()
def train(
    dataset_dir: Path = typer.Argument(..., help="A dataset folder written by build-dataset."),
    config: Path = typer.Option(Path("configs/train.yaml"), help="Training settings YAML (validated first)."),
    output_dir: Path = typer.Option(Path("outputs")),
):
    """Run the train flow (LoRA on CPU, QLoRA on CUDA) and print the run folder."""
    from flows.train import train as train_flow
    from doctune.model_settings import load_train_settings

    try:
        settings = load_train_settings(config)  # before any model loads
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(train_flow(str(dataset_dir), settings, str(output_dir)))


def _echo_metrics(rows: list[dict]) -> None:
    """The metrics table of an evaluation (the rows of the evaluate flow's result)."""
    current = any("current" in r for r in rows)  # the served model, scored beside the candidate
    typer.echo(f"\n{'metric':<12} {'set':<5} {'lang':<4} {'n':>3} {'base':>7} " + (f"{'current':>7} " if current else "")
               + f"{'tuned':>7} {'delta':>7}")
    for r in rows:
        now = f"{r['current']:>7.3f} " if current and r.get("current") is not None else " " * 8 if current else ""
        typer.echo(f"{r['metric']:<12} {r['set']:<5} {r['language']:<4} {r['n']:>3} {r['base']:>7.3f} {now}"
                   f"{r['fine-tuned']:>7.3f} {r['delta']:>7}")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A model run folder written by train."),
    dataset_dir: Optional[Path] = typer.Option(None, help="Dataset whose test split is also scored."),
    gold: Optional[Path] = typer.Option(None, help="Hand-written gold questions: a JSONL file or a folder of "
                                        "them, e.g. the document folder's gold/ (data/docs/gold)."),
    settings: Optional[Path] = typer.Option(None, help="YAML file of EvalSettings."),
    output_dir: Path = typer.Option(Path("outputs")),
):
    """Run the evaluate flow: base vs fine-tuned, then the promotion rule; prints the comparison."""
    from flows.evaluate import evaluate as evaluate_flow
    from doctune.model_settings import EvalSettings

    result = evaluate_flow(str(run_dir), str(dataset_dir) if dataset_dir else None, str(gold) if gold else None,
                           load_settings(settings, EvalSettings), str(output_dir))
    _echo_metrics(result["metrics"])
    d = result["decision"]
    typer.echo(f"\n{'PROMOTED' if d['promoted'] else 'NOT PROMOTED'}: {d['reason']}")
    typer.echo(f"report: {result['eval_dir']}/report.md")


@app.command()
def export(
    run: str = typer.Argument("promoted", help="A run folder (outputs/models/<run>), 'promoted/NAME' (the "
                              "promoted model NAME) or 'promoted' (the only one, or the one promoted last)."),
    output_dir: Path = typer.Option(Path("outputs"), help="Root of registry/ and exports/."),
    settings: Optional[Path] = typer.Option(None, help="YAML file of ExportSettings."),
    gguf: Optional[str] = typer.Option(None, help="GGUF types, comma-separated (F16,Q8_0,Q5_0,Q4_0); "
                                                   "default from the settings: F16,Q8_0."),
):
    """Run the export flow: merged/ model, GGUF files and an Ollama Modelfile, checked with llama.cpp."""
    from flows.export import export_model
    from doctune.model_settings import ExportSettings

    conf = load_settings(settings, ExportSettings)
    if gguf:
        try:
            conf = ExportSettings.model_validate({**conf.model_dump(), "gguf_types": gguf.split(",")})
        except ValueError as exc:
            raise typer.BadParameter(f"--gguf {gguf}: {exc}") from None
    out = Path(export_model(run, str(output_dir), conf))
    typer.echo((out / "README.md").read_text(encoding="utf-8"))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@app.command()
def nightly(
    folder: Optional[str] = typer.Argument(None, help="Document folder (default: the deployment's)."),
    settings: Optional[Path] = typer.Option(None, help="YAML of NightlySettings fields to override."),
    train_config: Optional[Path] = typer.Option(None, help="Training settings YAML, e.g. configs/demo.yaml."),
    deployment: str = typer.Option("nightly/nightly", help="The nightly deployment to start."),
    model_name: Optional[str] = typer.Option(None, help="The model this folder trains (its registry, and "
                                             "promoted/NAME in `doctune serve`); default: the folder's name."),
    wait: bool = typer.Option(True, help="Wait for the run and print its outcome."),
):
    """Start a run of the nightly deployment (run by the workers of `make up`), wait, print the outcome."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    from doctune.follow import follow_run
    from doctune.key_names import check_key_names
    from doctune.model_settings import load_train_settings, read_settings_yaml, validate_settings
    from doctune.nightly import NightlySettings

    try:  # the files first: a typo must not wait for the server
        extra = read_settings_yaml(settings) if settings else {}
        check_key_names(validate_settings(extra, NightlySettings, str(settings)))  # a pasted key never reaches the server
        train_extra = load_train_settings(train_config).model_dump(mode="json", exclude_defaults=True) \
            if train_config else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    async def defaults() -> dict:
        async with get_client() as client:
            return (await client.read_deployment_by_name(deployment)).parameters

    params = asyncio.run(defaults())
    if train_extra is not None:
        extra = _deep_merge(extra, {"train": train_extra})
    if model_name is not None:
        extra = _deep_merge(extra, {"model_name": model_name})
    merged = _deep_merge(params.get("settings", {}), extra)
    try:
        # fail here, not in the worker (nor in the database)
        check_key_names(validate_settings(merged, NightlySettings, str(settings or deployment)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    params["settings"] = merged
    if folder:
        params["folder"] = folder
    run = run_deployment(deployment, parameters=params, timeout=0)
    ui = PREFECT_UI_URL.value()
    typer.echo(f"flow run {run.name} ({run.id}): {run.state.name if run.state else 'scheduled'}"
               + (f"\nfollow it in the Prefect UI: {ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else ""))
    if not wait:
        return
    # An hour on a small machine: what the runs log, as it comes, so progress is never mistaken for a hang.
    run = follow_run(run.id, echo=typer.echo)
    if not run.state.is_completed():
        typer.echo(f"the nightly run ended {run.state.name}: {run.state.message}", err=True)
        raise typer.Exit(1)
    result = run.state.result()
    typer.echo(f"\n{result['status'].upper()}: {result['reason']}")
    typer.echo(f"dataset: {result['dataset_dir']}")
    if result.get("metrics"):
        _echo_metrics(result["metrics"])
        typer.echo(f"\nmodel run: {result['run_dir']}\nreport: {result['eval_dir']}/report.md")


@app.command("chat")
def chat_cmd(
    model: Optional[str] = typer.Argument(None, help="Model to ask (default: `promoted` if served, else the "
                                          "first one /v1/models lists)."),
    base_url: str = typer.Option("http://127.0.0.1:8765/v1", help="OpenAI-compatible endpoint (default: "
                                 "`doctune serve`)."),
    api_key_env: str = typer.Option("DOCTUNE_SERVE_API_KEY", help="Env var holding the API key (unset: no key, "
                                    "loopback only)."),
    system: Optional[str] = typer.Option(None, help="System prompt sent ahead of the conversation."),
    temperature: Optional[float] = typer.Option(None, min=0, max=2, help="Sampling temperature (default: the "
                                                "server's)."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Longest answer, in tokens (default: the server's)."),
):
    """Chat in the terminal (or answer piped lines, one per line); /help lists the commands."""
    from doctune.chat import Chat, ChatError, run

    try:
        session = Chat(base_url, model, api_key_env=api_key_env, system=system, temperature=temperature,
                       max_tokens=max_tokens)
    except ChatError as exc:
        raise typer.BadParameter(str(exc)) from None
    raise typer.Exit(run(session))


if __name__ == "__main__":
    app()
