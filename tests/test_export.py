"""Export: GGUF written and read back (metadata, shapes, logits through transformers' reader), the
llama.cpp check (node-llama-cpp, where installed), the Modelfile, and the export folder of a run."""

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from doctune import llamacpp
from doctune.gguf_export import ExportError, llama3_rope_factors, read_metadata, write_gguf
from doctune.model_settings import ExportSettings
from doctune.runs import resolve_run
from tasks.export import export, modelfile_text, template_family

needs_llamacpp = pytest.mark.skipif(llamacpp.unavailable() is not None,
                                    reason=f"llama.cpp check unavailable: {llamacpp.unavailable()}")

QUESTIONS = ["When does the Brekke office open?", "How much does the Vindel lamp cost?",
             "What is the Fjord kettle's volume?", "Where is the canteen?"]


def last_logits(model_dir, prompt_ids, gguf_file=None):
    from transformers import AutoModelForCausalLM

    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(Path(gguf_file).parent, gguf_file=Path(gguf_file).name)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        return model.eval()(torch.tensor([prompt_ids])).logits[0].float()


def test_llama_gguf_metadata_shapes_and_logits_read_back(tmp_path, tiny_model, tokenizer):
    f16 = write_gguf(tiny_model, tmp_path / "tiny-f16.gguf", "F16")
    q8 = write_gguf(tiny_model, tmp_path / "tiny-q8_0.gguf", "Q8_0")
    assert q8["bytes"] < f16["bytes"] and not list(tmp_path.glob("*.partial"))
    meta = read_metadata(tmp_path / "tiny-f16.gguf")
    m, tensors = meta["metadata"], meta["tensors"]
    assert m["general.architecture"] == "llama" and m["llama.block_count"] == 2
    assert m["llama.attention.head_count"] == 4 and m["llama.embedding_length"] == 64
    assert m["tokenizer.ggml.pre"] == "smollm" and m["tokenizer.ggml.tokens"] == len(tokenizer)
    assert m["tokenizer.ggml.merges"] > 40000
    assert m["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "<|im_start|>" in m["tokenizer.chat_template"]
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"] == ("F16", [64, len(tokenizer)])
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert read_metadata(tmp_path / "tiny-q8_0.gguf")["tensors"]["blk.1.ffn_down.weight"][0] == "Q8_0"

    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    ref = last_logits(tiny_model, ids)
    # transformers undoes the q/k permutation on load: a wrong permutation shows up here as a large error.
    assert (last_logits(None, ids, tmp_path / "tiny-f16.gguf") - ref).abs().max() < 1e-2
    assert (last_logits(None, ids, tmp_path / "tiny-q8_0.gguf") - ref).abs().max() < 0.2


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, tokenizer) -> str:
    """A random Qwen2 (attention biases, no q/k permutation in llama.cpp) with SmolLM2's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_qwen2_gguf_has_biases_and_reads_back(tmp_path, tiny_qwen2, tokenizer):
    # transformers 5 loads this folder's tokenizer as a Qwen2Tokenizer (by model type), whose pre-tokenizer
    # over SmolLM2's vocabulary matches no llama.cpp one: say which, as a user would for such a model.
    with pytest.raises(ExportError, match="probe hash"):
        write_gguf(tiny_qwen2, tmp_path / "qwen-f16.gguf", "F16")
    write_gguf(tiny_qwen2, tmp_path / "qwen-f16.gguf", "F16", pre="qwen2")
    meta = read_metadata(tmp_path / "qwen-f16.gguf")
    assert meta["metadata"]["general.architecture"] == "qwen2"
    assert meta["metadata"]["qwen2.attention.head_count_kv"] == 2
    assert meta["tensors"]["blk.0.attn_q.bias"] == ("F32", [64])
    ids = tokenizer("The Vindel lamp costs", add_special_tokens=False)["input_ids"]
    err = (last_logits(None, ids, tmp_path / "qwen-f16.gguf") - last_logits(tiny_qwen2, ids)).abs().max()
    assert err < 1e-2


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={"rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = llama3_rope_factors(scaling, 500000.0, 64)
    assert factors.min() == 1.0 and factors.max() == 8.0
    np.testing.assert_allclose(plain.numpy() / factors, scaled.double().numpy(), rtol=1e-5)


def test_unsupported_architecture_and_type_name_the_fix(tmp_path, tiny_model):
    with pytest.raises(ExportError, match="Q4_K"):
        write_gguf(tiny_model, tmp_path / "x.gguf", "Q4_K")
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    other = tmp_path / "gpt2ish"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match="convert_hf_to_gguf"):
        write_gguf(other, tmp_path / "y.gguf")


def test_modelfile_has_template_system_stops_and_sampling(tokenizer):
    text = modelfile_text("m-q8_0.gguf", tokenizer.chat_template, "Answer from the handbook.", ExportSettings())
    lines = text.splitlines()
    assert "FROM ./m-q8_0.gguf" in lines
    assert 'SYSTEM """Answer from the handbook."""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0.2" in lines
    assert "PARAMETER num_ctx 2048" in lines
    assert "{{ .Role }}" in text and "<|im_start|>assistant" in text
    assert template_family("{{ '<|start_header_id|>' + message['role'] }}") == "llama3"
    with pytest.raises(ExportError, match="TEMPLATE by hand"):
        template_family("{{ message['content'] }}")


def make_run(root: Path, base: str, tokenizer, seed: int = 0) -> Path:
    """A finished run folder (run.json + adapter/) with a LoRA whose weights are not zero, and its dataset."""
    from datasets import Dataset, DatasetDict
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dataset = root / "datasets" / "ds-test"
    dataset.mkdir(parents=True)
    rows = [{"messages": [{"role": "system", "content": "Answer from the documents."},
                          {"role": "user", "content": q}, {"role": "assistant", "content": "At 7:45."}]}
            for q in QUESTIONS]
    (dataset / "test.messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    DatasetDict({"train": Dataset.from_list([{"system": "Answer from the documents.", "question": q} for q in QUESTIONS])}
                ).save_to_disk(str(dataset / "hf"))
    run = root / "models" / "run-a"
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # small but real: the merge must change the weights
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"base_model": base, "dataset_dir": str(dataset)}))
    return run


def test_resolve_run_from_the_registry_or_a_path(tmp_path, tiny_model, tokenizer):
    with pytest.raises(FileNotFoundError, match="no model is promoted yet"):
        resolve_run("promoted", tmp_path)
    run = make_run(tmp_path, tiny_model, tokenizer)
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "current.json").write_text(json.dumps({"run_dir": str(run)}))
    assert resolve_run("promoted", tmp_path) == run and resolve_run(str(run)) == run
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        resolve_run(str(tmp_path))


@pytest.mark.slow
def test_export_of_a_run_merges_writes_gguf_modelfile_and_checks(tmp_path, tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path, tiny_model, tokenizer)
    settings = ExportSettings(check_questions=None, check_max_tokens=12)
    out = export(str(run), tmp_path, settings)
    assert out.parent == tmp_path / "exports" and out.name.startswith("run-a-")
    manifest = json.loads((out / "export.json").read_text())
    assert [f["type"] for f in manifest["gguf"]] == ["F16", "Q8_0"]
    assert manifest["system_prompt"] == "Answer from the documents."
    assert 'SYSTEM """Answer from the documents."""' in (out / "Modelfile").read_text()
    assert "FROM ./run-a-q8_0.gguf" in (out / "Modelfile").read_text()
    # The merged model is base + adapter, not the base.
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], merged[key])
    # Same folder, not rewritten, when asked again.
    mtime = (out / "export.json").stat().st_mtime
    assert export(str(run), tmp_path, settings) == out and (out / "export.json").stat().st_mtime == mtime
    check = manifest["check"]
    if llamacpp.unavailable():
        assert check == {"skipped": llamacpp.unavailable()}
        return
    f16 = check["files"]["run-a-f16.gguf"]
    assert f16["questions"] == len(QUESTIONS) and f16["prompt_tokens_identical"] == len(QUESTIONS)
    # A random tiny model has near-ties everywhere: F16 may tip one, never by more than rounding can.
    for d in f16["differences"]:
        assert d["logit_margin"] is None or abs(d["logit_margin"]) < 0.05, d
    assert "identical to merged" in (out / "README.md").read_text()


@needs_llamacpp
@pytest.mark.slow
def test_llamacpp_answers_like_transformers_on_the_real_base_model(tmp_path, tokenizer):
    """The offline SmolLM2 with a small LoRA merged in: llama.cpp's greedy answers on the F16 file are the
    merged model's, token for token; Q8_0 is measured."""
    from doctune.base_model import prepare_base_model

    run = make_run(tmp_path, str(prepare_base_model()), tokenizer)
    out = export(str(run), tmp_path, ExportSettings(check_questions=None, check_max_tokens=24))
    files = json.loads((out / "export.json").read_text())["check"]["files"]
    f16, q8 = files["run-a-f16.gguf"], files["run-a-q8_0.gguf"]
    assert f16["identical"] == f16["questions"] == len(QUESTIONS), f16["differences"]
    assert q8["prompt_tokens_identical"] == len(QUESTIONS) and q8["mean_common_prefix"] > 0.3, q8


def test_export_flow_publishes_the_readme_as_an_artifact(tmp_path, tiny_model, tokenizer, prefect_server):
    from flows.export import export_model
    from tests.flows.test_build_dataset import latest_artifact

    run = make_run(tmp_path, tiny_model, tokenizer)
    out = export_model(str(run), str(tmp_path), ExportSettings(gguf_types=["Q8_0"], check="off"))
    text = asyncio.run(latest_artifact("export"))
    assert "run-a-q8_0.gguf" in text and "check skipped: check: off" in text
    assert Path(out, "run-a-q8_0.gguf").exists() and not Path(out, "run-a-f16.gguf").exists()
