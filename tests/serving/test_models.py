"""What `doctune serve` serves: the registry's promoted run and named adapters on their base, the
refusals that name the file and the fix, and the whole command over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from doctune.runs import find_adapter
from doctune.serving import plan_models
from tests.endpoints import wait_until_healthy
from tests.serving.common import KEY, say


def _promote(outputs: Path, run_dir: Path | str) -> None:
    (outputs / "registry").mkdir(parents=True, exist_ok=True)
    (outputs / "registry" / "current.json").write_text(json.dumps({"run_dir": str(run_dir), "metric": "fact_recall"}))


def test_plan_serves_the_promoted_run_and_named_adapters_on_their_base(tiny_model, runs, tmp_path):
    _promote(tmp_path, runs["alpha"])
    plan = plan_models(None, [f"b={runs['beta']}"], tmp_path, "tiny")
    assert (plan.model, plan.name, plan.aliases) == (tiny_model, "tiny", [])
    assert plan.adapters == {"promoted": str(runs["alpha"] / "adapter"), "b": str(runs["beta"] / "adapter")}
    # An adapter folder itself works too; --no-promoted (outputs None) leaves the registry alone.
    plan = plan_models(tiny_model, [f"b={runs['beta'] / 'adapter'}"], None, "tiny")
    assert (plan.model, plan.adapters) == (tiny_model, {"b": str(runs["beta"] / "adapter")})


def test_plan_serves_every_models_promoted_run_by_its_name(tiny_model, runs, tmp_path):
    for name, run, when in (("alpha", runs["alpha"], "2026-12-01"), ("beta", runs["beta"], "2026-12-02")):
        (tmp_path / "registry" / name).mkdir(parents=True)
        (tmp_path / "registry" / name / "current.json").write_text(json.dumps({"run_dir": str(run),
                                                                                "promoted_at": when}))
    plan = plan_models(None, [], tmp_path, "tiny")
    assert plan.model == tiny_model
    assert plan.adapters == {"promoted": str(runs["beta"] / "adapter"),  # the one promoted last
                        "promoted/alpha": str(runs["alpha"] / "adapter"),
                        "promoted/beta": str(runs["beta"] / "adapter")}
    with pytest.raises(ValueError, match="promoted/NAME"):
        plan_models(None, [f"promoted/alpha={runs['beta']}"], tmp_path, "tiny")


def test_plan_without_a_promotion_serves_the_default_base(tmp_path):
    plan = plan_models(None, [], tmp_path, "tiny")
    assert (plan.model, plan.name, plan.aliases, plan.adapters) == (None, "tiny", [], {})


def test_plan_finds_a_relative_run_dir_under_the_outputs_folder(runs):
    outputs = runs["alpha"].parent.parent  # <outputs>/models/run-alpha
    _promote(outputs, "somewhere/else/models/run-alpha")  # as a worker in another directory wrote it
    assert plan_models(None, [], outputs, "tiny").adapters == {"promoted": str(runs["alpha"] / "adapter")}


@pytest.mark.parametrize("spec, message", [
    ("beta", "expected NAME=RUN_DIR"),
    ("=x", "expected NAME=RUN_DIR"),
    ("my adapter=x", "expected NAME=RUN_DIR"),
    ("b=", "expected NAME=RUN_DIR"),
    ("b=/no/such/run", "/no/such/run does not exist"),
    ("tiny={beta}", "is the base model's name"),
])
def test_plan_refuses_a_bad_adapter_spec(runs, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        plan_models(None, [spec.format(beta=runs["beta"])], None, "tiny")


def test_plan_refuses_a_folder_without_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither adapter/adapter_config.json nor model/config.json"):
        plan_models(None, [f"b={tmp_path}"], None, "tiny")


def test_plan_refuses_duplicate_names(runs, tmp_path):
    with pytest.raises(ValueError, match="'b' is taken"):
        plan_models(None, [f"b={runs['alpha']}", f"b={runs['beta']}"], None, "tiny")
    _promote(tmp_path, runs["alpha"])
    with pytest.raises(ValueError, match="--no-promoted"):
        plan_models(None, [f"promoted={runs['beta']}"], tmp_path, "tiny")


def test_plan_refuses_adapters_of_different_bases(runs, tmp_path, tiny_model):
    other = tmp_path / "run-other"
    (other / "adapter").mkdir(parents=True)
    (other / "adapter" / "adapter_config.json").write_text("{}")
    (other / "run.json").write_text(json.dumps({"base_model": "/models/qwen"}))
    with pytest.raises(ValueError) as err:
        plan_models(None, [f"a={runs['alpha']}", f"o={other}"], None, "tiny")
    assert "/models/qwen" in str(err.value) and tiny_model in str(err.value)
    assert str(other / "run.json") in str(err.value)
    with pytest.raises(ValueError, match="--model is /models/qwen") as err:
        plan_models("/models/qwen", [f"a={runs['alpha']}"], None, "tiny")
    assert tiny_model in str(err.value)


def test_plan_names_the_registry_file_when_the_promoted_run_is_gone(tmp_path):
    _promote(tmp_path, tmp_path / "models" / "deleted-run")
    with pytest.raises(FileNotFoundError, match="current.json: run_dir .*--no-promoted"):
        plan_models(None, [], tmp_path, "tiny")
    (tmp_path / "registry" / "current.json").write_text("{}")
    with pytest.raises(ValueError, match="no run_dir field"):
        plan_models(None, [], tmp_path, "tiny")
    (tmp_path / "registry" / "current.json").write_text('{"run_dir": ')
    with pytest.raises(ValueError, match="current.json: not valid JSON"):
        plan_models(None, [], tmp_path, "tiny")


def test_doctune_serve_serves_the_promoted_run_over_http(runs, in_process, tmp_path):
    """The whole command: registry → adapters → base from run.json → uvicorn on a free port."""
    _promote(tmp_path, runs["alpha"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "DOCTUNE_SERVE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "doctune.cli", "serve", "--port", str(port), "--name", "tiny",
                             "--outputs", str(tmp_path), "--adapter", f"b={runs['beta']}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, lambda: proc.stdout.read().decode() if proc.poll() is not None else "")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny", "promoted", "b"]
        assert say(client, "promoted") == in_process["alpha"]
        assert say(client, "b") == in_process["beta"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def test_a_full_fine_tune_is_served_alone_under_its_names(full_run, runs, tmp_path):
    (tmp_path / "registry" / "docs").mkdir(parents=True)
    (tmp_path / "registry" / "docs" / "current.json").write_text(json.dumps({"run_dir": str(full_run)}))
    plan = plan_models(None, [], tmp_path, "tiny")
    assert (plan.model, plan.name, plan.aliases, plan.adapters) == (str(full_run / "model"), "promoted",
                                                                    ["promoted/docs"], {})
    trained = find_adapter("x", full_run).system_prompt  # its training system prompt, as an adapter's
    assert trained and plan.system_prompts == {"promoted": trained, "promoted/docs": trained}
    # By its run folder or its model/ folder, with --no-promoted.
    assert plan_models(None, [f"ft={full_run / 'model'}"], None, "tiny").model == str(full_run / "model")

    with pytest.raises(ValueError, match="one server serves one model's weights: the adapter 'b'"):
        plan_models(None, [f"b={runs['beta']}"], tmp_path, "tiny")
    with pytest.raises(ValueError, match="drop --model"):
        plan_models("/models/qwen", [], tmp_path, "tiny")


def test_doctune_serve_serves_a_promoted_full_fine_tune_over_http(full_run, in_process, tmp_path):
    """The full fine-tune is alpha's adapter folded into the base: served alone, it answers as base + alpha."""
    (tmp_path / "registry" / "docs").mkdir(parents=True)
    (tmp_path / "registry" / "docs" / "current.json").write_text(json.dumps({"run_dir": str(full_run)}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "doctune.cli", "serve", "--port", str(port), "--name", "tiny",
                             "--outputs", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "DOCTUNE_SERVE_API_KEY": KEY}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, lambda: proc.stdout.read().decode() if proc.poll() is not None else "")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        models = client.models.list().data
        # the base is not served beside a full fine-tune
        assert [m.id for m in models] == ["promoted", "promoted/docs"]
        assert {m.model_extra["root"] for m in models} == {str(full_run / "model")}
        assert say(client, "promoted") == say(client, "promoted/docs") == in_process["alpha"]
        with pytest.raises(openai.NotFoundError, match="it serves: promoted, promoted/docs"):
            say(client, "tiny")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def test_synthesis_starts_doctune_serve_without_the_promoted_adapter(monkeypatch, tmp_path):
    from doctune import local_llm
    from doctune.settings import LLMSettings

    started = []

    class Exited:  # a server that exits at once: serving() reports it and stops waiting
        pid, returncode = 0, 1

        def __init__(self, cmd, **kw):
            started.append(cmd)

        def poll(self):
            return 1

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing answers there
    monkeypatch.setattr(local_llm.subprocess, "Popen", Exited)
    llm = LLMSettings(base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        with local_llm.serving(llm, log_dir=tmp_path):
            pass
    assert started and started[0][3] == "serve" and "--no-promoted" in started[0]
