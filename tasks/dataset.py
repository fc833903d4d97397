"""Write the final dataset: a `datasets` DatasetDict (seeded train/test split), JSONL in
OpenAI-messages and Alpaca form, the dropped rows, and a short dataset card."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from datasets import Dataset, DatasetDict
from prefect import task

from doctune.records import Dropped, QAPair, sha256_text, write_jsonl
from doctune.settings import DatasetSettings


def to_row(pair: QAPair, system_prompt: str) -> dict:
    system = pair.system or system_prompt
    return {
        "pair_id": pair.pair_id, "question": pair.question, "answer": pair.answer, "system": system,
        "source": pair.source, "language": pair.language, "doc_id": pair.doc_id or "",
        "path": pair.path or "", "chunk_id": pair.chunk_id or "", "mode": pair.mode or "",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": pair.question},
                     {"role": "assistant", "content": pair.answer}],
    }


def fingerprint(pairs: list[QAPair], settings: DatasetSettings) -> str:
    return sha256_text(json.dumps([[p.pair_id for p in pairs], settings.model_dump()]))[:12]


def write_dataset(pairs: list[QAPair], dropped: list[Dropped], counts: dict, settings: DatasetSettings,
                  output_dir: str | Path) -> Path:
    """Returns the dataset folder; an existing folder with the same content is reused, never rewritten."""
    if not pairs:
        raise ValueError("no pairs left to write a dataset from; see the dropped rows and keep rates above")
    out = Path(output_dir) / "datasets" / f"ds-{fingerprint(pairs, settings)}"
    if (out / "manifest.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    rows = [to_row(p, settings.system_prompt) for p in pairs]
    full = Dataset.from_list(rows)
    if settings.test_size and len(rows) >= 10:
        dd = full.train_test_split(test_size=settings.test_size, seed=settings.seed)
    else:
        dd = DatasetDict(train=full, test=full.select([]))
    dd.save_to_disk(str(tmp / "hf"))
    for split, ds in dd.items():
        write_jsonl(tmp / f"{split}.messages.jsonl",
                    ({"messages": r["messages"], "pair_id": r["pair_id"], "source": r["source"],
                      "path": r["path"], "chunk_id": r["chunk_id"]} for r in ds))
        write_jsonl(tmp / f"{split}.alpaca.jsonl",
                    ({"instruction": r["question"], "input": "", "output": r["answer"], "system": r["system"]}
                     for r in ds))
    write_jsonl(tmp / "dropped.jsonl", dropped)
    manifest = {
        "name": out.name, "train": len(dd["train"]), "test": len(dd["test"]),
        "by_source": dict(Counter(r["source"] for r in rows)),
        "by_language": dict(Counter(r["language"] for r in rows)),
        "by_file": dict(Counter(r["path"] for r in rows)),
        "dropped_by_reason": dict(Counter(f"{d.stage}:{d.reason}" for d in dropped)),
        "counts": counts, "settings": settings.model_dump(),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp / "card.md").write_text(dataset_card(manifest), encoding="utf-8")
    tmp.replace(out)
    return out


def dataset_card(m: dict) -> str:
    lines = [f"# Dataset {m['name']}", "",
             f"{m['train']} training and {m['test']} held-out question/answer pairs, built by doctune.", "",
             "| source | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in m["by_source"].items()], "",
             "| language | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in m["by_language"].items()], "",
             "| dropped (stage:reason) | rows |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in sorted(m["dropped_by_reason"].items())], "",
             "| file | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(m["by_file"].items())], "",
             "Files: `hf/` (datasets.load_from_disk), `train|test.messages.jsonl` (OpenAI chat format), "
             "`train|test.alpaca.jsonl`, `dropped.jsonl` (every removed row with its reason)."]
    return "\n".join(lines) + "\n"


# Not cached: writing is idempotent by content, and a cached path could point at a deleted folder.
# log_prints off: `datasets` fingerprinting prints bytecode disassembly that would flood the UI log.
@task(log_prints=False)
def write_dataset_task(pairs: list[QAPair], dropped: list[Dropped], counts: dict, settings: DatasetSettings,
                       output_dir: str) -> str:
    return str(write_dataset(pairs, dropped, counts, settings, output_dir))
