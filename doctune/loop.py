"""The closed loop: the facts the exam shows tonight's model still misses get more training material the next
night: new question wordings for exactly those facts (tasks/loop.py), never near an exam question.

Misses are the candidate's: the model trained on everything the loop has made so far (the served model when
it was promoted). The dataset carries every round's material forward whether or not the candidate was
promoted, so the candidate shows what that dataset still fails to teach, and whether a round's material
taught its facts. The served model would say nothing of a round whose candidate lost on the gold set
(it never saw the material).

It lives in the model's registry (`<output_dir>/registry/<name>/`):

    misses.json  the exam questions tonight's candidate missed at the last evaluation:
                 {"run_dir", "exam_sha256", "decided_at", "misses": [{"id", "doc_id", "chunk_id", "path",
                  "language", "fact", "question", "missing"}]}
    loop.json    the rounds, per document version (doc_id is the content hash of the document):
                 {"documents": {"<doc_id>": {"path", "stopped": null | "<why>", "rounds": [{"round": 1,
                  "opened": "<iso>", "facts": [{"chunk_id", "fact", "language", "exam_ids"}],
                  "result": null | {"closed", "gained", "of", "on"}}]}}}

A round opens after an evaluation, for a document whose exam questions the candidate missed: its missed
facts get material in the next build. The evaluation after that closes it: how many of its facts the next
candidate, trained with that material, answers. A document stops when a round gained nothing or after `loop.max_rounds` rounds; an
edited document is a new version and starts again. The material of every round stays in the dataset (the
model that learned a fact from it would forget it without), so an unchanged folder whose documents all
stopped builds the very same dataset, from the cache, and trains nothing."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from doctune.runs import write_json

LOOP_FILE = "loop.json"
LOOP_MODE = "loop"  # the `mode` of every question/answer row the loop made (tasks/loop.py)
MISSES_FILE = "misses.json"


class LoopSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_rounds: int = Field(
        0, ge=0, le=10, description="Rounds of extra material per document version for the exam questions the "
        "candidate missed; a document also stops when a round gained nothing. 0: no loop. Off until "
        "bench/knowledge.py --loop shows paraphrased questions, not only the exam, rising on both bench corpora: "
        "one round raised the exam +12 and +21 points and left the paraphrases flat (bench/README.md). Exam "
        "questions about drilled facts never decide promotion (tasks/promote.py).")
    questions_per_fact: int = Field(
        4, ge=0, le=20, description="New question wordings asked of the endpoint per missed fact and round (sampled with "
        "the round's seed, checked like synthesis); a language the endpoint cannot write gets rule-made ones only.")
    max_facts: int = Field(
        200, ge=1, le=100_000, description="Missed facts given a round per night, the documents in folder order; "
        "the rest wait for the next night.")
    max_exam_similarity: float = Field(
        0.5, gt=0, le=1, description="A new question whose character-shingle Jaccard similarity with any exam question "
        "reaches this is dropped (with the reason): the exam must stay unseen, or it stops measuring anything. "
        "Stricter than the dedup's near-duplicate threshold, since the new questions ask for the exam's own facts.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature of the new wordings.")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_loop(registry: str | Path) -> dict:
    path = Path(registry) / LOOP_FILE
    if not path.exists():
        return {"documents": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it to start the loop over") from None
    if not isinstance(data, dict) or not isinstance(data.get("documents"), dict):
        raise ValueError(f"{path}: no 'documents' object; delete it to start the loop over")
    return data


def loop_targets(registry: str | Path) -> list[dict]:
    """Every fact of every round, with its round: what the next build makes material for (from the cache for a
    round it already made)."""
    out = []
    for doc_id, doc in read_loop(registry)["documents"].items():
        for r in doc["rounds"]:
            out += [{**f, "doc_id": doc_id, "path": doc["path"], "round": r["round"]} for f in r["facts"]]
    return out


def missed(examples: list[dict], exam_items: list[dict], side: str = "tuned") -> list[dict]:
    """The exam questions `side` (evaluation's 'tuned': the candidate) did not answer fully (fact recall below 1), with the
    fact and chunk each asks about (from exam.jsonl)."""
    by_id = {i["id"]: i for i in exam_items}
    out = []
    for e in examples:
        if e.get("set") != "exam" or e["id"] not in by_id or not e.get(side):
            continue
        recall = e[side].get("fact_recall")
        if recall is None or recall >= 1.0:
            continue
        item = by_id[e["id"]]
        out.append({"id": item["id"], "doc_id": item["doc_id"], "chunk_id": item["chunk_id"], "path": item["path"],
                    "language": item["language"], "fact": item["answer"], "question": item["question"],
                    "missing": e[side].get("missing_facts", [])})
    return out


def after_evaluation(registry: str | Path, misses: list[dict], exam_items: list[dict], run_dir: str,
                     exam_sha256: str, settings: LoopSettings) -> list[dict]:
    """Close the open rounds on tonight's misses (of `run_dir`, the candidate), open the next ones, write
    misses.json and loop.json.
    Returns one row per document in the loop (for the artifact)."""
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    write_json(registry / MISSES_FILE, {"run_dir": run_dir, "exam_sha256": exam_sha256, "decided_at": _now(),
                                    "misses": misses})
    state = read_loop(registry)
    docs_now = {i["doc_id"]: i["path"] for i in exam_items}
    # A document no longer in the exam was edited or removed: its rounds belonged to that version.
    documents = {d: v for d, v in state["documents"].items() if d in docs_now}
    missed_by_doc: dict[str, list[dict]] = {}
    for m in misses:
        missed_by_doc.setdefault(m["doc_id"], []).append(m)
    missed_facts = {(m["chunk_id"], m["fact"]) for m in misses}
    budget = settings.max_facts
    for doc_id, path in docs_now.items():
        doc = documents.get(doc_id)
        if doc and doc["rounds"] and doc["rounds"][-1]["result"] is None:
            last = doc["rounds"][-1]
            gained = sum((f["chunk_id"], f["fact"]) not in missed_facts for f in last["facts"])
            last["result"] = {"closed": _now(), "gained": gained, "of": len(last["facts"]), "on": run_dir}
            if not gained:
                doc["stopped"] = f"round {last['round']} gained nothing"
        mine = missed_by_doc.get(doc_id, [])
        if not mine or settings.max_rounds == 0 or budget <= 0:
            continue
        doc = documents.setdefault(doc_id, {"path": path, "stopped": None, "rounds": []})
        if doc["stopped"]:
            continue
        if len(doc["rounds"]) >= settings.max_rounds:
            doc["stopped"] = f"loop.max_rounds ({settings.max_rounds}) reached"
            continue
        facts: dict[tuple[str, str], dict] = {}
        for m in mine:
            f = facts.setdefault((m["chunk_id"], m["fact"]), {"chunk_id": m["chunk_id"], "fact": m["fact"],
                                                               "language": m["language"], "exam_ids": []})
            f["exam_ids"].append(m["id"])
        chosen = list(facts.values())[:budget]
        budget -= len(chosen)
        doc["rounds"].append({"round": len(doc["rounds"]) + 1, "opened": _now(), "facts": chosen, "result": None})
    write_json(registry / LOOP_FILE, {"documents": documents})
    return loop_rows(documents)


def close_without_training(registry: str | Path, why: str) -> list[dict]:
    """Tonight trained nothing although a round was open (its material was all dropped, or the dataset is one
    already evaluated): the open rounds gained nothing, and their documents stop."""
    registry = Path(registry)
    state = read_loop(registry)
    changed = False
    for doc in state["documents"].values():
        if doc["rounds"] and doc["rounds"][-1]["result"] is None:
            last = doc["rounds"][-1]
            last["result"] = {"closed": _now(), "gained": 0, "of": len(last["facts"]), "on": None}
            doc["stopped"] = f"round {last['round']} trained nothing: {why}"
            changed = True
    if changed:
        write_json(registry / LOOP_FILE, state)
    return loop_rows(state["documents"])


def loop_rows(documents: dict) -> list[dict]:
    rows = []
    for doc in documents.values():
        for r in doc["rounds"]:
            res = r["result"]
            rows.append({"document": doc["path"], "round": r["round"], "facts": len(r["facts"]),
                         "gained": f"{res['gained']} of {res['of']}" if res else "next build, then the evaluation",
                         "status": doc["stopped"] or ("open" if res is None else "continues")})
    return rows
