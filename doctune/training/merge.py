"""The adapter folded into the base model: one full model in the base's own dtype, saved with the
tokenizer and its chat template. Training's merge check (merge: true) and export use the same merge."""

from __future__ import annotations

from pathlib import Path

import torch

from doctune.records import replacing_dir
from doctune.training.model import load_tokenizer


def load_with_adapter(base: str, adapter_dir: Path, device: str = "cpu"):
    """Base + adapter (unmerged), for inference. The base loads in its checkpoint's own dtype ("auto"):
    a 4-bit base is never merged into (rounding would stack)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto").to(device)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def save_merged(model, tokenizer, out_dir: Path) -> Path:
    """Fold the adapter of `model` (base + adapter) into its weights and save the result with the
    tokenizer; `out_dir` appears complete or not at all."""
    merged = model.merge_and_unload()
    with replacing_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, device: str = "cpu") -> Path:
    """Base + the adapter in `adapter_dir` folded into one model, saved in `out_dir` with the adapter
    folder's tokenizer and chat template."""
    return save_merged(load_with_adapter(base, adapter_dir, device), load_tokenizer(str(adapter_dir)), out_dir)


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
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(adapter_dir))
    model = load_with_adapter(base, adapter_dir, device)
    before, logits_before = _greedy(model, tokenizer, prompts, 16)
    save_merged(model, tokenizer, out_dir)
    del model
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
