"""Supervised fine-tuning of the base model on the chat dataset: LoRA on CPU, QLoRA on CUDA.

The loop is written out (no `Trainer`) so that what it does is visible on one screen and a
crash can resume exactly: micro-batches come from a schedule fixed by the seed, so a checkpoint
only has to remember how far along it was. Loss is on the assistant's reply tokens only.

Batching defaults to padding-free packing (several conversations per row, kept apart by position
ids). Measured on this 2-core CPU with SmolLM2-135M, batch 8: 1.6-1.9x the non-pad tokens/s of a
plain Trainer with padding (bench/train_throughput.py), and the same cost per token as ideally
length-grouped batches, without grouping's same-length batches.

    settings = load_train_settings("configs/train.yaml")   # validated before any model loads
    run_dir = train("outputs/datasets/<id>", settings, "outputs")

Run folder layout: see /work/helpers/dataset_format.md ("Trained model run folder").
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import yaml
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from doctune.generation import chat_prompts, generate_greedy
from doctune.metrics import answer_facts, fact_recall, rouge_l
from doctune.prefect_utils import CACHE

log = logging.getLogger(__name__)

IGNORE = -100  # label value cross-entropy skips


# ----------------------------------------------------------------------------- settings


class TrainSettings(BaseModel):
    # A misspelt key must fail loudly instead of silently keeping the default.
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        "", description="Local folder or HF id of the model to fine-tune; empty: the offline SmolLM2-135M-Instruct."
    )
    system_prompt: str | None = Field(
        None, description="Replaces the dataset's system message in every example; None keeps the dataset's."
    )
    max_seq_len: int = Field(
        512, ge=16, le=131072, description="Examples longer than this (in tokens) are dropped with a reason."
    )
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank: more capacity and memory as it grows.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scale numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input (regularises small data).")
    fast_lora_dropout: bool = Field(
        True,
        description="One LoRA dropout mask per input tensor, shared by the projections that read it (q/k/v, "
        "gate/up; as peft does for a fused qkv projection), cut from 64-bit random words on a CPU (p rounded to "
        "1/65536): a CPU step ~15-25% faster. False: peft's own nn.Dropout in every module.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every projection but the output head) or a list of module names."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate after warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent ramping the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    max_steps: int = Field(60, ge=0, description="Optimizer steps to run; 0: use num_epochs instead.")
    num_epochs: float | None = Field(
        None, gt=0, description="Passes over the training split; used only when max_steps is 0."
    )
    per_device_batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    batching: Literal["packed", "length_grouped", "padded"] = Field(
        "packed",
        description="packed: each micro-batch's examples share rows without padding (attention kept apart by "
        "position ids); length_grouped: similar lengths batched together, padded; padded: random order, padded.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: less memory, ~25% slower."
    )
    save_every_steps: int = Field(20, ge=0, description="Checkpoint interval for resuming; 0: never.")
    neftune_alpha: float = Field(
        0, ge=0, le=100,
        description="NEFTune: uniform noise of size alpha / sqrt(sequence length x hidden size) on the input "
        "embeddings while training, so the model does not lean on the exact tokens of its training questions; "
        "0: off.",
    )
    seed: int = Field(0, description="Seed for LoRA init, data order, dropout and NEFTune noise.")
    method: Literal["auto", "qlora", "lora"] = Field(
        "auto", description="auto: QLoRA (4-bit NF4 base) on CUDA, LoRA on CPU."
    )
    cpu_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="CPU compute dtype; auto: bf16 only if the CPU has bf16 units and a timed probe says faster."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    init_adapter: str | None = Field(
        None,
        description="A LoRA adapter folder to continue from instead of fresh LoRA weights (the nightly flow's "
        "init_from: promoted puts the promoted model's adapter here); its rank and target modules are used.",
    )
    merge: bool = Field(False, description="Also write merged/: the adapter folded into a full model.")
    logging_steps: int = Field(5, ge=1, description="Log the loss every this many steps.")
    eval_every_steps: int = Field(
        0, ge=0,
        description="Every N steps, answer the dataset's validation questions greedily and score fact recall "
        "(held-out paraphrases: does the model know the facts, not just the training wording?); 0: never.",
    )
    eval_max_questions: int = Field(48, ge=1, description="Validation questions scored at each evaluation.")
    select_checkpoint: Literal["last", "best"] = Field(
        "last",
        description="last: the adapter after the final step; best: the evaluated step with the highest validation "
        "fact recall (the later step on a tie): small models over-trained on a few facts drift into answering with "
        "the same memorised sentences, so the last step is often not the best.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if self.select_checkpoint == "best" and not self.eval_every_steps:
            raise ValueError("select_checkpoint='best' needs eval_every_steps > 0 (how often to score validation)")
        if self.max_steps == 0 and not self.num_epochs:
            raise ValueError("max_steps is 0 and num_epochs is unset; set max_steps > 0 or num_epochs > 0")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list; use 'all-linear' or name the modules")
        return self


_CONSTRAINT_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _explain(error: dict) -> str:
    """One pydantic error as '<key> must be > 0 (got -1)'."""
    key = ".".join(str(p) for p in error["loc"]) or "settings"
    ctx, got = error.get("ctx") or {}, error.get("input")
    for kind, word in _CONSTRAINT_WORDS.items():
        if error["type"] == kind:
            bound = next(iter(ctx.values()))
            return f"{key} must be {word} {bound} (got {got!r})"
    if error["type"] == "literal_error":
        return f"{key} must be one of {ctx.get('expected')} (got {got!r})"
    if error["type"] == "value_error":  # our own cross-field checks already say what to do
        return str(ctx.get("error", error["msg"]))
    return f"{key}: {error['msg']} (got {got!r})"


def validate_train_settings(data: dict, source: str = "settings") -> TrainSettings:
    """Validate a plain mapping; unknown keys and bad values raise ValueError naming key and fix."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of train settings, got {type(data).__name__}")
    known = list(TrainSettings.model_fields)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ValueError(f"{source}: unknown key {key!r}; {hint}")
    try:
        return TrainSettings.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{source}: " + "; ".join(_explain(e) for e in exc.errors())) from None


