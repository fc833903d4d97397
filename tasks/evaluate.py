"""Does the fine-tuned model know the documents better than its base? Numbers that say so.

Base and candidate answer the hand-written gold questions and the held-out test split. Each
reply is scored by fact recall (are the key facts in it), ROUGE-L and chrF, and optionally by an
LLM judge; scores are aggregated per set and per language. Text is tokenised so that Chinese is
scored on characters, never on whitespace "words": that mistake is why Chinese BLEU/ROUGE so
often comes out 0.0. `decide_promotion` then lets a candidate replace the current model only
when it beats it on the gold set by a margin.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from pydantic import BaseModel, Field

from doctune.generation import chat_prompts, generate_greedy
from doctune.metrics import (Language, answer_facts, chrf, detect_language, facts_found, fmt_score, key_facts,
                             rouge_l)
from doctune.prefect_utils import CACHE
from doctune.model_settings import EvalSettings, MetricName
from doctune.prompts import PROMPTS_DIR, render
from doctune.records import read_jsonl, sha256_bytes, sha256_text, write_jsonl
from doctune.registry import append_decision, read_current, write_current
from doctune.runs import base_model_of, dataset_system_prompt
from doctune.settings import LLMSettings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- LLM judge

class JudgeScore(BaseModel):
    score: int | None = Field(description="1-5, or None when the judge's reply could not be read.")
    reason: str


def parse_judge_reply(text: str) -> JudgeScore:
    """Lenient: a JSON object anywhere (code fences allowed), else `score: N`, else a bare digit."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        try:
            obj = json.loads(match.group(0))
            score = round(float(obj.get("score")))
            if 1 <= score <= 5:
                return JudgeScore(score=score, reason=str(obj.get("reason", "")).strip())
        except (ValueError, TypeError, AttributeError):
            pass
    match = (re.search(r"(?:score|评分|分数)\W{0,3}([1-5])(?!\d)", text, re.IGNORECASE)
             or re.fullmatch(r"\s*([1-5])\s*", text))
    if match:
        return JudgeScore(score=int(match.group(1)), reason=text.strip()[:300])
    return JudgeScore(score=None, reason=f"unreadable judge reply: {text.strip()[:200]!r}")


def judge_prompt(question: str, reference: str, reply: str, language: Language) -> str:
    name = "judge_zh.md" if language == "zh" else "judge.md"
    template = (PROMPTS_DIR / name).read_text(encoding="utf-8")
    return render(template, question=question, reference=reference, reply=reply)


def judge_replies(llm: LLMSettings, items: list[tuple[str, str, str, Language]]) -> list[JudgeScore]:
    """Score (question, reference, reply, language) tuples concurrently. Calls that still fail after
    their own retries are asked again in up to `llm.task_retries` later rounds (spaced and jittered
    like task retries: a retry of the evaluation task would regenerate every reply); one that fails
    throughout gives a None score with the reason instead of losing the whole evaluation."""
    from doctune.llm import EndpointError, chat, make_client, retry_delays

    client = make_client(llm)

    def one(item: tuple[str, str, str, Language]) -> tuple[JudgeScore, bool]:
        prompt = judge_prompt(*item)
        try:
            result = chat(client, llm, [{"role": "user", "content": prompt}], temperature=0, max_tokens=200)
        except EndpointError as exc:
            return JudgeScore(score=None, reason=f"judge call failed: {exc}"), exc.transient
        return parse_judge_reply(result.text), False

    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool:
        results = list(pool.map(one, items))
        for round_no, delay in enumerate(retry_delays(llm), start=1):
            again = [i for i, (_, retry) in enumerate(results) if retry]
            if not again:
                break
            log.warning("judge: %d of %d calls failed (%s); round %d of %d in %.1f s", len(again), len(items),
                        results[again[0]][0].reason[:200], round_no, llm.task_retries, delay)
            time.sleep(delay)
            for i, result in zip(again, pool.map(one, [items[i] for i in again])):
                results[i] = result
    return [score for score, _ in results]


# --------------------------------------------------------------------------- generation

