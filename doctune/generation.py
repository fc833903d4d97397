"""Greedy chat replies from a model already in memory: used by evaluation (base vs fine-tuned) and
by training (scoring held-out questions while the adapter learns)."""

from __future__ import annotations

from contextlib import nullcontext


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
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc or "generating", unit="batch",
                          disable=desc is None):
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
    return replies
