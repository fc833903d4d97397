"""The records every stage passes along (documents, chunks, Q&A pairs, drops).

Stages read and write them as JSONL files; one line per record, so a person can open
any intermediate file and a crash never leaves half a JSON document.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal, TypeVar

from pydantic import BaseModel, Field


CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")


def detect_language(text: str) -> str:
    """'zh' when CJK characters are over 20% of letters. An English word is ~5 letters and a
    Chinese one 1-2, so a Chinese text with English terms in it still counts as Chinese."""
    if len(text) > 200_000:  # evenly spread samples keep a 50 MB file fast
        step = len(text) // 10
        text = "".join(text[i:i + 20_000] for i in range(0, len(text), step))
    letters = sum(c.isalpha() for c in text)
    return "zh" if letters and len(CJK_RE.findall(text)) / letters > 0.2 else "en"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def short_hash(*parts: str, n: int = 16) -> str:
    return sha256_text("\x1f".join(parts))[:n]


class Document(BaseModel):
    """One readable file of the knowledge base, as Markdown text."""

    doc_id: str = Field(description="First 16 hex digits of the file's sha256.")
    path: str = Field(description="Path relative to the ingested folder.")
    sha256: str
    format: str = Field(description="pdf, docx, md, html, txt, csv, xlsx, ...")
    title: str
    text: str
    language: Literal["en", "zh"] = "en"
    ocr_pages: dict[str, float] = Field(default_factory=dict, description="Pages read by OCR (1-based page "
                                        "number; 1 for an image) with the engine's confidence; empty: none.")


class Chunk(BaseModel):
    chunk_id: str = Field(description="'<doc_id>:<index>'")
    doc_id: str
    path: str
    index: int
    text: str
    heading_path: list[str] = Field(default_factory=list)
    start: int = Field(description="Character offset of the chunk in Document.text.")
    end: int
    n_tokens: int
    language: Literal["en", "zh"] = "en"
    title: str = ""
    table_header: str = Field("", description="A chunk that starts inside a table too big for one chunk: that "
                              "table's header and separator rows, so its rows are still read with their columns "
                              "(not part of `text`, which stays an exact slice of the document).")

    def shown_text(self) -> str:
        """The text as a reader (or a model) should see it: a table's continuation under its header."""
        return f"{self.table_header}\n{self.text}" if self.table_header else self.text


PairSource = Literal["synthesized", "faq", "instruction", "translated", "replay", "passage", "cloze"]
# Sources whose answer is not one fact: a section's text (passage) or the base model's own reply (replay). Here,
# not in tasks/exam.py: a task module's strings that match a prompt file's name put that prompt in its cache key.
NOT_ONE_FACT = frozenset({"passage", "replay"})


def fact_key(answer: str) -> str:
    """The fact a question/answer row teaches, as rows are grouped by it: its answer, whitespace collapsed."""
    return " ".join(answer.split())


class QAPair(BaseModel):
    pair_id: str = ""
    question: str
    answer: str
    source: PairSource = "synthesized"
    doc_id: str | None = None
    path: str | None = Field(default=None, description="Source file, relative to the folder.")
    chunk_id: str | None = None
    mode: str | None = Field(default=None, description="Synthesis mode: 'fact', 'qa', 'passage' or 'cloze'.")
    model: str | None = None
    prompt_version: str | None = None
    language: Literal["en", "zh"] = "en"
    system: str | None = None
    translated_from: str | None = Field(default=None, description="pair_id of the original.")

    def model_post_init(self, __context) -> None:
        if not self.pair_id:
            self.pair_id = short_hash(self.question, self.answer, self.chunk_id or self.path or "")


class Dropped(BaseModel):
    """A row a filter removed, kept with the reason so nothing disappears silently."""

    stage: str
    reason: str
    record: dict
    duplicate_of: str | None = None
    detail: str | None = None


class SkippedFile(BaseModel):
    path: str
    reason: str


R = TypeVar("R", bound=BaseModel)


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> Path:
    """Write records atomically: a temp file renamed into place, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            row = r.model_dump() if isinstance(r, BaseModel) else r
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def replacing_dir(final: Path) -> Iterator[Path]:
    """An empty .tmp- sibling of `final` to write a folder into; when the block ends without an error it
    takes the place of `final` (an older folder of that name goes first), so `final` is whole or absent,
    never half written. After an error the .tmp- folder stays, and the next write clears it."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def read_jsonl(path: str | Path, model: type[R] | None = None) -> list:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append(model.model_validate(row) if model else row)
    return rows
