"""Loading what the engine serves: the model folder (the model and two tokenizers), LoRA adapters
over it, the CPU threads to use, and the warm-up forward."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from doctune.serving.jobs import BASE


def cpu_threads() -> int:
    """CPUs this process may really use: its affinity set, capped by a cgroup v2 CPU quota.
    torch's default counts the host's physical cores, which oversubscribes a container."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def load_model(path: Path, device: torch.device):
    """(tokenizer, detokenizer, model, dtype) of the transformers model folder `path`, the model in
    eval mode on `device`. Raises FileNotFoundError/ValueError naming the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}/config.json is missing: model_path must be a transformers model folder "
                                "(prepare_base_model() writes one; so does save_pretrained of a merged fine-tune)")
    # Handlers encode while the worker decodes: two tokenizer objects, so the worker's is never
    # borrowed by a handler.
    tok = AutoTokenizer.from_pretrained(path)
    detok = AutoTokenizer.from_pretrained(path)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Handlers tokenize in threads, several at once, with `tok`. A plain call reconfigures the Rust
        # tokenizer only when it has padding or truncation set, and a reconfiguration while another
        # thread encodes fails ("Already borrowed"): clear both now, so no call ever reconfigures it.
        backend.no_padding()
        backend.no_truncation()
    if not tok.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; serve an instruct/chat model "
                         "or add chat_template.jinja to the folder")
    if device.type == "cpu":
        # bf16 is fast on a CPU only with native bf16 instructions, and slow without them: fp32 is the safe default.
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return tok, detok, model, dtype


def load_adapters(model, adapters: dict[str, str]):
    """A peft model over `model` with every named LoRA adapter folder loaded, in eval mode."""
    from peft import PeftModel

    for name, folder in adapters.items():
        if name == BASE or not name:
            raise ValueError(f"adapters: {name!r} is reserved; pick another adapter name")
        if not (Path(folder) / "adapter_config.json").exists():
            raise FileNotFoundError(f"adapters[{name!r}]: {folder}/adapter_config.json is missing; point it at a "
                                    "folder written by peft's save_pretrained (the train stage's adapter folder)")
    (first, first_dir), *rest = adapters.items()
    peft = PeftModel.from_pretrained(model, first_dir, adapter_name=first, is_trainable=False)
    for name, folder in rest:
        peft.load_adapter(folder, adapter_name=name, is_trainable=False)
    return peft.eval()


def warm_up(lm, pad_id: int, device: torch.device) -> None:
    """One small forward. The first forward pages the weights in and sets kernels up (measured here
    under load: the first 16-request batch 26-57 s, the same batch later 5 s); pay for it before
    /health says ok."""
    with torch.inference_mode():
        lm(input_ids=torch.tensor([[pad_id] * 8] * 2, device=device))
