"""The trainable model: where and in which precision it trains (Plan), the base loaded with LoRA
adapters (4-bit NF4 for QLoRA) or whole (method full), the loss of one micro-batch, and the optimizer.

On CPU, cpu_dtype "auto" is settled by timing both dtypes on the real batch shape (probe_cpu_dtype)."""

from __future__ import annotations

import logging
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from doctune.model_settings import TrainSettings
from doctune.training.data import IGNORE

log = logging.getLogger(__name__)


@dataclass
class Plan:
    device: str  # "cpu" | "cuda"
    method: str  # "lora" | "qlora" | "full"
    compute: str  # "fp32" | "bf16"
    optimizer: str  # "adamw_torch" | "paged_adamw_8bit"
    probe: dict = field(default_factory=dict)  # {"fp32_s_per_micro_step": .., "bf16_...": .., "cpu_bf16_flags": ..}

    @property
    def name(self) -> str:  # run.json "method"
        return f"qlora_nf4_{self.compute}" if self.method == "qlora" else f"{self.method}_{self.compute}"

    def describe(self) -> str:
        what = {"qlora": f"QLoRA NF4 + double quant, {self.compute} compute",
                "full": f"full fine-tune, fp32 weights, {self.compute} compute"}.get(self.method, f"LoRA {self.compute}")
        line = f"training on {self.device}: {what}, {self.optimizer}"
        times = {k.split("_")[0]: v for k, v in self.probe.items() if k.endswith("_s_per_micro_step")}
        if times:
            line += " (probe: " + ", ".join(f"{k} {v:.2f} s/micro-step" for k, v in times.items())
            line += f", {self.probe['probe_seconds']} s)" if "probe_seconds" in self.probe else ")"
        elif self.probe.get("reason"):
            line += f" ({self.probe['reason']})"
        return line


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def initial_plan(settings: TrainSettings) -> Plan:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA device; set device: auto or cpu")
    method = settings.method if settings.method != "auto" else ("qlora" if device == "cuda" else "lora")
    if device == "cuda":
        compute = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        # A full fine-tune keeps fp32 master weights and plain AdamW states (it is refused above a billion
        # parameters, where 8-bit paged states would matter).
        return Plan(device, method, compute, "adamw_torch" if method == "full" else "paged_adamw_8bit")
    compute = settings.cpu_dtype if settings.cpu_dtype != "auto" else "fp32"  # auto is settled by probe_cpu_dtype
    return Plan(device, method, compute, "adamw_torch")


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"{base}: the tokenizer has no chat template; use an instruct/chat model")
    return tok