def load_model(model_ref: str | Path):
    """(model, tokenizer) for a base model path or hub id, a merged model folder, or a training run
    folder (run.json + adapter/), which loads run.json's base model with the peft adapter on top."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = Path(model_ref)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if (ref / "adapter_config.json").exists():
        raise ValueError(f"{ref} is a bare adapter folder; pass its run folder ({ref.parent}, with run.json)")
    if (ref / "run.json").exists():
        if not (ref / "adapter" / "adapter_config.json").exists():
            raise FileNotFoundError(f"{ref}/adapter/adapter_config.json is missing: did training finish?")
        from peft import PeftModel

        base = base_model_of(ref)
        tok_dir = ref / "adapter" if (ref / "adapter" / "tokenizer_config.json").exists() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, ref / "adapter")
    elif ref.exists() and not (ref / "config.json").exists():
        raise FileNotFoundError(f"{ref}: neither a model folder (config.json) nor a run folder (run.json + adapter/)")
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_ref)
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype)
    if tokenizer.chat_template is None:
        raise ValueError(f"{model_ref}: the tokenizer has no chat template; evaluate an instruct/chat model")
    # Decoder-only models continue from the last position: pad on the left so every prompt ends there.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def generate_answers(
    model_ref: str | Path,
    questions: list[str],
    system_prompt: str | list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies, one per question, in order. `system_prompt` is one for all or one per
    question ("" sends no system message; the chat template may then add its own default)."""
    import torch

    if not questions:
        return []
    systems = [system_prompt] * len(questions) if isinstance(system_prompt, str) else list(system_prompt)
    model, tokenizer = load_model(model_ref)
    try:
        return generate_greedy(model, tokenizer, chat_prompts(tokenizer, questions, systems), max_new_tokens,
                               batch_size, desc=f"answering with {Path(model_ref).name}")
    finally:
        # Base and candidate are loaded one after the other: free the first before the second.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- evaluation

class EvalItem(BaseModel):
    set: Literal["gold", "test"]
    id: str
    question: str
    reference: str
    facts: list[str]
    facts_from: Literal["gold", "key_facts"]
    language: Language
    system: str


class MetricRow(BaseModel):
    set: Literal["gold", "test"]
    language: Literal["all", "en", "zh"]
    metric: MetricName
    n: int = Field(description="Examples scored (fact recall skips rows without facts).")
    base: float
    tuned: float
    delta: float
    better: int = Field(description="Examples where the fine-tuned model scored higher than the base.")
    worse: int


class EvalReport(BaseModel):
    name: str
    eval_dir: str
    created: str
    fingerprint: str
    base_model: str
    candidate: str
    gold_path: str | None
    gold_sha256: str | None
    dataset_dir: str | None
    settings: EvalSettings
    counts: dict[str, int]
    dropped: list[dict]
    metrics: list[MetricRow]

    def get(self, metric: str, set: str = "gold", language: str = "all") -> MetricRow | None:
        return next((m for m in self.metrics if (m.metric, m.set, m.language) == (metric, set, language)), None)


