"""Gold questions: hand-written questions about a document folder, kept in the folder's own `gold/`
(ingest leaves that folder out of training). One JSON object a line: `question`, `answer`, and optionally
`id`, `facts` (strings a right answer must contain) and `language` ("en" or "zh").

A gold set is a JSONL file or a folder of them, read in name order; its digest is the sha256 of the
files' bytes joined in that order, so a folder holding one file has that file's own digest."""

from __future__ import annotations

import hashlib
from pathlib import Path


def gold_files(path: str | Path) -> list[Path]:
    """The JSONL files of a gold set: the file itself, or a folder's *.jsonl in name order."""
    path = Path(path)
    return sorted(path.glob("*.jsonl")) if path.is_dir() else [path]


def gold_bytes(path: str | Path) -> bytes:
    return b"".join(f.read_bytes() for f in gold_files(path))


def gold_digest(path: str | Path) -> str:
    return hashlib.sha256(gold_bytes(path)).hexdigest()
