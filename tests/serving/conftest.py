"""The servers and runs the serving tests share, made once for the whole folder: the offline model
served with a random LoRA adapter (`server`), and the tiny random model served with two adapters
fitted to say known words (`tiny`, over `runs`), with what peft itself answers (`in_process`)."""

from __future__ import annotations

import functools
from pathlib import Path

import openai
import pytest
import torch

from doctune.base_model import prepare_base_model
from doctune.serving import create_app
from tests.endpoints import serving_in_thread
from tests.serving.common import ADAPTER, BASE, KEY, REPLIES, SAY, WORDS, ask, train_run


@pytest.fixture(scope="package")
def model_path():
    return prepare_base_model()


@pytest.fixture(scope="package")
def adapter_dir(model_path, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    # Random A and B (not peft's zero B), so the adapter visibly changes the answers.
    lora = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="package")
def server(model_path, adapter_dir):
    app = create_app(str(model_path), api_key=KEY, max_batch=8, batch_wait_ms=50,
                     adapters={ADAPTER: str(adapter_dir)})
    with serving_in_thread(app) as srv:
        yield srv


@pytest.fixture(scope="package")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def greedy(client):
    """Greedy answers, asked once per (prompt, max_tokens, model)."""

    @functools.cache
    def answer(prompt: str, max_tokens: int = 16, model: str = BASE) -> str:
        return ask(client, prompt, max_tokens=max_tokens, model=model).choices[0].message.content

    return answer


@pytest.fixture(scope="package")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs") / "models"
    return {name: train_run(tiny_model, reply, root / f"run-{name}") for name, reply in REPLIES.items()}


@pytest.fixture(scope="package")
def full_run(tiny_model, runs, tmp_path_factory) -> Path:
    """A full fine-tune's run folder (run.json + model/): the tiny model with alpha's adapter folded in, a whole
    model that answers as base + alpha does."""
    import shutil

    from doctune.training.merge import load_with_adapter, save_merged
    from doctune.training.model import load_tokenizer

    run_dir = tmp_path_factory.mktemp("outputs") / "models" / "run-full"
    run_dir.mkdir(parents=True)
    save_merged(load_with_adapter(tiny_model, runs["alpha"] / "adapter"), load_tokenizer(tiny_model), run_dir / "model")
    shutil.copy(runs["alpha"] / "run.json", run_dir / "run.json")
    return run_dir


@pytest.fixture(scope="package")
def in_process(tiny_model, runs) -> dict[str, str]:
    """What peft's own greedy `generate` says to SAY with each adapter, and with none ("base")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(runs["alpha"] / "adapter"), adapter_name="alpha")
    model.load_adapter(str(runs["beta"] / "adapter"), adapter_name="beta")
    ids = tok(tok.apply_chat_template(SAY, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
              return_tensors="pt")

    def greedy_reply() -> str:
        with torch.inference_mode():
            seq = model.generate(**ids, max_new_tokens=WORDS, do_sample=False)
        return tok.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    with model.disable_adapter():
        out = {"base": greedy_reply()}
    for name in ("alpha", "beta"):
        model.set_adapter(name)
        out[name] = greedy_reply()
    return out


@pytest.fixture(scope="package")
def tiny(tiny_model, runs):
    app = create_app(tiny_model, served_name="tiny", api_key=KEY, max_batch=8, batch_wait_ms=20,
                     adapters={name: str(run / "adapter") for name, run in runs.items()}, max_body_mb=0.01)
    with serving_in_thread(app) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield srv
