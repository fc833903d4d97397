"""The exam: questions about every document of the folder, made by the build and kept apart from training,
so a nightly can tell whether tonight's model learned the user's own documents with no hand-written gold.

`exam.jsonl` lies beside the dataset it was made with (`<output_dir>/datasets/<ds>/exam.jsonl`), one JSON
object a line, in the gold format plus where each question comes from:

    {"id": "...", "question": "...", "answer": "<the fact sentence>", "facts": ["<what a right answer
     must contain>"], "language": "en", "path": "handbook.md", "doc_id": "...", "chunk_id": "...",
     "source": "llm" | "rule", "prompt_version": "..."}

A person may read it, edit it, or replace it by hand: once written it is never rewritten (delete it to have
the next build write it again). `source: rule` marks a question written by the cloze rules (a language
the endpoint cannot write, or a fact the endpoint wrote no usable question for)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EXAM_FILE = "exam.jsonl"


class ExamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Write an exam of questions about every document beside the dataset; "
                          "it decides promotion when the folder has no gold questions.")
    facts_per_question: int = Field(
        3, ge=1, le=100, description="One exam question per this many fact sentences of a document (at least one "
        "per document with a fact), so a long document gets more questions than a short one.")
    max_per_document: int = Field(12, ge=1, le=500, description="At most this many exam questions per document.")
    tries: int = Field(3, ge=0, le=10, description="Questions asked of the endpoint per fact before the fact gets a "
                       "rule-made (cloze) question instead; 0: rule-made questions only, no LLM call.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature of the exam questions (training's "
                               "first question per fact is greedy, so the exam's are worded differently).")
    seed: int = Field(20261206, description="Seed of the exam's own sampling and of which facts are asked, apart "
                      "from the training questions' synth.seed.")


class ExamItem(BaseModel):
    id: str
    question: str
    answer: str = Field(description="The fact sentence the question is about.")
    facts: list[str] = Field(description="What a right answer must contain.")
    language: Literal["en", "zh"]
    path: str
    doc_id: str
    chunk_id: str
    source: Literal["llm", "rule"]
    prompt_version: str


def exam_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / EXAM_FILE


def write_exam(dataset_dir: str | Path, items: list[ExamItem]) -> tuple[Path, bool]:
    """Write exam.jsonl beside the dataset unless one is there already (a person's edit wins). Returns the
    path and whether it was written now."""
    path = exam_path(dataset_dir)
    if path.exists():
        return path, False
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(i.model_dump(), ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    tmp.replace(path)
    return path, True


def exam_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def exam_table(items: list[ExamItem], documents: list[str]) -> list[dict]:
    """One row per document: how many exam questions, written by the endpoint or by rule, and one of them.
    A document without a question says so, so a person sees what the exam does not cover."""
    by_doc: dict[str, list[ExamItem]] = {}
    for i in items:
        by_doc.setdefault(i.path, []).append(i)
    rows = []
    for doc in documents:
        mine = by_doc.get(doc, [])
        n = Counter(i.source for i in mine)
        rows.append({"document": doc, "questions": len(mine), "by endpoint": n["llm"], "by rule": n["rule"],
                     "example": (mine[0].question + " → " + ", ".join(mine[0].facts))[:200] if mine else
                     "no fact sentence with a name or number to ask for"})
    return rows