def set_4bit_compute(model, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


def load_full_model(base: str, plan: Plan, settings: TrainSettings):
    """The whole model, every weight trainable (method full): fp32 weights (bf16 comes from autocast), from
    init_adapter (a finished full run's model/ folder) when set, else from the base."""
    from transformers import AutoModelForCausalLM

    source = base
    if settings.init_adapter:
        source = settings.init_adapter
        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"init_adapter={source!r}: no config.json there; with method full, name the "
                                    "model/ folder of a finished full run (outputs/models/<run>/model)")
        log.info("continuing from the fully fine-tuned model %s", source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    model.to(plan.device)
    model.config.use_cache = False  # a KV cache would also switch off packed-sequence masking
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if settings.neftune_alpha:
        add_neftune(model, settings.neftune_alpha)
    return model


def load_model(base: str, plan: Plan, settings: TrainSettings):
    """The base model wrapped with fresh LoRA adapters (or whole, for method full), ready to train."""
    if plan.method == "full":
        return load_full_model(base, plan, settings)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bf16 = torch.bfloat16
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if plan.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=bf16 if plan.compute == "bf16" else torch.float32,
        )
        kwargs["device_map"] = {"": 0} if plan.device == "cuda" else "cpu"
        kwargs["dtype"] = bf16 if plan.device == "cuda" else torch.float32
    else:
        # On CUDA bf16 weights + autocast; on CPU fp32 weights (bf16 comes from autocast, if at all).
        kwargs["dtype"] = bf16 if plan.device == "cuda" and plan.compute == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if plan.method == "lora":
        model.to(plan.device)
    model.config.use_cache = False  # a KV cache would also switch off packed-sequence masking
    if plan.method == "qlora":
        # Freezes the base and upcasts norms/embeddings to fp32, as in the QLoRA recipe.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hook and works with frozen embeddings.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if settings.init_adapter:
        from peft import PeftModel

        adapter = Path(settings.init_adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"init_adapter={settings.init_adapter!r}: no adapter_config.json there; name "
                                    f"the adapter/ folder of a finished run (outputs/models/<run>/adapter)")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        log.info("continuing from the adapter %s (r=%s)", adapter, model.peft_config["default"].r)
    else:
        lora = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if settings.fast_lora_dropout:
        from doctune.lora_dropout import share_lora_dropout

        device = model.get_input_embeddings().weight.device
        with autocast_for(plan):  # as in training: a 4-bit layer takes its compute dtype from its first input
            shared = share_lora_dropout(model, {"input_ids": torch.zeros((1, 4), dtype=torch.long, device=device)})
        if shared["replaced"]:
            log.info("LoRA dropout: %d masks per forward for %d LoRA modules (shared by modules reading the same "
                     "input)", shared["inputs"], shared["replaced"])
    if settings.neftune_alpha:
        add_neftune(model, settings.neftune_alpha)
    return model


def parameter_count(base: str) -> int | None:
    """The base model's parameter count from its safetensors headers (no weights read; a shared tensor is
    stored once); None when `base` is no local folder of safetensors (a hub id not in the local cache)."""
    import json
    import struct

    folder = Path(base)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:  # not cached, or not a hub id: the caller treats the size as unknown
            return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def add_neftune(model, alpha: float):
    """NEFTune (Jain et al. 2023, arXiv 2310.05914): in training mode the input embeddings get
    uniform noise in +-alpha / sqrt(L * d), L the row length and d the hidden size. A small model
    trained on a few wordings per fact then answers reworded questions more often; evaluation
    (`model.eval()`) and the saved adapter see clean embeddings. Returns the hook's handle."""

    def noisy(module, inputs, output):
        if not module.training:
            return output
        size = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-size, size)

    return model.get_input_embeddings().register_forward_hook(noisy)


def autocast_for(plan: Plan):
    if plan.compute != "bf16":
        return nullcontext()
    if plan.method == "qlora" and plan.device == "cpu":
        # bf16 comes from bitsandbytes' compute dtype; autocast on top measured no faster here
        # (SmolLM2, batch 4: 1.66 s/step either way).
        return nullcontext()
    return torch.autocast(plan.device, dtype=torch.bfloat16)


def store_frozen_in_compute_dtype(model, plan: Plan) -> int:
    """CPU LoRA in bf16: store the frozen base Linear weights (and biases) in bf16 once, instead of
    autocast casting every one of them in every forward (and again in each recomputation under
    gradient checkpointing): autocast caches casts only of tensors that require grad. The cast is the
    same round-to-nearest autocast does, so losses and gradients are bit for bit unchanged (tested).
    A head tied to the input embeddings gets its own bf16 copy: the embeddings, the residual stream
    and the norms stay fp32, as under autocast. Returns how many weights were converted."""
    if not (plan.device == "cpu" and plan.method == "lora" and plan.compute == "bf16"):
        return 0
    bf16 = torch.bfloat16
    embedding = model.get_input_embeddings().weight
    n = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad or module.weight.dtype == bf16:
            continue
        if module.weight is embedding:
            module.weight = torch.nn.Parameter(embedding.detach().to(bf16), requires_grad=False)
        else:
            module.weight.data = module.weight.data.to(bf16)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(bf16)
        n += 1
    # The rest of the frozen tensors (embeddings, norms, rotary buffers) may still be views of the
    # memory-mapped checkpoint, which keeps the whole file resident; copied out, the mapping closes
    # (SmolLM2-135M: RSS 1322 -> 917 MB, against 1068 MB loaded and not cast).
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.requires_grad and tensor.dtype != bf16:
            tensor.data = tensor.data.clone()
    return n


