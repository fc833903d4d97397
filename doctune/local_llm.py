"""The embedded model server, started for synthesis and stopped before training.

On a small machine two torch processes stall each other (measured on 2 cores: 7-15x slower), so the
nightly flow must not train while `doctune serve` generates. When `llm.base_url` points at this
machine and nothing answers there, `serving()` starts `doctune serve` for the block and stops it
after; an endpoint that already answers (your own vLLM/Ollama, a server you started) is left alone."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import httpx

from doctune.settings import LLMSettings

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _root(base_url: str) -> str:
    u = urlparse(base_url)
    return f"{u.scheme}://{u.netloc}"


def answers(base_url: str, timeout_s: float = 2.0) -> bool:
    """Does anything answer HTTP at the endpoint's address (any status counts: it is up)?"""
    try:
        httpx.get(_root(base_url) + "/health", timeout=timeout_s)
        return True
    except httpx.HTTPError:
        return False


def is_local(base_url: str) -> bool:
    return urlparse(base_url).hostname in LOOPBACK


@contextmanager
def serving(llm: LLMSettings, start: bool = True, model: str | None = None, log_dir: str | Path = "outputs/logs",
            startup_timeout_s: float = 300.0) -> Iterator[str]:
    """Yields a line saying which endpoint synthesis uses; starts and stops `doctune serve` when the
    endpoint is this machine's and down (and `start`). `model`: a model folder to serve (default: the
    offline base)."""
    if not start:
        yield f"{llm.base_url} as it is (local_llm: off)"
        return
    if not is_local(llm.base_url):
        yield f"remote endpoint {llm.base_url}: nothing to start"
        return
    if answers(llm.base_url):
        yield f"{llm.base_url} is already up: using it as it is (it is not stopped before training)"
        return
    port = urlparse(llm.base_url).port or 80
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"llm-server-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.log"
    # --no-promoted: synthesis writes the training data, so it must come from the base model alone
    # (and a LoRA layer on every row would slow it down for nothing).
    cmd = [sys.executable, "-m", "doctune.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--name", llm.model, "--no-promoted"]
    if model:
        cmd += ["--model", str(model)]
    env = dict(os.environ)
    key = os.environ.get(llm.api_key_env)
    if key:  # the server then checks the key the client sends
        env["DOCTUNE_SERVE_API_KEY"] = key
    log.info("starting the local model server on port %d for synthesis (log %s)", port, log_path)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not answers(llm.base_url, timeout_s=1.0):
            if proc.poll() is not None:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"the local model server exited with code {proc.returncode} before answering "
                                   f"on {llm.base_url}; its log {log_path} ends:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local model server did not answer on {llm.base_url} within "
                                   f"{startup_timeout_s:.0f} s; see {log_path}")
            time.sleep(1.0)
        yield f"started the local model server on {llm.base_url} (pid {proc.pid}); stopped after synthesis"
    finally:
        stop(proc)
        log.info("stopped the local model server on port %d: its cores and memory go to training", port)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
