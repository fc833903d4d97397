"""A transformers model folder (safetensors + tokenizer) written as one GGUF file for llama.cpp and Ollama,
with the `gguf` package alone (no llama.cpp checkout or binary).

Supported: the Llama family (SmolLM, Llama 2/3, 3.1+ with "llama3" rope scaling) and Qwen2/Qwen2.5, with a
byte-level BPE tokenizer. The points where a hand-made file goes wrong without failing (each measured
on SmolLM2-135M with llama.cpp itself): Llama q/k rows must be permuted into llama.cpp's rotary layout
(without it the file still loads, and answers in loops); merges are written as "a b"; tied embeddings get no output tensor; quantizers need float32; rope
theta lives in `config.rope_parameters` in transformers 5; and llama.cpp picks its pre-tokenizer regex by
name (`tokenizer.ggml.pre`), found here the way llama.cpp's own converter finds it: by hashing the ids of a
fixed probe text."""

from __future__ import annotations

import json
import math
from hashlib import sha256
from pathlib import Path

import numpy as np

GGUF_TYPES = ("F16", "Q8_0", "Q5_0", "Q4_0")
ARCHS = {"LlamaForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2"}

# llama.cpp's converter encodes this text and hashes str(ids) to name the pre-tokenizer (data from
# llama.cpp's convert_hf_to_gguf.py, needed verbatim for the hashes below to mean anything).
_PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
          "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
          "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}


class ExportError(ValueError):
    pass


def pre_tokenizer(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(_PROBE)).encode()).hexdigest()
    if digest not in _PRE_BY_HASH:
        raise ExportError(
            f"the tokenizer's pre-tokenizer is not one llama.cpp is known to match here (probe hash {digest[:16]}…); "
            f"supported: {', '.join(sorted(set(_PRE_BY_HASH.values())))}. Convert this model with llama.cpp's "
            "convert_hf_to_gguf.py instead")
    return _PRE_BY_HASH[digest]


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ExportError(f"{path} is missing: not a transformers model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _rope(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) across transformers 4 (rope_theta, rope_scaling) and 5 (rope_parameters)."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for "llama3" rope scaling (Llama 3.1+), as transformers computes them; llama.cpp
    reads them from the rope_freqs tensor."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF stores rotary halves as [first half | second half] per head; llama.cpp expects them interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding has rows the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif by_id[i] in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            types.append(gguf.TokenType.CONTROL if i in special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no *.safetensors weights")
    out = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            out[name] = t.to(torch.float32).numpy()
    return out


def _encode(name: str, data: np.ndarray, qtype_name: str):
    """(array, gguf type) for one tensor: norms and biases stay F32; a matrix whose rows do not split into
    quantization blocks falls back to F16, as llama.cpp's converter does. With 4/5-bit files the embedding
    (which is also the output head when tied) stays Q8_0: it is where low bits hurt small models most."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), T.F32
    if qtype_name in ("Q4_0", "Q5_0") and name in ("token_embd.weight", "output.weight"):
        qtype_name = "Q8_0"
    qtype = T[qtype_name]
    if qtype == T.F16:
        return data.astype(np.float16), T.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), T.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def write_gguf(model_dir: str | Path, path: str | Path, qtype: str = "F16", name: str | None = None,
               pre: str | None = None) -> dict:
    """Write `path` (atomically) from the model folder; returns what a person wants to know about the file.
    `pre` names llama.cpp's pre-tokenizer for a tokenizer the probe does not recognise (you vouch for it)."""
    import gguf
    from transformers import AutoTokenizer

    if qtype not in GGUF_TYPES:
        raise ExportError(f"gguf type {qtype!r} is not one of {', '.join(GGUF_TYPES)}")
    model_dir, path = Path(model_dir), Path(path)
    cfg = _config(model_dir)
    arch_cls = (cfg.get("architectures") or ["?"])[0]
    if arch_cls not in ARCHS:
        raise ExportError(f"{model_dir}/config.json: architecture {arch_cls} is not supported for GGUF export "
                          f"(supported: {', '.join(ARCHS)}); use llama.cpp's convert_hf_to_gguf.py")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[arch_cls])
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    theta, scaling = _rope(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = cfg.get("vocab_size") or len(tokenizer)

    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or model_dir.name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(theta)
    writer.add_vocab_size(vocab_size)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    extra: dict[str, np.ndarray] = {}
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "llama3":
            extra["rope_freqs.weight"] = llama3_rope_factors(scaling, theta, head_dim)
        elif kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
        else:
            raise ExportError(f"{model_dir}/config.json: rope scaling {kind!r} is not supported for GGUF export")

    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    pre = pre or pre_tokenizer(tokenizer)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, bos/eos/pad ids, add_bos and the chat template, from the folder's tokenizer files.
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    # transformers 5 no longer writes add_bos_token to tokenizer_config.json; say what the tokenizer does,
    # or llama.cpp falls back to its own per-vocabulary default.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token.setdefault("bos", bool(ids) and ids[0] == tokenizer.bos_token_id)
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(arch, n_layer)
    tied = cfg.get("tie_word_embeddings", False)
    written = {"F32": 0}
    for hf_name, data in _tensors(model_dir).items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ExportError(f"{model_dir}: tensor {hf_name} has no GGUF name for {arch_cls}")
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            data = _permute_qk(data, n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            data = _permute_qk(data, n_kv)
        array, gtype = _encode(gg_name, data, qtype)
        writer.add_tensor(gg_name, array, raw_dtype=gtype)
        written[gtype.name] = written.get(gtype.name, 0) + 1
    for gg_name, data in extra.items():
        writer.add_tensor(gg_name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
        written["F32"] += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return {"file": path.name, "type": qtype, "bytes": path.stat().st_size, "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "pre_tokenizer": pre, "tensors_by_type": written}


def read_metadata(path: str | Path) -> dict:
    """The scalar and string metadata of a GGUF file, and each tensor's type and shape (for tests and reports)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre") \
                and not key.endswith("_id") and not key.startswith("tokenizer.ggml.add_"):
            meta[key] = len(field.data)  # token lists: their length is what is worth comparing
            continue
        meta[key] = field.contents()
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    return {"metadata": meta, "tensors": tensors}
