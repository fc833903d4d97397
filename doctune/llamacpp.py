"""llama.cpp itself as an independent reader of our GGUF files: the npm package node-llama-cpp ships
prebuilt CPU libraries, so nothing is compiled or downloaded at run time. `make install` puts it in
`.venv/llamacpp` when npm is present; DOCTUNE_LLAMACPP points elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "js" / "llamacpp_greedy.mjs"
INSTALL_HINT = ("install it with `npm install --prefix .venv/llamacpp --omit=optional node-llama-cpp@3.22.1 "
                "@node-llama-cpp/linux-x64@3.22.1` (make install does this when npm is present)")


def llamacpp_prefix() -> Path:
    return Path(os.environ.get("DOCTUNE_LLAMACPP") or Path(sys.prefix) / "llamacpp")


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (llama.cpp runs through node-llama-cpp)"
    if not (llamacpp_prefix() / "node_modules" / "node-llama-cpp" / "package.json").exists():
        return f"node-llama-cpp is not in {llamacpp_prefix()}; {INSTALL_HINT}"
    return None


def greedy(gguf_path: str | Path, prompts: list[str], max_tokens: int, timeout_s: float = 1800) -> dict:
    """llama.cpp's greedy continuation of each (already chat-templated) prompt: prompt token ids as llama.cpp
    tokenizes them, generated ids (end-of-generation token excluded) and their text."""
    why = unavailable()
    if why:
        raise RuntimeError(f"cannot run llama.cpp: {why}")
    proc = subprocess.run(
        ["node", str(SCRIPT)], input=json.dumps({"model": str(gguf_path), "prompts": prompts, "max_tokens": max_tokens}),
        capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "DOCTUNE_LLAMACPP": str(llamacpp_prefix())},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp could not read {gguf_path}: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout)
