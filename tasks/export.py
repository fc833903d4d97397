"""Export a trained run for use outside doctune: the merged full model (safetensors + tokenizer + chat
template), GGUF files for llama.cpp and Ollama, an Ollama Modelfile, and proof that llama.cpp reads them.

Each export is its own folder, `outputs/exports/<run>-<settings digest>/`, never overwritten. The proof:
the same questions (the gold set, else the run's test split) are answered greedily by transformers on the
merged model and by llama.cpp itself on every GGUF file; `export.json` states the agreement. With F16
the answers must be identical; where one is not, the report gives the merged model's logit margin at the
first differing token (a near tie that half-precision rounding tips over, or a real fault)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prefect import task

from doctune.gguf_export import GGUF_TYPES, ExportError, write_gguf
from doctune.gold import gold_files
from doctune.metrics import fmt_score
from doctune.model_settings import ExportSettings, GGUFType
from doctune.records import replacing_dir, sha256_text
from doctune.runs import base_model_of, full_model_of, resolve_run, trained_system_prompt

log = logging.getLogger(__name__)

assert set(GGUFType.__args__) == set(GGUF_TYPES)


# ----------------------------------------------------------------------------- which folder


def export_dir_for(run_dir: Path, settings: ExportSettings, output_dir: str | Path) -> Path:
    return Path(output_dir) / "exports" / f"{run_dir.name}-{sha256_text(settings.model_dump_json())[:8]}"


# ----------------------------------------------------------------------------- the files


def merge_run(run_dir: Path, out: Path) -> Path:
    """Base + adapter folded into one model in the base's own dtype, saved with the tokenizer and chat template;
    a full fine-tune's model/ (a whole model already) is copied."""
    from doctune.training.merge import merge_adapter  # here: torch loads only when a merge runs

    full = full_model_of(run_dir)
    if full is None:
        return merge_adapter(base_model_of(run_dir), run_dir / "adapter", out)
    with replacing_dir(out) as tmp:
        shutil.copytree(full, tmp, dirs_exist_ok=True)
    return out


_OLLAMA_TEMPLATES = {
    # Ollama puts the Modelfile's SYSTEM into .Messages when a request has no system message of its own.
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"]),
    "llama3": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n', ["<|start_header_id|>", "<|eot_id|>"]),
}


def template_family(chat_template: str) -> str:
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    raise ExportError("the chat template is neither ChatML nor Llama 3's; write the Modelfile's TEMPLATE by hand "
                      "(https://github.com/ollama/ollama/blob/main/docs/template.md) or set modelfile: false")