def load_gold(path: str | Path, system: str) -> tuple[list[EvalItem], list[dict]]:
    """Gold rows as EvalItems; a malformed line is dropped with a reason instead of failing the run."""
    items, dropped = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
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
            set="gold", id=str(row.get("id") or f"gold-{n}"), question=row["question"], reference=row["answer"],
            facts=facts or key_facts(row["answer"], language), facts_from="gold" if facts else "key_facts",
            language=language, system=system,
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
            language=row["language"], system=row["system"],
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
    for set_name in ("gold", "test"):
        for language in ("all", "en", "zh"):
            chosen = [e for e in examples if e["set"] == set_name and language in ("all", e["language"])]
            for metric in metrics:
                pairs = [(e["base"][metric], e["tuned"][metric]) for e in chosen
                         if e["base"].get(metric) is not None and e["tuned"].get(metric) is not None]
                if not pairs:
                    continue
                base, tuned = fmean(b for b, _ in pairs), fmean(t for _, t in pairs)
                rows.append(MetricRow(
                    set=set_name, language=language, metric=metric, n=len(pairs), base=round(base, 4),
                    tuned=round(tuned, 4), delta=round(tuned - base, 4),
                    better=sum(t > b for b, t in pairs), worse=sum(t < b for b, t in pairs),
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
        files = [ref / "run.json", *sorted((ref / "adapter").glob("*"))]
        base = base_model_of(ref)
        extra = model_fingerprint(base)
    else:
        files, extra = sorted(ref.glob("*")), ""
    parts = [f"{f.name}={_file_digest(f)}" for f in files if f.is_file()]
    return sha256_text("\n".join([*parts, extra]))


def eval_fingerprint(base_model: str, candidate_run_dir: str, gold_path: str | None, test_items: list[EvalItem],
                     settings: EvalSettings) -> str:
    gold = sha256_bytes(Path(gold_path).read_bytes()) if gold_path else ""
    test = sha256_text(json.dumps([i.model_dump() for i in test_items], ensure_ascii=False))
    return sha256_text(json.dumps([model_fingerprint(base_model), model_fingerprint(candidate_run_dir), gold, test,
                                   settings.model_dump(mode="json")]))


def evaluate(
    base_model: str | Path,
    candidate_run_dir: str | Path,
    dataset_dir: str | Path | None,
    gold_path: str | Path | None,
    settings: EvalSettings,
    output_root: str | Path,
) -> EvalReport:
    """Both models answer the gold set and the test split; writes report.json, examples.jsonl and
    report.md under <output_root>/evals/<candidate>-<hash>/. The folder is named after the content
    of the models, the gold file, the test rows and the settings: an identical evaluation returns
    the existing report, and nothing is ever overwritten."""
    base_model, candidate = str(base_model), str(candidate_run_dir)
    if gold_path is not None and not Path(gold_path).exists():
        raise FileNotFoundError(f"{gold_path}: gold file missing; write one JSON line per question "
                                '({"id", "question", "answer", "facts", "language"}) or pass gold_path=None')
    test_items = load_test_split(dataset_dir, settings.max_test_examples) if dataset_dir else []
    fingerprint = eval_fingerprint(base_model, candidate, str(gold_path) if gold_path else None, test_items, settings)
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
    items = gold_items + test_items
    if not items:
        raise ValueError("nothing to evaluate: the gold file has no valid rows and the test split is empty "
                         f"(dropped: {dropped}); add gold questions or build the dataset with test_size > 0")
    if settings.judge:
        from doctune.llm import preflight

        log.info("judge: %s", preflight(settings.judge_llm))  # fail before an hour of generation, not after

    questions, systems = [i.question for i in items], [i.system for i in items]
    gen = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    replies = {
        "base": generate_answers(base_model, questions, systems, **gen),
        "tuned": generate_answers(candidate, questions, systems, **gen),
    }
    scores = {who: [score_reply(r, item) for r, item in zip(replies[who], items)] for who in replies}
    metrics = ["fact_recall", "rouge_l", "chrf"]
    if settings.judge:
        metrics.append("judge")
        for who in replies:
            judged = judge_replies(settings.judge_llm, [(i.question, i.reference, r, i.language)
                                                        for i, r in zip(items, replies[who])])
            for s, j in zip(scores[who], judged):
                s["judge"], s["judge_reason"] = j.score, j.reason

    examples = []
    for k, item in enumerate(items):
        base_s, tuned_s = scores["base"][k], scores["tuned"][k]
        examples.append({
            "set": item.set, "id": item.id, "language": item.language, "question": item.question,
            "reference": item.reference, "facts": item.facts, "facts_from": item.facts_from,
            "base_reply": replies["base"][k], "tuned_reply": replies["tuned"][k], "base": base_s, "tuned": tuned_s,
            "delta": {m: round(tuned_s[m] - base_s[m], 4) for m in metrics
                      if base_s.get(m) is not None and tuned_s.get(m) is not None},
        })
    report = EvalReport(
        name=name, eval_dir=str(out), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=fingerprint, base_model=base_model, candidate=candidate,
        gold_path=str(gold_path) if gold_path else None,
        gold_sha256=sha256_bytes(Path(gold_path).read_bytes()) if gold_path else None,
        dataset_dir=str(dataset_dir) if dataset_dir else None, settings=settings,
        counts={"gold": len(gold_items), "test": len(test_items), "dropped": len(dropped)},
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
             "fine-tuned": m.tuned, "delta": f"{m.delta:+.3f}", "better/worse": f"{m.better}/{m.worse}"}
            for m in report.metrics]


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
             f"- gold: `{report.gold_path}` ({report.counts['gold']} questions, "
             f"{report.counts['dropped']} rows dropped)",
             f"- test split: `{report.dataset_dir}` ({report.counts['test']} questions)", ""]
    metric = report.settings.promotion_metric
    headline = report.get(metric, "gold") or report.get(metric, "test")
    if headline:
        lines += [f"**{headline.metric} on the {headline.set} set: base {fmt_score(headline.base)} → fine-tuned "
                  f"{fmt_score(headline.tuned)} ({headline.delta:+.3f}; better on {headline.better}, worse on "
                  f"{headline.worse} of {headline.n}).**", ""]
    lines += ["| metric | set | language | n | base | fine-tuned | delta |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m.metric} | {m.set} | {m.language} | {m.n} | {fmt_score(m.base)} | {fmt_score(m.tuned)} | "
              f"{m.delta:+.3f} |"
              for m in report.metrics]
    lines += ["", "fact_recall: share of key facts found in the reply (normalised substring); rouge_l: LCS F1 on "
              "words (English) or characters (Chinese); chrf: character n-gram F-score, 0-1; judge: LLM grade 1-5.", ""]
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


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_eval_artifacts(report: EvalReport, examples: list[dict]) -> None:
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(metrics_table(report), key="eval-metrics",
                          description=f"Base vs fine-tuned, {report.name}")
    create_table_artifact(side_by_side_table(examples), key="eval-side-by-side",
                          description="Most improved and most regressed answers (✓ = every key fact found)")


