"""Write the final dataset: a `datasets` DatasetDict (train, validation and test splits), JSONL in
OpenAI-messages and Alpaca form, the dropped rows, and a short dataset card; plus what other trainers read
as is: LLaMA-Factory's `dataset_info.json` and OpenAI fine-tuning files.

Held-out questions are paraphrases: a question goes to the validation or test split only while
another question with the same answer stays in training, so the held-out splits measure what a
user asks for (the fact, asked in words the model never saw), not facts that were never taught."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from datasets import Dataset, DatasetDict
from prefect import task

from doctune.records import Chunk, Dropped, QAPair, replacing_dir, sha256_text, write_jsonl
from doctune.settings import DatasetSettings

TRAIN_ONLY = {"replay", "passage", "cloze"}  # never held out: no question a user asks, or written by rule
OPENAI_SPLITS = ("train", "validation")  # OpenAI fine-tuning takes a training file and an optional validation file

# LLaMA-Factory 0.9.5 reads OpenAI-style messages as "sharegpt" with these tags. Its own "openai" formatting
# would append "detailed thinking off" to every system prompt (OpenAIDatasetConverter), changing ours.
MESSAGES_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}


def to_row(pair: QAPair, system_prompt: str) -> dict:
    system = pair.system or system_prompt
    return {
        "pair_id": pair.pair_id, "question": pair.question, "answer": pair.answer, "system": system,
        "source": pair.source, "language": pair.language, "doc_id": pair.doc_id or "",
        "path": pair.path or "", "chunk_id": pair.chunk_id or "", "mode": pair.mode or "",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": pair.question},
                     {"role": "assistant", "content": pair.answer}],
    }


def text_rows(chunks: list[Chunk]) -> list[dict]:
    """Text-completion rows: each chunk as the document shows it, under its title and section headings
    (a fact read in its context, in the document's own words)."""
    rows = []
    for c in chunks:
        heads = [h for h in c.heading_path if h.strip() and h.strip() != c.title.strip()]
        head = "\n".join([f"# {c.title}"] * bool(c.title.strip()) + [f"## {' > '.join(heads)}"] * bool(heads))
        rows.append({"text": (head + "\n\n" if head else "") + c.shown_text(), "kind": "document", "path": c.path,
                     "chunk_id": c.chunk_id, "language": c.language})
    return rows


def fingerprint(pairs: list[QAPair], settings: DatasetSettings, texts: list[dict] = ()) -> str:
    parts = [[p.pair_id for p in pairs], settings.model_dump()]
    if texts:  # datasets written without text rows keep their names
        parts.append([sha256_text(t["text"])[:16] for t in texts])
    return sha256_text(json.dumps(parts))[:12]


def held_out_split(rows: list[dict], test_size: float, validation_size: float, seed: int
                   ) -> dict[str, list[int]]:
    """Row indices per split. Questions are held out one per answer per round, and only from
    answers that keep at least one training question; when that runs short (an FAQ export has one
    question per answer), other rows fill the quota. Replay rows (general manners) and passage rows
    (a section's text) stay in training; the shares are of the other rows."""
    rng = random.Random(seed)
    candidates = [i for i, row in enumerate(rows) if row["source"] not in TRAIN_ONLY]
    quota = {"test": round(test_size * len(candidates)), "validation": round(validation_size * len(candidates))}
    groups: dict[str, list[int]] = defaultdict(list)
    for i in candidates:
        groups[" ".join(rows[i]["answer"].split()).casefold()].append(i)
    for members in groups.values():
        rng.shuffle(members)
    order = list(groups.values())
    rng.shuffle(order)
    held: dict[str, list[int]] = {"test": [], "validation": []}

    def wanted() -> str | None:
        return next((name for name in ("test", "validation") if len(held[name]) < quota[name]), None)

    while wanted() and any(len(m) > 1 for m in order):
        for members in order:
            if len(members) > 1 and (split := wanted()):
                held[split].append(members.pop())
    singles = [m[0] for m in order if len(m) == 1]
    rng.shuffle(singles)
    while (split := wanted()) and singles:
        held[split].append(singles.pop())
    out = set(held["test"]) | set(held["validation"])
    return {"train": [i for i in range(len(rows)) if i not in out], "validation": sorted(held["validation"]),
            "test": sorted(held["test"])}


def llamafactory_info(sizes: dict[str, int], n_texts: int = 0) -> dict:
    """LLaMA-Factory's dataset_info.json for the dataset folder: `doctune_<split>_messages` and
    `doctune_<split>_alpaca` per split, and `doctune_text` (documents' text, for its `pt` stage). Empty
    splits get no entry: loading an empty JSONL file fails inside `datasets` (StopIteration) before
    LLaMA-Factory can say which dataset it was."""
    info = {"doctune_text": {"file_name": "text.jsonl", "columns": {"prompt": "text"}}} if n_texts else {}
    for split, size in sizes.items():
        if size:
            info[f"doctune_{split}_messages"] = {"file_name": f"{split}.messages.jsonl", "formatting": "sharegpt",
                                                 "columns": {"messages": "messages"}, "tags": MESSAGES_TAGS}
            info[f"doctune_{split}_alpaca"] = {"file_name": f"{split}.alpaca.jsonl", "formatting": "alpaca",
                                               "columns": ALPACA_COLUMNS}
    return info


def write_dataset(pairs: list[QAPair], dropped: list[Dropped], counts: dict, settings: DatasetSettings,
                  output_dir: str | Path, texts: list[dict] = ()) -> Path:
    """Returns the dataset folder; an existing folder with the same content is reused, never rewritten.
    `texts`: text-completion rows (`text_rows`), written when settings.text_rows."""
    if not pairs:
        raise ValueError("no pairs left to write a dataset from; see the dropped rows and keep rates above")
    texts = list(texts) if settings.text_rows else []
    out = Path(output_dir) / "datasets" / f"ds-{fingerprint(pairs, settings, texts)}"
    if (out / "manifest.json").exists():
        return out
    rows = [to_row(p, settings.system_prompt) for p in pairs]
    full = Dataset.from_list(rows)
    if len(rows) >= 10:
        split = held_out_split(rows, settings.test_size, settings.validation_size, settings.seed)
    else:
        split = {"train": list(range(len(rows))), "validation": [], "test": []}
    dd = DatasetDict({name: full.select(idx) for name, idx in split.items()})
    # Empty splits stay out of hf/: datasets writes them but cannot load them back (IndexError in
    # concat_tables), and every reader treats a missing split as empty. The JSONL files keep all three.
    # A crash leaves a .tmp- folder, never a dataset folder without its manifest (the early return above).
    with replacing_dir(out) as tmp:
        DatasetDict({name: ds for name, ds in dd.items() if len(ds)}).save_to_disk(str(tmp / "hf"))
        if texts:  # beside hf/, whose splits are all question/answer rows
            write_jsonl(tmp / "text.jsonl", texts)
        for split, ds in dd.items():
            write_jsonl(tmp / f"{split}.messages.jsonl",
                        ({"messages": r["messages"], "pair_id": r["pair_id"], "source": r["source"],
                          "path": r["path"], "chunk_id": r["chunk_id"]} for r in ds))
            write_jsonl(tmp / f"{split}.alpaca.jsonl",
                        ({"instruction": r["question"], "input": "", "output": r["answer"], "system": r["system"]}
                         for r in ds))
            if split in OPENAI_SPLITS and len(ds):
                # OpenAI's fine-tuning file format has no place for our bookkeeping keys (pair_id, source, path);
                # no file for an empty split, so every openai file here can be uploaded as it is.
                write_jsonl(tmp / f"{split}.openai.jsonl", ({"messages": r["messages"]} for r in ds))
        info = llamafactory_info({split: len(ds) for split, ds in dd.items()}, len(texts))
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        write_jsonl(tmp / "dropped.jsonl", dropped)
        manifest = {
            "name": out.name, "train": len(dd["train"]), "validation": len(dd["validation"]), "test": len(dd["test"]),
            "text_rows": len(texts), "text_rows_by_kind": dict(Counter(t.get("kind", "document") for t in texts)),
            "by_source": dict(Counter(r["source"] for r in rows)),
            "by_language": dict(Counter(r["language"] for r in rows)),
            "by_file": dict(Counter(r["path"] for r in rows)),
            "dropped_by_reason": dict(Counter(f"{d.stage}:{d.reason}" for d in dropped)),
            "counts": counts, "settings": settings.model_dump(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
        (tmp / "card.md").write_text(dataset_card(manifest), encoding="utf-8")
    return out


def dataset_card(m: dict) -> str:
    lines = [f"# Dataset {m['name']}", "",
             f"{m['train']} training, {m.get('validation', 0)} validation and {m['test']} test question/answer "
             "pairs, built by doctune. Held-out questions are, where the data allows, paraphrases of facts "
             "that training still teaches with other questions.", "",
             "| source | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in m["by_source"].items()], "",
             "| language | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in m["by_language"].items()], "",
             "| dropped (stage:reason) | rows |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in sorted(m["dropped_by_reason"].items())], "",
             "| file | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(m["by_file"].items())], "",
             "Files: `hf/` (datasets.load_from_disk); `<split>.messages.jsonl` (OpenAI chat format with "
             "pair_id, source, path and chunk_id) and `<split>.alpaca.jsonl` for train, validation and test; "
             "`<split>.openai.jsonl` for train and validation when they have rows (only `messages`, as OpenAI "
             "fine-tuning takes it); `dataset_info.json` (LLaMA-Factory: `dataset_dir` is this folder, datasets "
             "`doctune_<split>_messages` and `doctune_<split>_alpaca` for each non-empty split); "
             "`dropped.jsonl` (every removed row with its reason)."]
    if m.get("text_rows"):
        lines += ["", f"Text-completion rows: {m['text_rows']} (the documents' own text, chunk by chunk under its "
                      "title and headings): `text.jsonl`, and `doctune_text` in `dataset_info.json` for "
                      "LLaMA-Factory's pt stage."]
    return "\n".join(lines) + "\n"


# Not cached: writing is idempotent by content, and a cached path could point at a deleted folder.
# log_prints off: `datasets` fingerprinting prints bytecode disassembly that would flood the UI log.
@task(log_prints=False)
def write_dataset_task(pairs: list[QAPair], dropped: list[Dropped], counts: dict, settings: DatasetSettings,
                       output_dir: str, texts: list[dict] = ()) -> str:
    return str(write_dataset(pairs, dropped, counts, settings, output_dir, texts))
