"""Does the fine-tuned model know the documents better than its base? Numbers that say so.

Base, candidate and (when there is one) the model being served answer the hand-written gold
questions, the exam the build wrote beside the dataset (doctune/exam.py) and the held-out test split. Each
reply is scored by fact recall (are the key facts in it), ROUGE-L and chrF, and optionally by an
LLM judge; scores are aggregated per set and per language. Text is tokenised so that Chinese is
scored on characters, never on whitespace "words": that mistake is why Chinese BLEU/ROUGE so
often comes out 0.0. tasks/promote.py then lets a candidate replace the current model only when it
beats it by a margin on the gold set, or on the exam when the folder has no gold. The LLM judge is doctune/judge.py; loading a model or a run for
greedy answers is doctune/generation.py.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Literal

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel, Field

from doctune.exam import exam_digest, exam_path
from doctune.generation import answer_nll, generate_answers
from doctune.gold import gold_digest, gold_files
from doctune.judge import judge_replies
from doctune.metrics import (Language, answer_facts, chrf, detect_language, facts_found, fmt_score, key_facts,
                             rouge_l)
from doctune.model_settings import EvalSettings, MetricName
from doctune.prefect_utils import CACHE
from doctune.prompts import PROMPTS_DIR, load_prompt
from doctune.records import read_jsonl, sha256_bytes, sha256_text, write_jsonl
from doctune.runs import base_model_of, dataset_system_prompt, full_model_of

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- evaluation

SetName = Literal["gold", "exam", "test"]
SETS = ("gold", "exam", "test")
MODELS = ("base", "current", "tuned")


class EvalItem(BaseModel):
    set: SetName
    id: str
    question: str
    reference: str
    facts: list[str]
    facts_from: Literal["gold", "key_facts"]
    language: Language
    system: str
    path: str | None = Field(None, description="The document the question is about, where known.")
    doc_id: str | None = Field(None, description="Content hash of that document (exam questions), so a decision can "
                               "tell questions about new or changed documents from the rest.")


class MetricRow(BaseModel):
    set: SetName
    language: Literal["all", "en", "zh"]
    metric: MetricName
    n: int = Field(description="Examples scored (fact recall skips rows without facts).")
    base: float
    tuned: float
    delta: float
    better: int = Field(description="Examples where the fine-tuned model scored higher than the base.")
    worse: int
    current: float | None = Field(None, description="The model being served, scored on the same examples.")


class EvalReport(BaseModel):
    name: str
    eval_dir: str
    created: str
    fingerprint: str
    base_model: str
    candidate: str
    gold_path: str | None
    gold_sha256: str | None
    exam_path: str | None = None
    exam_sha256: str | None = None
    general: dict | None = Field(None, description="The forgetting check (general_check): its rows and verdict.")
    current: str | None = Field(None, description="The model being served, scored beside the candidate.")
    dataset_dir: str | None
    settings: EvalSettings
    counts: dict[str, int]
    dropped: list[dict]
    metrics: list[MetricRow]

    def get(self, metric: str, set: str = "gold", language: str = "all") -> MetricRow | None:
        return next((m for m in self.metrics if (m.metric, m.set, m.language) == (metric, set, language)), None)


def load_gold(path: str | Path, system: str, set_name: SetName = "gold") -> tuple[list[EvalItem], list[dict]]:
    """Gold rows (a JSONL file or a folder of them, doctune/gold.py), or an exam's (set_name 'exam': the same
    format), as EvalItems; a malformed line is dropped with a reason instead of failing the run."""
    items, dropped = [], []
    lines = [(f, n, line) for f in gold_files(path)
             for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)]
    for f, n, line in lines:
        if not line.strip():
            continue
        where = f"{f} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            dropped.append({"where": where, "reason": f"not JSON ({exc})"})
            continue
        missing = [k for k in ("question", "answer") if not str(row.get(k) or "").strip()]
        if missing:
            dropped.append({"where": where, "reason": f"missing {', '.join(missing)}"})
            continue
        language = row.get("language") or detect_language(row["question"] + row["answer"])
        if language not in ("en", "zh"):
            dropped.append({"where": where, "reason": f"language {language!r} is not 'en' or 'zh'"})
            continue
        facts = [str(f) for f in row.get("facts") or [] if str(f).strip()]
        items.append(EvalItem(
            set=set_name, id=str(row.get("id") or (f"{set_name}-{n}" if f == Path(path) else f"{f.stem}-{n}")),
            question=row["question"], reference=row["answer"],
            facts=facts or key_facts(row["answer"], language), facts_from="gold" if facts else "key_facts",
            language=language, system=system, path=row.get("path"), doc_id=row.get("doc_id"),
        ))
    return items, dropped


def load_test_split(dataset_dir: str | Path, limit: int) -> list[EvalItem]:
    """The first `limit` rows of the held-out split (already shuffled with the dataset's seed)."""
    from datasets import load_from_disk

    hf = Path(dataset_dir) / "hf"
    if not hf.exists():
        raise FileNotFoundError(f"{hf} is missing: is {dataset_dir} a dataset folder written by build_dataset?")
    splits = load_from_disk(str(hf))
    if "test" not in splits or limit == 0:
        return []
    test = splits["test"].select(range(min(limit, len(splits["test"]))))
    return [
        EvalItem(
            set="test", id=row["pair_id"], question=row["question"], reference=row["answer"],
            facts=answer_facts(row["question"], row["answer"], row["language"]), facts_from="key_facts",
            language=row["language"], system=row["system"], path=row["path"] or None,
        )
        for row in test
    ]


def score_reply(reply: str, item: EvalItem) -> dict:
    found = facts_found(reply, item.facts)
    return {
        "fact_recall": sum(found) / len(found) if found else None,
        "rouge_l": rouge_l(reply, item.reference),
        "chrf": chrf(reply, item.reference),
        "missing_facts": [f for f, ok in zip(item.facts, found) if not ok],
    }


def aggregate(examples: list[dict], metrics: list[str]) -> list[MetricRow]:
    rows = []
    for set_name in SETS:
        for language in ("all", "en", "zh"):
            chosen = [e for e in examples if e["set"] == set_name and language in ("all", e["language"])]
            for metric in metrics:
                scored = [e for e in chosen if all(e[w].get(metric) is not None for w in MODELS if w in e)]
                if not scored:
                    continue
                base, tuned = fmean(e["base"][metric] for e in scored), fmean(e["tuned"][metric] for e in scored)
                current = fmean(e["current"][metric] for e in scored) if "current" in scored[0] else None
                rows.append(MetricRow(
                    set=set_name, language=language, metric=metric, n=len(scored), base=round(base, 4),
                    tuned=round(tuned, 4), delta=round(tuned - base, 4),
                    better=sum(e["tuned"][metric] > e["base"][metric] for e in scored),
                    worse=sum(e["tuned"][metric] < e["base"][metric] for e in scored),
                    current=None if current is None else round(current, 4),
                ))
    return rows


def _file_digest(path: Path) -> str:
    # Weights of a big base model are never rewritten in place (new runs get new folders), so
    # size + mtime identify them without reading gigabytes on every evaluation.
    stat = path.stat()
    if stat.st_size > 64 * 2**20:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return sha256_bytes(path.read_bytes())


def model_fingerprint(model_ref: str | Path) -> str:
    ref = Path(model_ref)
    if not ref.exists():
        return f"id:{model_ref}"
    if (ref / "run.json").exists():
        files = [ref / "run.json", *sorted((full_model_of(ref) or ref / "adapter").glob("*"))]
        base = base_model_of(ref)
        extra = model_fingerprint(base)
    else:
        files, extra = sorted(ref.glob("*")), ""
    parts = [f"{f.name}={_file_digest(f)}" for f in files if f.is_file()]
    return sha256_text("\n".join([*parts, extra]))


def eval_fingerprint(base_model: str, candidate_run_dir: str, gold_path: str | None, test_items: list[EvalItem],
                     settings: EvalSettings, exam_file: str | Path | None = None, current: str | None = None) -> str:
    gold = gold_digest(gold_path) if gold_path else ""
    test = sha256_text(json.dumps([i.model_dump(exclude={"path", "doc_id"}) for i in test_items], ensure_ascii=False))
    parts = [model_fingerprint(base_model), model_fingerprint(candidate_run_dir), gold, test,
             settings.model_dump(mode="json")]
    if exam_file or current:
        parts += [exam_digest(exam_file) if exam_file else "", model_fingerprint(current) if current else ""]
    if settings.forgetting_check:
        parts.append(sha256_bytes((PROMPTS_DIR / f"{GENERAL_PROMPT}.yaml").read_bytes()))
    return sha256_text(json.dumps(parts))


GENERAL_PROMPT = "general_check"


def general_check(base_model: str, candidate: str, system: str, settings: EvalSettings) -> dict:
    """Did the candidate forget how to answer anything but the documents? Base and candidate answer the shipped
    general prompts; each model's mean loss per token on the base's own answers is compared (offline, no
    judge): a candidate that moved far from them has lost what the base could do."""
    prompt = load_prompt(GENERAL_PROMPT, required=("version", "prompts"))
    rows = [(language, q) for language in ("en", "zh") for q in prompt["prompts"].get(language, [])]
    questions, systems = [q for _, q in rows], [system] * len(rows)
    gen = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    base_replies = generate_answers(base_model, questions, systems, **gen)
    tuned_replies = generate_answers(candidate, questions, systems, **gen)
    base_nll = answer_nll(base_model, questions, systems, base_replies)
    tuned_nll = answer_nll(candidate, questions, systems, base_replies)
    table = [{"language": language, "prompt": q, "base_reply": b, "tuned_reply": t, "base_nll": bn, "tuned_nll": tn,
              "shift": None if bn is None or tn is None else round(tn - bn, 4)}
             for (language, q), b, t, bn, tn in zip(rows, base_replies, tuned_replies, base_nll, tuned_nll)]
    shifts = [r["shift"] for r in table if r["shift"] is not None]
    mean_shift = round(fmean(shifts), 4) if shifts else 0.0
    return {"version": prompt["version"], "prompts": len(rows), "mean_shift": mean_shift,
            "tolerance": settings.forgetting_tolerance, "passed": mean_shift <= settings.forgetting_tolerance,
            "rows": sorted(table, key=lambda r: -(r["shift"] or 0.0))}


def exam_of(dataset_dir: str | Path | None) -> Path | None:
    """The exam the build wrote beside the dataset, if there is one."""
    path = exam_path(dataset_dir) if dataset_dir else None
    return path if path and path.exists() else None


def current_to_score(current_run_dir: str | Path | None, candidate: str) -> str | None:
    """The model being served, when it is a run other than the candidate (the base is scored anyway)."""
    if not current_run_dir or str(current_run_dir) == candidate or not (Path(current_run_dir) / "run.json").exists():
        return None
    return str(current_run_dir)


def evaluate(
    base_model: str | Path,
    candidate_run_dir: str | Path,
    dataset_dir: str | Path | None,
    gold_path: str | Path | None,
    settings: EvalSettings,
    output_root: str | Path,
    current_run_dir: str | Path | None = None,
) -> EvalReport:
    """Base, candidate and the current model (`current_run_dir`, the one being served, when given) answer
    the gold set, the exam beside the dataset and the test split; writes report.json, examples.jsonl and
    report.md under <output_root>/evals/<candidate>-<hash>/. The folder is named after the content
    of the models, the gold file, the exam, the test rows and the settings: an identical evaluation returns
    the existing report, and nothing is ever overwritten."""
    base_model, candidate = str(base_model), str(candidate_run_dir)
    current = current_to_score(current_run_dir, candidate)
    exam_file = exam_of(dataset_dir)
    if gold_path is not None and (not Path(gold_path).exists() or not gold_files(gold_path)):
        raise FileNotFoundError(f"{gold_path}: no gold file there; write one JSON line per question "
                                '({"id", "question", "answer", "facts", "language"}) in a .jsonl file (or a folder '
                                "of them), or pass gold_path=None")
    test_items = load_test_split(dataset_dir, settings.max_test_examples) if dataset_dir else []
    fingerprint = eval_fingerprint(base_model, candidate, str(gold_path) if gold_path else None, test_items, settings,
                                   exam_file, current)
    name = f"{Path(candidate).name}-{fingerprint[:12]}"
    out = Path(output_root) / "evals" / name
    if (out / "report.json").exists():
        log.info("%s already evaluated in %s", candidate, out)
        report = EvalReport.model_validate_json((out / "report.json").read_text(encoding="utf-8"))
        publish_eval_artifacts(report, read_jsonl(out / "examples.jsonl"))
        return report
    if out.exists():
        raise FileExistsError(f"{out} exists without report.json; it is not ours to overwrite: move it away")

    system = settings.system_prompt if settings.system_prompt is not None else dataset_system_prompt(dataset_dir)
    gold_items, dropped = load_gold(gold_path, system) if gold_path else ([], [])
    exam_items, exam_dropped = load_gold(exam_file, system, "exam") if exam_file else ([], [])
    dropped += exam_dropped
    items = gold_items + exam_items + test_items
    if not items:
        raise ValueError("nothing to evaluate: no gold question, no exam question and an empty test split "
                         f"(dropped: {dropped}); add gold questions or build the dataset with test_size > 0")
    if settings.judge:
        from doctune.llm import preflight

        log.info("judge: %s", preflight(settings.judge_llm))  # fail before an hour of generation, not after

    questions, systems = [i.question for i in items], [i.system for i in items]
    gen = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    replies = {"base": generate_answers(base_model, questions, systems, **gen)}
    if current:
        replies["current"] = generate_answers(current, questions, systems, **gen)
    replies["tuned"] = generate_answers(candidate, questions, systems, **gen)
    scores = {who: [score_reply(r, item) for r, item in zip(replies[who], items)] for who in replies}
    metrics = ["fact_recall", "rouge_l", "chrf"]
    if settings.judge:
        metrics.append("judge")
        for who in replies:
            judged = judge_replies(settings.judge_llm, [(i.question, i.reference, r, i.language)
                                                        for i, r in zip(items, replies[who])])
            for s, j in zip(scores[who], judged):
                s["judge"], s["judge_reason"] = j.score, j.reason

    general = general_check(base_model, candidate, system, settings) if settings.forgetting_check else None

    examples = []
    for k, item in enumerate(items):
        base_s, tuned_s = scores["base"][k], scores["tuned"][k]
        example = {
            "set": item.set, "id": item.id, "language": item.language, "question": item.question,
            "reference": item.reference, "facts": item.facts, "facts_from": item.facts_from, "path": item.path,
            "doc_id": item.doc_id,
            "base_reply": replies["base"][k], "tuned_reply": replies["tuned"][k], "base": base_s, "tuned": tuned_s,
            "delta": {m: round(tuned_s[m] - base_s[m], 4) for m in metrics
                      if base_s.get(m) is not None and tuned_s.get(m) is not None},
        }
        if current:
            example |= {"current_reply": replies["current"][k], "current": scores["current"][k]}
        examples.append(example)
    report = EvalReport(
        name=name, eval_dir=str(out), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=fingerprint, base_model=base_model, candidate=candidate,
        gold_path=str(gold_path) if gold_path else None,
        gold_sha256=gold_digest(gold_path) if gold_path else None,
        exam_path=str(exam_file) if exam_file else None, exam_sha256=exam_digest(exam_file) if exam_file else None,
        current=current, general=general, dataset_dir=str(dataset_dir) if dataset_dir else None, settings=settings,
        counts={"gold": len(gold_items), "exam": len(exam_items), "test": len(test_items), "dropped": len(dropped)},
        dropped=dropped, metrics=aggregate(examples, metrics),
    )
    # Written beside the final folder and renamed, so a crash never leaves a half report behind.
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp / "examples.jsonl", examples)
    (tmp / "report.md").write_text(report_markdown(report, examples), encoding="utf-8")
    (tmp / "report.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(out)
    publish_eval_artifacts(report, examples)
    return report


# --------------------------------------------------------------------------- reading the results

def _short(text: str, n: int = 140) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def ranked_examples(examples: list[dict], k: int = 5) -> tuple[list[dict], list[dict]]:
    """Up to k examples the fine-tuned model answered better than the base (by fact recall, then
    chrF), most improved first, and up to k it answered worse, most regressed first."""
    def key(e):
        return (e["delta"].get("fact_recall", 0.0), e["delta"].get("chrf", 0.0))

    best = sorted((e for e in examples if key(e) > (0.0, 0.0)), key=key, reverse=True)[:k]
    worst = sorted((e for e in examples if key(e) < (0.0, 0.0)), key=key)[:k]
    return best, worst


def metrics_table(report: EvalReport) -> list[dict]:
    """Rows metric x set (x language) with base, fine-tuned and delta: the numbers to look at first."""
    return [{"metric": m.metric, "set": m.set, "language": m.language, "n": m.n, "base": m.base,
             **({"current": m.current} if report.current else {}),
             "fine-tuned": m.tuned, "delta": f"{m.delta:+.3f}", "better/worse": f"{m.better}/{m.worse}"}
            for m in report.metrics]


def per_document(examples: list[dict], set_name: str) -> list[dict]:
    """What each model knows of each document: questions and fact recall per file, and the facts the
    fine-tuned model missed, so a person sees "handbook.md 9/10, prices.xlsx 2/8"."""
    by_doc: dict[str, list[dict]] = {}
    for e in examples:
        if e["set"] == set_name and e["tuned"].get("fact_recall") is not None:
            by_doc.setdefault(e.get("path") or "–", []).append(e)
    rows = []
    for doc, group in sorted(by_doc.items()):
        right = {w: sum(e[w]["fact_recall"] == 1.0 for e in group) for w in MODELS if w in group[0]}
        missed = [f for e in group for f in e["tuned"]["missing_facts"]]
        rows.append({"document": doc, "questions": len(group),
                     **{("fine-tuned" if w == "tuned" else w): f"{right[w]}/{len(group)}" for w in right},
                     "fine-tuned recall": round(fmean(e["tuned"]["fact_recall"] for e in group), 3),
                     "missed facts": (", ".join(missed)[:200]) or "none"})
    return rows


def side_by_side_table(examples: list[dict], k: int = 10, limit: int = 200) -> list[dict]:
    """Every question with both replies (✓ = every key fact found): the k most improved first,
    then the k most regressed, then the rest in order."""
    def mark(score: dict) -> str:
        r = score["fact_recall"]
        return "–" if r is None else ("✓" if r == 1.0 else "✗") + f" {r:.2f}"

    best, worst = ranked_examples(examples, k)
    shown = {id(e) for e in best + worst}
    groups = (("improved", best), ("regressed", worst), ("", [e for e in examples if id(e) not in shown]))
    return [{"change": label, "set": e["set"], "question": _short(e["question"]), "reference": _short(e["reference"]),
             "base": f"{mark(e['base'])} {_short(e['base_reply'])}",
             "fine-tuned": f"{mark(e['tuned'])} {_short(e['tuned_reply'])}"}
            for label, group in groups for e in group][:limit]


def report_markdown(report: EvalReport, examples: list[dict]) -> str:
    lines = [f"# Evaluation `{report.name}`", "",
             f"- base: `{report.base_model}`", f"- fine-tuned: `{report.candidate}`",
             *([f"- current (the model being served): `{report.current}`"] if report.current else []),
             f"- gold: `{report.gold_path}` ({report.counts['gold']} questions, "
             f"{report.counts['dropped']} rows dropped)",
             f"- exam: `{report.exam_path}` ({report.counts.get('exam', 0)} questions about the documents, none "
             "seen in training)",
             f"- test split: `{report.dataset_dir}` ({report.counts['test']} questions)", ""]
    metric = report.settings.promotion_metric
    for set_name in ("gold", "exam"):
        if row := report.get(metric, set_name):
            now = f", current {fmt_score(row.current)}" if row.current is not None else ""
            lines += [f"**{row.metric} on the {set_name} set: base {fmt_score(row.base)}{now} → fine-tuned "
                      f"{fmt_score(row.tuned)} ({row.delta:+.3f} over the base; better on {row.better}, worse on "
                      f"{row.worse} of {row.n}).**", ""]
    if not report.get(metric, "gold") and not report.get(metric, "exam") and (row := report.get(metric, "test")):
        lines += [f"**{row.metric} on the test set: base {fmt_score(row.base)} → fine-tuned {fmt_score(row.tuned)} "
                  f"({row.delta:+.3f}).**", ""]
    cur = bool(report.current)
    lines += ["| metric | set | language | n | base |" + (" current |" if cur else "") + " fine-tuned | delta |",
              "|---|---|---|---|---|" + ("---|" if cur else "") + "---|---|"]
    lines += [f"| {m.metric} | {m.set} | {m.language} | {m.n} | {fmt_score(m.base)} | "
              + (f"{fmt_score(m.current)} | " if cur else "") + f"{fmt_score(m.tuned)} | {m.delta:+.3f} |"
              for m in report.metrics]
    lines += ["", "fact_recall: share of key facts found in the reply (normalised substring); rouge_l: LCS F1 on "
              "words (English) or characters (Chinese); chrf: character n-gram F-score, 0-1; judge: LLM grade 1-5."]
    if report.general:
        g = report.general
        lines += ["", "## General prompts (the forgetting check)", "",
                  f"Mean loss shift on the base model's own answers: {g['mean_shift']:+.3f} nats/token "
                  f"(tolerance {g['tolerance']:.3f}): **{'kept' if g['passed'] else 'forgotten'}**. Most changed first.",
                  "", "| prompt | shift | base | fine-tuned |", "|---|---|---|---|"]
        lines += [f"| {_short(r['prompt'], 60)} | {fmt_score(r['shift'])} | {_short(r['base_reply'], 80)} | "
                  f"{_short(r['tuned_reply'], 80)} |" for r in g["rows"]]
    for set_name in ("exam", "gold"):
        rows = per_document(examples, set_name)
        if rows and any(r["document"] != "–" for r in rows):
            head = list(rows[0])
            lines += ["", f"## What the models know, per document ({set_name}: questions with every key fact found)",
                      "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k in head) + " |" for r in rows]
    lines.append("")
    best, worst = ranked_examples(examples)
    for title, group in (("Most improved", best), ("Most regressed", worst)):
        lines += [f"## {title}", ""]
        for e in group:
            lines += [f"**{e['set']} `{e['id']}`** {e['question']}", "",
                      f"- reference: {_short(e['reference'], 300)}",
                      f"- base ({fmt_score(e['base']['fact_recall'])}): {_short(e['base_reply'], 300)}",
                      f"- fine-tuned ({fmt_score(e['tuned']['fact_recall'])}): {_short(e['tuned_reply'], 300)}",
                      f"- facts: {', '.join(e['facts']) or '–'}; missed by fine-tuned: "
                      f"{', '.join(e['tuned']['missing_facts']) or 'none'}", ""]
    return "\n".join(lines)


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_eval_artifacts(report: EvalReport, examples: list[dict]) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(metrics_table(report), key="eval-metrics",
                          description=f"Base vs fine-tuned, {report.name}")
    create_table_artifact(side_by_side_table(examples), key="eval-side-by-side",
                          description="Most improved and most regressed answers (✓ = every key fact found)")
    rows = per_document(examples, "exam") or per_document(examples, "gold")
    if rows:
        create_table_artifact(rows, key="eval-per-document",
                              description="What the models know of each document (questions with every key fact found)")


# --------------------------------------------------------------------------- Prefect tasks

def _content_key(context, parameters: dict) -> str:
    # Paths alone would give stale cache hits when a gold file is edited in place: key on content.
    p = parameters
    tests = load_test_split(p["dataset_dir"], p["settings"].max_test_examples) if p["dataset_dir"] else []
    current = current_to_score(p.get("current_run_dir"), str(p["candidate_run_dir"]))
    return eval_fingerprint(p["base_model"], p["candidate_run_dir"], p["gold_path"], tests, p["settings"],
                            exam_of(p["dataset_dir"]), current)


@task(cache_policy=CACHE + CacheKeyFnPolicy(cache_key_fn=_content_key), persist_result=True)
def evaluate_task(base_model: str, candidate_run_dir: str, dataset_dir: str | None, gold_path: str | None,
                  settings: EvalSettings, output_root: str, current_run_dir: str | None = None) -> EvalReport:
    return evaluate(base_model, candidate_run_dir, dataset_dir, gold_path, settings, output_root, current_run_dir)