# --------------------------------------------------------------------------- promotion

class Decision(BaseModel):
    promoted: bool
    reason: str
    compared_to: str = Field(description="'current:<run_dir>' or 'base:<model>'; '' when nothing was comparable.")
    candidate: str
    metric: str
    candidate_score: float | None
    reference_score: float | None
    margin: float
    eval_dir: str
    decided_at: str
    # What the candidate was trained on and how (from its run.json), so the registry can tell
    # "documents unchanged" apart from "new data", and its scores on every set and language.
    dataset_dir: str | None = None
    dataset_sha256: str | None = None
    settings_sha256: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)


def decide_promotion(report: EvalReport, registry_dir: str | Path, margin: float | None = None) -> Decision:
    """Promote the candidate only if it beats the current promoted model (or, when none, the base
    model in this report) on the gold set by at least `margin`. Every decision is appended to
    decisions.jsonl; a promotion rewrites current.json atomically."""
    registry = Path(registry_dir)
    metric = report.settings.promotion_metric
    margin = report.settings.promotion_margin if margin is None else margin
    row = report.get(metric, "gold")
    current = read_current(registry)
    candidate_score = row.tuned if row else None
    reference_score, compared_to = None, ""
    if row is None:
        promoted, reason = False, (f"no gold-set {metric} in {report.eval_dir}: nothing to compare; add questions "
                                   "with facts to the gold file")
    elif current and current["run_dir"] == report.candidate:
        # Evaluating the current model again (say, on an edited gold file) refreshes its scores,
        # which is how a registry becomes comparable again after the gold set changed.
        promoted, reason = False, (f"{report.candidate} is already the current model; its scores in "
                                   f"{registry / 'current.json'} now come from {report.eval_dir}")
    elif current and current.get("gold_sha256") != report.gold_sha256:
        promoted, reason = False, (
            f"the current model {current['run_dir']} was scored on another gold file (sha256 "
            f"{str(current.get('gold_sha256'))[:12]} vs {str(report.gold_sha256)[:12]}), so its {metric} is not "
            f"comparable; evaluate {current['run_dir']} on this gold file and decide on that report (it updates "
            f"{registry / 'current.json'}), or delete that file to compare against the base model again")
        compared_to = f"current:{current['run_dir']}"
    elif current and current.get("scores", {}).get(f"gold/all/{metric}") is None:
        promoted, reason = False, (f"the current model {current['run_dir']} has no gold {metric} score in "
                                   f"{registry / 'current.json'}; promote by another metric or re-evaluate it")
        compared_to = f"current:{current['run_dir']}"
    else:
        if current:
            reference_score, compared_to = current["scores"][f"gold/all/{metric}"], f"current:{current['run_dir']}"
        else:
            reference_score, compared_to = row.base, f"base:{report.base_model}"
        gain = round(candidate_score - reference_score, 9)  # 0.35 - 0.30 must count as 0.05
        promoted = gain >= margin
        reason = (f"gold {metric}: candidate {candidate_score:.3f} vs {compared_to.split(':')[0]} "
                  f"{reference_score:.3f} ({gain:+.3f}); promotion needs at least +{margin:.3f}")
    run_json = Path(report.candidate) / "run.json"
    trained = json.loads(run_json.read_text(encoding="utf-8")) if run_json.exists() else {}
    decision = Decision(
        promoted=promoted, reason=reason, compared_to=compared_to, candidate=report.candidate, metric=metric,
        candidate_score=candidate_score, reference_score=reference_score, margin=margin, eval_dir=report.eval_dir,
        decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dataset_dir=trained.get("dataset_dir"), dataset_sha256=trained.get("dataset_sha256"),
        settings_sha256=trained.get("settings_sha256"),
        scores={f"{m.set}/{m.language}/{m.metric}": m.tuned for m in report.metrics},
    )
    append_decision(registry, decision.model_dump(mode="json"))
    rescored = bool(current and current["run_dir"] == report.candidate and row is not None)
    if promoted or rescored:
        record = {
            "run_dir": report.candidate, "base_model": report.base_model, "metric": metric, "score": candidate_score,
            "gold_sha256": report.gold_sha256, "eval_dir": report.eval_dir,
            "dataset_sha256": decision.dataset_sha256, "settings_sha256": decision.settings_sha256,
            "promoted_at": decision.decided_at if promoted else current["promoted_at"],
            "previous": current["previous"] if rescored else (current["run_dir"] if current else None),
            "scores": decision.scores,
        }
        write_current(registry, record)
    return decision