def modelfile_text(gguf_name: str, chat_template: str, system_prompt: str, settings: ExportSettings) -> str:
    template, stops = _OLLAMA_TEMPLATES[template_family(chat_template)]
    lines = ["# Ollama: ollama create <name> -f Modelfile   (run in this folder)",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""',
             # The system prompt the model was trained with: answers drift without it.
             f'SYSTEM """{system_prompt}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {settings.temperature}", f"PARAMETER top_p {settings.top_p}",
              f"PARAMETER num_ctx {settings.num_ctx}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the check


def check_questions(settings: ExportSettings, dataset_dir: str | None) -> tuple[list[dict], str]:
    """[{question, facts}], and where they came from. Facts (the gold set's, else the test answer's key
    facts) let the report say whether a quantized file still knows what the merged model knows."""
    from doctune.metrics import detect_language, key_facts

    path = Path(settings.check_questions) if settings.check_questions else None
    if path and path.exists():
        rows = [json.loads(line) for f in gold_files(path) for line in f.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        items = [{"question": r["question"], "facts": r.get("facts") or key_facts(r.get("answer") or "")}
                 for r in rows if r.get("question")]
        return items[: settings.check_max_questions], str(path)
    test = Path(dataset_dir or "") / "test.messages.jsonl"
    if not test.exists():
        raise FileNotFoundError(f"no check questions: {path} and {test} are missing; set check_questions or check: off")
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [{"question": r["messages"][-2]["content"],
              "facts": key_facts(r["messages"][-1]["content"], detect_language(r["messages"][-1]["content"]))}
             for r in rows]
    return items[: settings.check_max_questions], str(test)


def _recall(texts: list[str], items: list[dict]) -> float | None:
    from doctune.metrics import fact_recall

    scored = [fact_recall(t, i["facts"]) for t, i in zip(texts, items) if i["facts"]]
    return round(sum(scored) / len(scored), 4) if scored else None


def transformers_greedy(model, tokenizer, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """One prompt at a time (no padding: the reference answer must not depend on batch neighbours)."""
    import torch
    from tqdm.auto import tqdm

    stop = {tokenizer.eos_token_id, *((model.generation_config.eos_token_id or []) if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])}
    out = []
    for prompt in tqdm(prompts, desc="merged model (transformers)", unit="question"):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        tokens = gen[0, ids["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
        out.append(tokens[:cut])
    return out


def _margin(model, prompt_ids: list[int], prefix: list[int], ours: int, theirs: int) -> float:
    """The merged model's logit for its own next token minus llama.cpp's choice, at the first difference."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + prefix])).logits[0, -1].float()
    return round(float(logits[ours] - logits[theirs]), 4)


def compare(model, tokenizer, prompts: list[str], reference: list[list[int]], cpp: dict) -> dict:
    """Agreement of llama.cpp's greedy answers with the merged model's, with each difference explained."""
    differences = []
    prefix_share = []
    for i, (ref, got) in enumerate(zip(reference, cpp["tokens"])):
        common = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        prefix_share.append(common / max(len(ref), len(got), 1))
        if ref == got:
            continue
        diff = {"question": i, "first_difference_at": common, "merged": tokenizer.decode(ref),
                "llamacpp": tokenizer.decode(got)}
        if common < len(ref) and common < len(got):
            diff["logit_margin"] = _margin(model, cpp["prompt_tokens"][i], ref[:common], ref[common], got[common])
        else:
            diff["logit_margin"] = None  # one answer stopped early: the end-of-turn token won a near tie
        differences.append(diff)
    hf_prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return {
        "questions": len(prompts),
        "identical": len(prompts) - len(differences),
        "agreement": round((len(prompts) - len(differences)) / max(len(prompts), 1), 4),
        "mean_common_prefix": round(sum(prefix_share) / max(len(prefix_share), 1), 4),
        # llama.cpp tokenizing the prompt exactly as transformers does checks the tokenizer metadata.
        "prompt_tokens_identical": sum(a == b for a, b in zip(hf_prompts, cpp["prompt_tokens"])),
        "llamacpp_seconds": cpp["seconds"],
        "differences": differences,
    }


def run_check(merged_dir: Path, files: list[Path], items: list[dict], system: str, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from doctune import llamacpp
    from doctune.generation import chat_prompts

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, [i["question"] for i in items], [system] * len(items))
    reference = transformers_greedy(model, tokenizer, prompts, max_tokens)
    results = {"merged_fact_recall": _recall([tokenizer.decode(r) for r in reference], items), "files": {}}
    for path in files:
        log.info("llama.cpp answers %d questions with %s", len(prompts), path.name)
        cpp = llamacpp.greedy(path, prompts, max_tokens)
        results["files"][path.name] = {**compare(model, tokenizer, prompts, reference, cpp),
                                       "fact_recall": _recall(cpp["texts"], items)}
    return results


# ----------------------------------------------------------------------------- the whole export


def export(run_ref: str, output_dir: str | Path = "outputs", settings: ExportSettings = ExportSettings()) -> Path:
    """Write (or find, if already written) the export folder of a run; returns it."""
    from doctune import llamacpp

    run_dir = resolve_run(run_ref, output_dir)
    out = export_dir_for(run_dir, settings, output_dir)
    if (out / "export.json").exists():
        log.info("export: %s already written", out)
        return out
    why_not = llamacpp.unavailable() if settings.check != "off" else "check: off"
    if settings.check == "required" and why_not:
        raise RuntimeError(f"check: required, but {why_not}")
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    log.info("export: merging %s into %s", run_dir, out / "merged")
    merged = merge_run(run_dir, tmp / "merged")
    files = []
    for qtype in settings.gguf_types:
        info = write_gguf(merged, tmp / f"{run_dir.name}-{qtype.lower()}.gguf", qtype, name=run_dir.name)
        log.info("export: %s (%.1f MiB)", info["file"], info["bytes"] / 2**20)
        files.append(info)
    system = trained_system_prompt(run_dir, run.get("dataset_dir"))
    if settings.modelfile:
        from transformers import AutoTokenizer

        chosen = next((f for f in files if f["type"] == "Q8_0"), files[0] if files else None)
        if chosen:
            template = AutoTokenizer.from_pretrained(merged).chat_template or ""
            (tmp / "Modelfile").write_text(modelfile_text(chosen["file"], template, system, settings), encoding="utf-8")
    check: dict = {"skipped": why_not} if why_not else {}
    if not why_not and files:
        items, source = check_questions(settings, run.get("dataset_dir"))
        check = {"questions_from": source, "max_tokens": settings.check_max_tokens,
                 **run_check(merged, [tmp / f["file"] for f in files], items, system, settings.check_max_tokens)}
    manifest = {"run_dir": str(run_dir), "base_model": run["base_model"], "dataset_dir": run.get("dataset_dir"),
                "system_prompt": system, "settings": settings.model_dump(), "gguf": files, "check": check,
                "merged_bytes": sum(f.stat().st_size for f in merged.iterdir() if f.is_file())}
    (tmp / "export.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp / "README.md").write_text(export_markdown(manifest, out), encoding="utf-8")
    tmp.replace(out)
    return out


def export_markdown(m: dict, out: Path) -> str:
    lines = [f"# Export of {Path(m['run_dir']).name}", "", f"Folder: `{out}`", "",
             "| file | type | MiB |", "|---|---|---|", f"| merged/ | safetensors | {m['merged_bytes'] / 2**20:.1f} |",
             *[f"| {f['file']} | {f['type']} | {f['bytes'] / 2**20:.1f} |" for f in m["gguf"]], ""]
    check = m["check"]
    if "skipped" in check:
        lines.append(f"llama.cpp check skipped: {check['skipped']}")
    elif check:
        lines += [f"llama.cpp (node-llama-cpp) vs transformers on the merged model, greedy, {check['max_tokens']} "
                  f"tokens, questions from `{check['questions_from']}`:", "",
                  "| answers from | identical to merged | mean common prefix | prompts tokenized alike | fact recall |",
                  "|---|---|---|---|---|", f"| merged/ (transformers) | | | | {fmt_score(check['merged_fact_recall'])} |"]
        for name, r in check["files"].items():
            lines.append(f"| {name} | {r['identical']}/{r['questions']} | {r['mean_common_prefix']:.2f} | "
                         f"{r['prompt_tokens_identical']}/{r['questions']} | {fmt_score(r['fact_recall'])} |")
        for name, r in check["files"].items():
            for d in r["differences"][:5]:
                lines.append(f"\n- {name}, question {d['question']}: differs at token {d['first_difference_at']} "
                             f"(logit margin {d['logit_margin']}): merged «{d['merged'][:80]}» vs llama.cpp "
                             f"«{d['llamacpp'][:80]}»")
    if m["settings"]["modelfile"]:
        lines += ["", f"Ollama: `cd {out} && ollama create {Path(m['run_dir']).name} -f Modelfile`"]
    return "\n".join(lines) + "\n"


# Not cached: the folder is the cache (named by run and settings, reused when it exists).
@task(log_prints=True)
def export_task(run_ref: str, output_dir: str, settings: ExportSettings) -> str:
    return str(export(run_ref, output_dir, settings))