def load_train_settings(path: str | Path) -> TrainSettings:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    return validate_train_settings(data, source=str(path))


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE everywhere but the reply and its end-of-turn token


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": system_prompt}] + messages[1:]
    return [{"role": "system", "content": system_prompt}] + messages


def _template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


def render_example(tokenizer, messages: list[dict], system_prompt: str | None, max_seq_len: int) -> Example | str:
    """Tokenize one conversation through the model's own chat template; a string is a drop reason.

    The prompt is rendered on its own (with the generation prompt) and must be a token prefix of the
    full conversation: everything in that prefix is masked, so the loss sees only the reply."""
    messages = _with_system(messages, system_prompt)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return "last message is not an assistant reply"
    prompt = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _template_ids(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        return "chat template renders the prompt differently inside the full conversation"
    reply = full[len(prompt):]
    # Cut what the template writes after the end-of-turn token (ChatML's newline): not the reply.
    ends = end_of_turn_ids(tokenizer)
    last_end = max((i for i, t in enumerate(reply) if t in ends), default=None)
    if last_end is not None:
        reply = reply[: last_end + 1]
    if not reply:
        return "empty reply"
    if len(prompt) + len(reply) > max_seq_len:
        return "longer than max_seq_len"
    return Example(prompt + reply, [IGNORE] * len(prompt) + reply)


def load_train_split(dataset_dir: str | Path):
    from datasets import load_from_disk

    hf = Path(dataset_dir) / "hf"
    if not hf.exists():
        raise FileNotFoundError(f"{hf} is missing; build the dataset first (the build_dataset flow writes it)")
    data = load_from_disk(str(hf))
    if "train" not in data:
        raise ValueError(f"{hf}: no 'train' split (found {list(data)})")
    if "messages" not in data["train"].column_names:
        raise ValueError(f"{hf}: the train split has no 'messages' column")
    return data["train"]


def load_validation(dataset_dir: str | Path, limit: int) -> list[dict]:
    """Validation questions with the key facts a correct reply must contain (those the question
    does not already give away). Datasets written before the split existed have none."""
    from datasets import load_from_disk

    data = load_from_disk(str(Path(dataset_dir) / "hf"))
    if "validation" not in data:
        return []
    rows = data["validation"].select(range(min(limit, len(data["validation"]))))
    return [{"question": r["question"], "answer": r["answer"], "system": r["system"],
             "facts": answer_facts(r["question"], r["answer"], r["language"])} for r in rows]


def score_validation(model, tokenizer, items: list[dict], settings: TrainSettings, plan: Plan) -> dict:
    """Greedy replies to the validation questions, scored; the model is put back in training mode."""
    systems = [settings.system_prompt if settings.system_prompt is not None else i["system"] for i in items]
    model.eval()
    try:
        replies = generate_greedy(model, tokenizer, chat_prompts(tokenizer, [i["question"] for i in items], systems),
                                  max_new_tokens=64, batch_size=16, autocast=autocast_for(plan))
    finally:
        model.train()
    with_facts = [(r, i) for r, i in zip(replies, items) if i["facts"]]
    recall = sum(fact_recall(r, i["facts"]) for r, i in with_facts) / len(with_facts) if with_facts else 0.0
    rouge = sum(rouge_l(r, i["answer"]) for r, i in zip(replies, items)) / len(items)
    return {"fact_recall": round(recall, 4), "rouge_l": round(rouge, 4), "questions": len(items),
            "with_facts": len(with_facts), "example": {"question": items[0]["question"], "reply": replies[0]}}


def tokenize_split(tokenizer, rows, settings: TrainSettings) -> tuple[list[Example], dict[str, int]]:
    examples, dropped = [], {}
    for messages in rows["messages"]:
        out = render_example(tokenizer, messages, settings.system_prompt, settings.max_seq_len)
        if isinstance(out, str):
            dropped[out] = dropped.get(out, 0) + 1
        else:
            examples.append(out)
    if dropped:
        log.warning("dropped %d of %d training examples: %s", sum(dropped.values()), len(rows), dropped)
    if not examples:
        raise ValueError(f"no trainable examples left (dropped: {dropped}); check max_seq_len and the chat template")
    return examples, dropped


# ----------------------------------------------------------------------------- batching


def epoch_batches(lengths: list[int], batch_size: int, batching: str, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every micro-batch of one epoch; a pure function of seed and epoch, so a
    resumed run sees the very same batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if batching != "length_grouped":
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Sort by length inside mega-batches of 50 batches (as HF's group_by_length does): padding
    # shrinks, yet the order stays random at the larger scale; then shuffle the batch order.
    mega = 50 * batch_size
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


def _pack_rows(examples: list[Example], capacity: int) -> list[list[Example]]:
    """As few rows as `capacity` allows, filled evenly (longest first, each into the emptiest row).

    Even rows matter: rows are padded to the widest, and plain first-fit left e.g. 486 + 180 tokens
    in two rows of width 486 (31% padding, measured slower than length-grouped batches). Rows are
    bounded because the packed mask is dense: attention costs width^2 per row, whatever the
    segments."""
    total = sum(len(e.input_ids) for e in examples)
    loads = [0] * math.ceil(total / capacity)
    rows: list[list[Example]] = [[] for _ in loads]
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        r = min(range(len(loads)), key=loads.__getitem__)
        if loads[r] + len(ex.input_ids) > capacity:
            loads.append(0)
            rows.append([])
            r = len(loads) - 1
        rows[r].append(ex)
        loads[r] += len(ex.input_ids)
    return rows


def collate(examples: list[Example], batching: str, pad_id: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch.

    packed: sequences share rows and are told apart by position ids that restart at 0; with no
    attention mask, transformers (>= 4.5x, sdpa/eager) builds a block-diagonal causal mask from
    those resets. The model must run with use_cache=False: a KV cache disables that detection."""
    if batching == "packed":
        rows = _pack_rows(examples, max(max_seq_len, max(len(e.input_ids) for e in examples)))
        width = max(sum(len(e.input_ids) for e in row) for row in rows)
        ids, pos, lab = [], [], []
        for row in rows:
            r_ids, r_pos, r_lab = [], [], []
            for ex in row:
                r_ids += ex.input_ids
                r_pos += range(len(ex.input_ids))
                # The previous sequence's last token must not learn to predict this one's first.
                r_lab += [IGNORE] + ex.labels[1:]
            pad = width - len(r_ids)
            # Padding forms its own trailing segment (positions from 0): causal attention means no
            # real token ever attends to it, so no attention mask is needed.
            ids.append(r_ids + [pad_id] * pad)
            pos.append(r_pos + list(range(pad)))
            lab.append(r_lab + [IGNORE] * pad)
        return {
            "input_ids": torch.tensor(ids),
            "position_ids": torch.tensor(pos),
            "labels": torch.tensor(lab),
            "n_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
        }
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    lab = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(lab),
        "n_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
    }


def micro_batch_stream(examples: list[Example], settings: TrainSettings, start: int) -> Iterator[list[Example]]:
    """Micro-batches from global position `start` on, epoch after epoch."""
    lengths = [len(e.input_ids) for e in examples]
    per_epoch = math.ceil(len(examples) / settings.per_device_batch_size)
    epoch, pos = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(lengths, settings.per_device_batch_size, settings.batching, settings.seed, epoch)
        for b in batches[pos:]:
            yield [examples[i] for i in b]
        epoch, pos = epoch + 1, 0


def total_steps(settings: TrainSettings, n_examples: int) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    per_epoch = math.ceil(n_examples / settings.per_device_batch_size)
    return max(1, math.ceil(settings.num_epochs * per_epoch / settings.gradient_accumulation_steps))


# ----------------------------------------------------------------------------- model and device plan


@dataclass
class Plan:
    device: str  # "cpu" | "cuda"
    method: str  # "lora" | "qlora"
    compute: str  # "fp32" | "bf16"
    optimizer: str  # "adamw_torch" | "paged_adamw_8bit"
    probe: dict = field(default_factory=dict)  # {"fp32_s_per_micro_step": .., "bf16_...": .., "cpu_bf16_flags": ..}

    @property
    def name(self) -> str:  # run.json "method"
        return f"qlora_nf4_{self.compute}" if self.method == "qlora" else f"lora_{self.compute}"

    def describe(self) -> str:
        what = (
            f"QLoRA NF4 + double quant, {self.compute} compute"
            if self.method == "qlora"
            else f"LoRA {self.compute}"
        )
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
        return Plan(device, method, compute, "paged_adamw_8bit")
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


def _set_4bit_compute(model, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


def load_model(base: str, plan: Plan, settings: TrainSettings):
    """The base model wrapped with fresh LoRA adapters, ready to train."""
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


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


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
    real batch shape say it beats fp32. bf16 without hardware support is several times slower
    (FINDINGS: 117 s vs ~4 s per step), and with it the gain varies, so measure rather than assume.

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
            _set_4bit_compute(model, torch.bfloat16 if compute == "bf16" else torch.float32)
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
        _set_4bit_compute(model, torch.bfloat16 if choice == "bf16" else torch.float32)
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


# ----------------------------------------------------------------------------- checkpoints

# What a checkpoint holds; state.json is written last, so a folder without it was never finished.
CHECKPOINT_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt",
                    "scheduler.pt", "rng.pt")


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders holding them: a rename is durable only once
    what it points at is on disk, else a power cut can leave a complete-looking folder of empty files."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _is_complete(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("step") != _step_of(path):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in CHECKPOINT_FILES)


def _step_folders(run_dir: Path) -> list[Path]:
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first; `.tmp-*` folders and torn `step-*` ones are skipped."""
    return [p for p in _step_folders(run_dir) if _is_complete(p)]


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from, after removing what an interrupted save or prune left behind."""
    folder = run_dir / "checkpoints"
    stale = sorted(folder.glob(".tmp-*")) + [p for p in _step_folders(run_dir) if not _is_complete(p)]
    for path in stale:
        log.info("removing %s: an unfinished checkpoint (the run stopped while writing or deleting it)", path)
        shutil.rmtree(path)
    found = checkpoints(run_dir)
    if not found and folder.exists():
        log.info("%s has no complete checkpoint; training from step 0", run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    final = run_dir / "checkpoints" / f"step-{state['step']}"
    tmp = _atomic_dir(final)
    model.save_pretrained(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a torn folder of the same step, from before a crash
    tmp.rename(final)  # a crash mid-save leaves only a .tmp- folder, never a half checkpoint
    _fsync_dir(final.parent)
    _fsync_dir(run_dir)  # the checkpoints/ entry itself, after the first save
    for old in checkpoints(run_dir)[:-keep]:
        # state.json first: a crash while deleting leaves a folder checkpoints() no longer lists.
        (old / "state.json").unlink()
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)  # our own file: python's RNG state is a tuple
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())


# ----------------------------------------------------------------------------- outputs


def dataset_hash(dataset_dir: str | Path) -> str:
    """Content hash of the hf/ folder, so a rebuilt dataset gets a new run folder."""
    hf = Path(dataset_dir) / "hf"
    h = hashlib.sha256()
    for p in sorted(x for x in hf.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(hf)).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def settings_hash(settings: TrainSettings) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()


def run_dir_for(dataset_dir: str | Path, settings: TrainSettings, output_root: str | Path) -> Path:
    return Path(output_root) / "models" / f"{dataset_hash(dataset_dir)[:12]}-{settings_hash(settings)[:8]}"


def peak_memory(device: str) -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def plot_loss(losses: list[dict], path: Path, evals: list[dict] | None = None, selected: int | None = None) -> None:
    # The object API renders with Agg without switching pyplot's global backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], lw=1.5, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (reply tokens)")
    ax.set_title("training loss" + (" and validation fact recall" if evals else ""))
    ax.grid(alpha=0.3)
    if evals:
        right = ax.twinx()
        right.plot([e["step"] for e in evals], [e["fact_recall"] for e in evals], "o-", color="tab:green", lw=1.2)
        right.set_ylabel("validation fact recall", color="tab:green")
        right.set_ylim(0, 1)
        if selected is not None:
            ax.axvline(selected, color="tab:green", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    tmp.replace(path)


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    outs, logits = [], []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            logits.append(model(**ids).logits[0, -1].float().cpu())
        outs.append(gen[0, ids["input_ids"].shape[1] :].tolist())
    return outs, logits


def merge_and_check(base: str, adapter_dir: Path, out_dir: Path, prompts: list[str], device: str) -> dict:
    """Fold the adapter into an unquantized copy of the base, save, reload, and compare greedy
    outputs of the reloaded model with base+adapter on a few prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(adapter_dir))
    # The checkpoint's own dtype ("auto"); a 4-bit base is never merged into (rounding would stack).
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto").to(device)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    before, logits_before = _greedy(model, tokenizer, prompts, 16)
    merged = model.merge_and_unload()
    tmp = _atomic_dir(out_dir)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    del merged, model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype="auto").to(device).eval()
    after, logits_after = _greedy(reloaded, tokenizer, prompts, 16)
    identical = sum(a == b for a, b in zip(before, after))
    diff = max((a - b).abs().max().item() for a, b in zip(logits_before, logits_after))
    return {
        "prompts": len(prompts),
        "identical_greedy": identical,
        "all_identical": identical == len(prompts),
        "max_abs_logit_diff": diff,
    }


# ----------------------------------------------------------------------------- training


def optimizer_step(model, batches: list[dict], plan: Plan, optimizer, scheduler, max_grad_norm: float):
    """One step over `batches` (the accumulated micro-batches); returns (loss, reply tokens)."""
    # Normalise by the reply tokens of the whole step, so every token weighs the same however
    # the accumulation split falls (mean-of-means would favour short micro-batches).
    n_labels = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    step_loss = 0.0
    for b in batches:
        loss = micro_step_loss(model, b, plan) / max(n_labels, 1)
        loss.backward()
        step_loss += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, n_labels


def save_adapter(run_dir: Path, model, tokenizer, name: str = "adapter") -> None:
    tmp = _atomic_dir(run_dir / name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run_dir / name, ignore_errors=True)
    tmp.rename(run_dir / name)


def validate_step(run_dir: Path, model, tokenizer, items: list[dict], settings: TrainSettings, plan: Plan,
                  state: dict) -> None:
    """Score the validation questions now; keep the adapter aside when it is the best so far."""
    result = {"step": state["step"], **score_validation(model, tokenizer, items, settings, plan)}
    example = result.pop("example")
    state["evals"].append(result)
    best = best_eval(state["evals"])
    if best is result and settings.select_checkpoint == "best":
        save_adapter(run_dir, model, tokenizer, name="best")
    log.info("step %d: validation fact recall %.3f, ROUGE-L %.3f (%d questions)%s; e.g. %r -> %r",
             state["step"], result["fact_recall"], result["rouge_l"], result["questions"],
             " - best so far" if best is result else f" - best is step {best['step']}",
             example["question"], example["reply"][:120])


def best_eval(evals: list[dict]) -> dict | None:
    """The evaluated step with the highest validation fact recall. Ties go to the later step: it has
    seen more of the data, and a small validation set ties often."""
    return max(evals, key=lambda e: (e["fact_recall"], e["step"]), default=None)


def write_outputs(run_dir: Path, tokenizer, state: dict, plan: Plan, settings: TrainSettings, base: str,
                  dataset_dir: str | Path, data_counts: dict) -> None:
    """loss.png, metrics.json, merged/ if asked, and run.json last (it marks the run finished)."""
    plot_loss(state["losses"], run_dir / "loss.png", state.get("evals"), state["selected_step"])
    metrics = {
        "steps": state["step"],
        "selected_step": state["selected_step"],
        "validation": state.get("evals", []),
        "eval_seconds": round(state.get("eval_seconds", 0.0), 2),
        **data_counts,
        "losses": state["losses"],
        "train_seconds": round(state["seconds"], 2),
        "tokens": state["tokens"],
        "label_tokens": state["label_tokens"],
        # non-pad tokens per second over the whole run (the resumed part included)
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "s_per_step": round(state["seconds"] / max(state["step"], 1), 3),
        **peak_memory(plan.device),
        "plan": plan.describe(),
        "probe": plan.probe,
    }
    if settings.merge:
        prompts = [
            tokenizer.apply_chat_template(_with_system(m, settings.system_prompt)[:-1], tokenize=False,
                                          add_generation_prompt=True)
            for m in load_train_split(dataset_dir)["messages"][:3]
        ]
        metrics["merge_check"] = merge_and_check(base, run_dir / "adapter", run_dir / "merged", prompts, plan.device)
        if not metrics["merge_check"]["all_identical"]:
            log.warning("merged model differs from base+adapter: %s", metrics["merge_check"])
    _write_json(run_dir / "metrics.json", metrics)
    # run.json last: its presence marks the run finished.
    _write_json(
        run_dir / "run.json",
        {
            "base_model": base,
            "dataset_dir": str(dataset_dir),
            "dataset_sha256": dataset_hash(dataset_dir),
            "settings_sha256": settings_hash(settings),
            "init_adapter": settings.init_adapter,
            "method": plan.name,
            "device": plan.device,
            "optimizer": plan.optimizer,
            "probe": plan.probe,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps": state["step"],
            "selected_step": state["selected_step"],
        },
    )


class TrainingInterrupted(RuntimeError):
    """Raised by `stop_after_steps` to simulate a crash (tests of resume)."""


def train(
    dataset_dir: str | Path,
    settings: TrainSettings,
    output_root: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    stop_after_steps: int | None = None,
) -> Path:
    """Fine-tune and return the run folder. A finished run folder is returned as is; an unfinished
    one is continued from its last checkpoint only with resume=True. `stop_after_steps` raises
    TrainingInterrupted after that many steps of this call (to test resuming)."""
    from transformers import get_scheduler

    run_dir = run_dir_for(dataset_dir, settings, output_root)
    if (run_dir / "run.json").exists():
        log.info("%s is already trained; returning it", run_dir)
        return run_dir
    if run_dir.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} exists from an unfinished run; pass resume=True to continue it "
            f"(or delete the folder to start over)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "settings.yaml").write_text(yaml.safe_dump(settings.model_dump(), sort_keys=False))

    base = settings.base_model
    if not base:
        from doctune.base_model import prepare_base_model

        base = str(prepare_base_model())
    tokenizer = load_tokenizer(base)
    examples, dropped = tokenize_split(tokenizer, load_train_split(dataset_dir), settings)
    steps = total_steps(settings, len(examples))
    accum = settings.gradient_accumulation_steps

    plan = initial_plan(settings)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model = load_model(base, plan, settings)
    model.train()
    last = resume_checkpoint(run_dir) if resume else None
    if last is not None:
        # Finish with the dtype the run started with, whatever a new probe would say now.
        saved = json.loads((last / "state.json").read_text())["plan"]
        plan.compute, plan.probe = saved["compute"], saved["probe"]
        if plan.method == "qlora":
            _set_4bit_compute(model, torch.bfloat16 if plan.compute == "bf16" else torch.float32)
    elif plan.device == "cpu" and settings.cpu_dtype == "auto":
        first = to_device(collate(next(micro_batch_stream(examples, settings, 0)), settings.batching,
                                  tokenizer.pad_token_id, settings.max_seq_len), plan.device)
        key = (base, plan.method, tuple(first["input_ids"].shape), settings.gradient_checkpointing, settings.lora_r,
               settings.fast_lora_dropout)
        plan = probe_cpu_dtype(model, first, plan, key)
    log.info(plan.describe())
    cast = store_frozen_in_compute_dtype(model, plan)
    if cast:
        log.info("frozen base weights stored in bf16 (%d Linear layers): autocast no longer casts them in "
                 "every forward", cast)
    if settings.neftune_alpha:
        log.info("NEFTune: uniform noise (alpha %g) on the input embeddings while training", settings.neftune_alpha)

    optimizer = make_optimizer(model, plan, settings)
    scheduler = get_scheduler(
        settings.lr_scheduler, optimizer,
        num_warmup_steps=math.ceil(settings.warmup_ratio * steps), num_training_steps=steps,
    )
    state = {"step": 0, "micro_batches": 0, "losses": [], "tokens": 0, "label_tokens": 0, "seconds": 0.0,
             "plan": {"compute": plan.compute, "probe": plan.probe}}
    if last is not None:
        state = load_checkpoint(last, model, optimizer, scheduler)
        log.info("resuming %s from %s", run_dir, last.name)
    state.setdefault("evals", [])
    validation = load_validation(dataset_dir, settings.eval_max_questions) if settings.eval_every_steps else []
    if settings.eval_every_steps and not validation:
        if settings.select_checkpoint == "best":
            raise ValueError(f"{dataset_dir} has no validation split to choose the best checkpoint by; rebuild it "
                             f"with dataset.validation_size > 0, or set select_checkpoint: last")
        log.warning("%s has no validation split: eval_every_steps is ignored", dataset_dir)
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    stream = micro_batch_stream(examples, settings, state["micro_batches"])
    bar = tqdm(total=steps, initial=state["step"], disable=not progress, desc="train", unit="step")
    start_step, t0 = state["step"], time.perf_counter()
    while state["step"] < steps:
        batches = [
            to_device(collate(next(stream), settings.batching, tokenizer.pad_token_id, settings.max_seq_len),
                      plan.device)
            for _ in range(accum)
        ]
        step_loss, n_labels = optimizer_step(model, batches, plan, optimizer, scheduler, settings.max_grad_norm)
        state["step"] += 1
        state["micro_batches"] += accum
        state["tokens"] += sum(int(b["n_tokens"]) for b in batches)
        state["label_tokens"] += n_labels
        state["losses"].append({"step": state["step"], "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if state["step"] % settings.logging_steps == 0 or state["step"] == steps:
            log.info("step %d/%d loss %.4f", state["step"], steps, step_loss)
        if validation and (state["step"] % settings.eval_every_steps == 0 or state["step"] == steps):
            state["seconds"] += time.perf_counter() - t0  # training time excludes validation
            t_eval = time.perf_counter()
            validate_step(run_dir, model, tokenizer, validation, settings, plan, state)
            state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - t_eval
            t0 = time.perf_counter()
        if settings.save_every_steps and state["step"] % settings.save_every_steps == 0 and state["step"] < steps:
            state["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            epoch, pos = divmod(state["micro_batches"], math.ceil(len(examples) / settings.per_device_batch_size))
            state["data_position"] = {"epoch": epoch, "micro_batch_in_epoch": pos}
            save_checkpoint(run_dir, model, optimizer, scheduler, state)
        if stop_after_steps is not None and state["step"] - start_step >= stop_after_steps and state["step"] < steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {state['step']} (stop_after_steps={stop_after_steps})")
    bar.close()
    state["seconds"] += time.perf_counter() - t0

    if settings.select_checkpoint == "best":
        # The last step is always evaluated, so best/ holds the best adapter, the last one included.
        best = best_eval(state["evals"])
        shutil.rmtree(run_dir / "adapter", ignore_errors=True)
        (run_dir / "best").rename(run_dir / "adapter")
        state["selected_step"] = best["step"]
        if best["step"] != state["step"]:
            log.info("selected the adapter of step %d (validation fact recall %.3f) over the last step %d",
                     best["step"], best["fact_recall"], state["step"])
    else:
        save_adapter(run_dir, model, tokenizer)
        state["selected_step"] = state["step"]
    del model, optimizer, scheduler  # free the training copy before a merge loads an unquantized one
    write_outputs(run_dir, tokenizer, state, plan, settings, base, dataset_dir,
                  {"examples": len(examples), "dropped": dropped})
    log.info("trained %s in %.0f s: final loss %.4f", run_dir, state["seconds"], state["losses"][-1]["loss"])
    return run_dir


# ----------------------------------------------------------------------------- Prefect


def _loss_markdown(run_dir: Path, every: int = 5) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = metrics["losses"]
    rows = [r for r in losses if r["step"] % every == 0 or r["step"] in (1, len(losses))]
    lines = [
        f"## Training loss: `{run_dir.name}`",
        "",
        f"{metrics['plan']}; {metrics['steps']} steps in {metrics['train_seconds']} s, "
        f"{metrics['tokens_per_s']} tokens/s, peak RSS {metrics['peak_rss_mb']} MB",
        "",
        "| step | loss | lr |",
        "|---:|---:|---:|",
        *[f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} |" for r in rows],
        "",
    ]
    if metrics.get("validation"):
        lines += [
            f"Validation (held-out paraphrased questions), every evaluated step; the adapter kept is step "
            f"{metrics['selected_step']}:",
            "",
            "| step | validation fact recall | ROUGE-L |",
            "|---:|---:|---:|",
            *[f"| {e['step']} | {e['fact_recall']:.3f} | {e['rouge_l']:.3f} |" for e in metrics["validation"]],
            "",
        ]
    lines.append(f"Loss curve: `{run_dir / 'loss.png'}`")
    png = (run_dir / "loss.png").read_bytes()
    if len(png) < 100_000:  # small enough to embed
        lines += ["", f"![loss](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines)


@task(cache_policy=CACHE, persist_result=True, retries=1)
def train_task(
    dataset_dir: str, dataset_fingerprint: str, settings: TrainSettings, output_root: str, resume: bool = True
) -> str:
    """Train (or return the finished run). `dataset_fingerprint` is the dataset's content hash, so
    the cache misses when the data changes; a retry resumes from the last checkpoint."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext

    run_dir = train(dataset_dir, settings, output_root, resume=resume)
    if TaskRunContext.get() is not None:
        from prefect import get_run_logger

        metrics = json.loads((run_dir / "metrics.json").read_text())
        get_run_logger().info("%s; %s tokens/s; run folder %s", metrics["plan"], metrics["tokens_per_s"], run_dir)
        create_markdown_artifact(
            key="train-loss", markdown=_loss_markdown(run_dir), description=f"training loss of {run_dir.name}"
        )
    return str(run_dir)