def publish_decision_artifact(decision: Decision) -> None:
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    verdict = "✅ promoted" if decision.promoted else "⛔ not promoted"
    create_markdown_artifact(
        f"## {verdict}: `{decision.candidate}`\n\n{decision.reason}\n\n"
        f"- compared to: `{decision.compared_to or '–'}`\n- evaluation: `{decision.eval_dir}`\n",
        key="promotion-decision", description="Did the candidate replace the current model?",
    )


# --------------------------------------------------------------------------- Prefect tasks

def _content_key(context, parameters: dict) -> str:
    # Paths alone would give stale cache hits when a gold file is edited in place: key on content.
    p = parameters
    tests = load_test_split(p["dataset_dir"], p["settings"].max_test_examples) if p["dataset_dir"] else []
    return eval_fingerprint(p["base_model"], p["candidate_run_dir"], p["gold_path"], tests, p["settings"])


@task(cache_policy=CACHE + CacheKeyFnPolicy(cache_key_fn=_content_key), persist_result=True)
def evaluate_task(base_model: str, candidate_run_dir: str, dataset_dir: str | None, gold_path: str | None,
                  settings: EvalSettings, output_root: str) -> EvalReport:
    return evaluate(base_model, candidate_run_dir, dataset_dir, gold_path, settings, output_root)


# Never cached: the answer depends on the registry, which other runs change.
@task(cache_policy=NO_CACHE)
def promote_task(report: EvalReport, registry_dir: str, margin: float | None = None) -> Decision:
    decision = decide_promotion(report, registry_dir, margin)
    publish_decision_artifact(decision)
    return decision