def micro_step_loss(model, batch: dict[str, torch.Tensor], plan: Plan) -> torch.Tensor:
    """Summed cross-entropy over the reply tokens of one micro-batch.

    Logits are computed only where a label follows (a boolean `logits_to_keep`): the vocabulary
    projection of prompt and pad positions would be thrown away anyway."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with autocast_for(plan):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum")


_PROBE_CACHE: dict[tuple, dict] = {}


PROBE_BUDGET_S = 15.0


def _warm_slice(batch: dict[str, torch.Tensor], n: int = 32) -> dict[str, torch.Tensor]:
    """The first n positions of the first row: enough to set up a dtype's kernels, nearly free."""
    out = {k: v[:1, :n] for k, v in batch.items() if v.dim() == 2}
    out["labels"] = out["input_ids"].clone()  # a loss over every position, so backward runs fully
    return out


def probe_cpu_dtype(model, batch: dict[str, torch.Tensor], plan: Plan, key: tuple) -> Plan:
    """Settle cpu_dtype 'auto': bf16 only if the CPU has bf16 units AND timed micro-steps on the
    real batch shape say it beats fp32. bf16 without hardware support is many times slower (one
    training step took 117 s in bf16 against ~4 s in fp32 on a CPU without those units), and with
    them the gain varies, so measure rather than assume.

    Per dtype: a warm-up on a 32-token slice (one-off kernel set-up would otherwise count against
    whichever dtype goes first), then one timed micro-step on the real batch, and a second one (the
    faster counts) only while the whole probe stays within PROBE_BUDGET_S."""
    if not cpu_has_bf16():
        plan.probe = {"reason": "no avx512_bf16/amx_bf16 on this CPU", "cpu_bf16_flags": False}
        return plan
    if key in _PROBE_CACHE:
        plan.compute = _PROBE_CACHE[key]["choice"]
        plan.probe = dict(_PROBE_CACHE[key], cached=True)
        return plan
    rng = torch.get_rng_state()  # the probe's dropout must not shift the training run's randomness
    start, times = time.perf_counter(), {}
    for compute in ("fp32", "bf16"):
        trial = Plan(plan.device, plan.method, compute, plan.optimizer)
        if plan.method == "qlora":
            set_4bit_compute(model, torch.bfloat16 if compute == "bf16" else torch.float32)
        micro_step_loss(model, _warm_slice(batch), trial).backward()
        spent = []
        for _ in range(2):
            t0 = time.perf_counter()
            micro_step_loss(model, batch, trial).backward()
            spent.append(time.perf_counter() - t0)
            # Room left for this second step and the other dtype's (about as long) steps?
            if (time.perf_counter() - start) + spent[0] * (3 if compute == "fp32" else 1) > PROBE_BUDGET_S:
                break
        times[compute] = min(spent)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    choice = "bf16" if times["bf16"] < times["fp32"] else "fp32"
    if plan.method == "qlora":
        set_4bit_compute(model, torch.bfloat16 if choice == "bf16" else torch.float32)
    result = {
        "cpu_bf16_flags": True,
        "fp32_s_per_micro_step": round(times["fp32"], 3),
        "bf16_s_per_micro_step": round(times["bf16"], 3),
        "batch_shape": list(batch["input_ids"].shape),
        "probe_seconds": round(time.perf_counter() - start, 1),
        "choice": choice,
    }
    _PROBE_CACHE[key] = result
    plan.compute, plan.probe = choice, result
    return plan


def make_optimizer(model, plan: Plan, settings: TrainSettings):
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        # Paged: optimizer state can spill to host memory instead of OOMing on long batches.
        return bnb.optim.PagedAdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
