"""Check questions.jsonl against the documents as doctune reads them.

    .venv/bin/python bench/corpora/lumen/check_questions.py

- every line loads with doctune's own gold loader (tasks/evaluate.py load_gold over doctune/gold.py) and
  nothing is dropped; ids are unique; every row has id, question, answer, facts, language, doc, kind;
- every fact occurs verbatim in the text doctune ingests from the row's `doc` (a mail's attachments
  count as the mail's text; an FAQ export's text is its answers) and is found in the row's own answer
  by doctune's matcher (doctune/metrics.py facts_found);
- no fact is given away by its question.
Prints the counts and every problem; exits 1 when there is one.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from doctune.metrics import facts_found  # noqa: E402
from doctune.settings import IngestSettings  # noqa: E402
from tasks.evaluate import load_gold  # noqa: E402
from tasks.ingest import ingest_folder  # noqa: E402

FIELDS = ("id", "question", "answer", "facts", "language", "doc", "kind")


def main() -> int:
    questions = HERE / "questions.jsonl"
    problems: list[str] = []
    items, dropped = load_gold(questions, system="")
    problems += [f"dropped by load_gold: {d}" for d in dropped]
    rows = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(items) != len(rows):
        problems.append(f"load_gold kept {len(items)} of {len(rows)} rows")
    for item in items:
        if item.facts_from != "gold":
            problems.append(f"{item.id}: no facts of its own (load_gold derived {item.facts})")
    for row, n in Counter(r.get("id") for r in rows).items():
        if n > 1:
            problems.append(f"id {row} used {n} times")

    result = ingest_folder(HERE / "docs", IngestSettings())
    problems += [f"skipped by ingest: {s.path}: {s.reason}" for s in result.skipped]
    texts: dict[str, list[str]] = {}
    for d in result.documents:  # a mail attachment's path is mail.eml/name: it counts as the mail's text
        texts.setdefault("docs/" + d.path.split(".eml/")[0] + (".eml" if ".eml/" in d.path else ""), []).append(d.text)
    for p in result.pairs:
        texts.setdefault("docs/" + p.path, []).append(p.answer)

    for row in rows:
        rid = row.get("id")
        missing = [k for k in FIELDS if not row.get(k)]
        if missing:
            problems.append(f"{rid}: missing {', '.join(missing)}")
            continue
        if not (HERE / row["doc"]).is_file():
            problems.append(f"{rid}: doc {row['doc']} is not a file")
        if row["kind"] not in ("document", "faq"):
            problems.append(f"{rid}: kind {row['kind']!r}")
        if row["kind"] == "faq" and not any(p.path == row["doc"].removeprefix("docs/") for p in result.pairs):
            problems.append(f"{rid}: kind faq but {row['doc']} gave no FAQ pairs")
        source = texts.get(row["doc"], [])
        for fact in row["facts"]:
            if not any(fact in text for text in source):
                problems.append(f"{rid}: fact {fact!r} not found verbatim in {row['doc']} as ingested")
            if fact.casefold() in row["question"].casefold():
                problems.append(f"{rid}: fact {fact!r} is given away by the question")
        for fact, ok in zip(row["facts"], facts_found(row["answer"], row["facts"])):
            if not ok:
                problems.append(f"{rid}: fact {fact!r} not matched in its own answer")

    by = Counter((r.get("language"), r.get("kind")) for r in rows)
    print(f"{len(rows)} questions, {len(items)} loaded by load_gold, {len(dropped)} dropped")
    for (language, kind), n in sorted(by.items()):
        print(f"  {language} {kind}: {n}")
    print(f"ingest: {len(result.documents)} documents, {len(result.pairs)} FAQ pairs, "
          f"{len(result.skipped)} skipped")
    for p in problems:
        print("PROBLEM", p)
    print("all facts found" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
