"""What the serving tests share: the names and prompts they ask with, and a finished run folder
with a quickly fitted LoRA adapter (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

KEY = "test-key"
BASE = "smollm2-135m-instruct"
ADAPTER = "tiny-lora"
PROMPT = "What is the capital of France?"
# Its greedy answer starts with emoji that take 3 byte-level tokens each: partial UTF-8 mid-stream.
EMOJI_PROMPT = "你好，请介绍一下自己。"


def ask(client, prompt: str, model: str = BASE, **params):
    params.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **params)


SAY = [{"role": "user", "content": "Say your words."}]
REPLIES = {"alpha": "alpha bravo charlie delta echo", "beta": "one two three four five six"}
WORDS = 6  # new tokens asked for: within the trained replies, where greedy margins are wide


def say(client, model: str, **params) -> str:
    resp = client.chat.completions.create(model=model, messages=SAY, temperature=0, max_tokens=WORDS, **params)
    return resp.choices[0].message.content


def train_run(tiny_model: str, reply: str, run_dir: Path) -> Path:
    """A finished run folder as the train stage leaves it (adapter/ + run.json), its LoRA fitted in
    a few steps to answer SAY with `reply`, so each adapter says something the base does not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    prompt = tok(tok.apply_chat_template(SAY, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template([*SAY, {"role": "assistant", "content": reply}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(40):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({"base_model": tiny_model, "steps": 40}))
    return run_dir
