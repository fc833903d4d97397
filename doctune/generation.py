"""Greedy chat replies: from a model already in memory (training scores held-out questions while the
adapter learns) or from a model, merged folder or training run loaded for it (evaluation: base vs
fine-tuned)."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import nullcontext
from pathlib import Path

from doctune.runs import base_model_of, full_model_of

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30  # a log line at most this often: evaluation is minutes on a CPU, not a silent hang


def chat_prompts(tokenizer, questions: list[str], systems: list[str]) -> list[str]:
    """One generation prompt per question; an empty system sends no system message (the chat
    template may then add its own default)."""
    if len(systems) != len(questions):
        raise ValueError(f"{len(systems)} system prompts for {len(questions)} questions")
    prompts = []
    for system, question in zip(systems, questions):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                    autocast=None, desc: str | None = None) -> list[str]:
    """Greedy replies in the order of `prompts`. Prompts of similar length go together (less
    padding), padded on the left so every prompt ends where generation starts; the tokenizer's own
    padding side is restored afterwards (training pads on the right). The KV cache is switched on
    for the call even when the model's config has it off for training."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = last = time.monotonic()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc or "generating", unit="batch",
                          disable=desc is None):
            now = time.monotonic()
            if desc is not None and start and now - last >= PROGRESS_EVERY_S:
                left = (now - t0) / start * (len(order) - start)
                log.info("%s: %d/%d questions, %.0f s so far, about %.0f s left", desc, start, len(order),
                         now - t0, left)
                last = now
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.inference_mode(), (autocast or nullcontext()):
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                    top_k=None, pad_token_id=pad_id, use_cache=True,
                )
            for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :]):
                replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    if desc is not None:
        log.info("%s: %d questions in %.0f s", desc, len(order), time.monotonic() - t0)
    return replies


def load_model(model_ref: str | Path):
    """(model, tokenizer), ready for batched greedy generation, for a base model path or hub id, a merged
    model folder, or a training run folder: run.json + adapter/ loads run.json's base model with the peft
    adapter on top, run.json + model/ (a full fine-tune) loads that model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = Path(model_ref)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if (ref / "adapter_config.json").exists():
        raise ValueError(f"{ref} is a bare adapter folder; pass its run folder ({ref.parent}, with run.json)")
    full = full_model_of(ref) if (ref / "run.json").exists() else None
    if full is not None:
        model_ref = full  # a full fine-tune: its model/ folder is the whole model
        tokenizer = AutoTokenizer.from_pretrained(model_ref)
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype)
    elif (ref / "run.json").exists():
        if not (ref / "adapter" / "adapter_config.json").exists():
            raise FileNotFoundError(f"{ref}: neither adapter/adapter_config.json nor model/config.json is there: "
                                    "did training finish?")
        from peft import PeftModel

        base = base_model_of(ref)
        tok_dir = ref / "adapter" if (ref / "adapter" / "tokenizer_config.json").exists() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, ref / "adapter")
    elif ref.exists() and not (ref / "config.json").exists():
        raise FileNotFoundError(f"{ref}: neither a model folder (config.json) nor a run folder (run.json + adapter/)")
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_ref)
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype)
    if tokenizer.chat_template is None:
        raise ValueError(f"{model_ref}: the tokenizer has no chat template; evaluate an instruct/chat model")
    # Decoder-only models continue from the last position: pad on the left so every prompt ends there.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def generate_answers(
    model_ref: str | Path,
    questions: list[str],
    system_prompt: str | list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies, one per question, in order. `system_prompt` is one for all or one per
    question ("" sends no system message; the chat template may then add its own default)."""
    import torch

    if not questions:
        return []
    systems = [system_prompt] * len(questions) if isinstance(system_prompt, str) else list(system_prompt)
    model, tokenizer = load_model(model_ref)
    try:
        return generate_greedy(model, tokenizer, chat_prompts(tokenizer, questions, systems), max_new_tokens,
                               batch_size, desc=f"answering with {Path(model_ref).name}")
    finally:
        # Base and candidate are loaded one after the other: free the first before the second.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def answer_nll(model_ref: str | Path, questions: list[str], systems: list[str], answers: list[str]) -> list[float]:
    """Mean negative log-likelihood per token (nats) of each given answer after its chat prompt, under the
    model (teacher forcing). Scored on the base model's own answers, it says how far a fine-tuned model moved
    away from the base's general behaviour, offline. An empty answer scores None."""
    import torch

    model, tokenizer = load_model(model_ref)
    try:
        out = []
        for prompt, answer in zip(chat_prompts(tokenizer, questions, systems), answers):
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not tail:
                out.append(None)
                continue
            ids = torch.tensor([head + tail], device=model.device)
            labels = torch.tensor([[-100] * len(head) + tail], device=model.device)
            with torch.inference_mode():
                loss = model(input_ids=ids, labels=labels).loss
            out.append(round(float(loss), 4))
        return out
    finally:
        del model
        gc.collect()
