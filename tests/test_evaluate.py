"""Evaluation: settings, evaluate() end to end on a tiny random model and through its Prefect tasks (the
metrics themselves: tests/test_metrics.py; the judge: tests/test_judge.py; the promotion rule:
tests/test_promote.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from doctune.metrics import chrf, rouge_l
from doctune.model_settings import EvalSettings
from tasks import evaluate as ev
from tasks import promote
from tasks.promote import decide_promotion


def test_eval_settings_validate():
    assert EvalSettings().promotion_margin == 0.05
    with pytest.raises(ValidationError):
        EvalSettings(max_new_token=8)  # misspelt key
    with pytest.raises(ValidationError, match="judge=true"):
        EvalSettings(promotion_metric="judge")


# --------------------------------------------------------------------------- evaluate() end to end

GOLD = [
    {"id": "en-001", "question": "How much does the X2 cost?", "answer": "The X2 costs 149 euros.",
     "facts": ["149 euros", "X2"], "language": "en", "doc": "docs/prices.md", "kind": "document"},
    {"id": "en-002", "question": "Who leads the Berlin office?", "answer": "Alice Smith leads it.",
     "facts": ["Alice Smith"], "language": "en", "doc": "docs/team.md", "kind": "document"},
    {"id": "zh-001", "question": "退货期限是多久？", "answer": "退货期限为30天。", "facts": ["30天"],
     "language": "zh", "doc": "docs/faq.xlsx", "kind": "faq"},
]
TEST_ROWS = [
    ("When did the Berlin office open?", "The Berlin office opened in 2019.", "en"),
    ("How many staff work in Berlin?", "About 1,200 staff work in the Berlin office today.", "en"),
    ("办公室什么时候开放？", "我们的办公室周一至周五开放，周末和法定节假日休息。", "zh"),
]
SYSTEM = "You answer questions about Acme's documents."


def write_dataset(path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    def row(i, q, a, lang):
        return {"pair_id": f"p{i}", "question": q, "answer": a, "system": SYSTEM, "source": "synthesized",
                "language": lang, "doc_id": "d", "path": "docs/x.md", "chunk_id": "d:0",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}

    rows = [row(i, *r) for i, r in enumerate(TEST_ROWS)]
    DatasetDict(train=Dataset.from_list(rows[:1]), test=Dataset.from_list(rows)).save_to_disk(str(path / "hf"))
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random 2-layer Llama with the real SmolLM2 tokenizer, and a run folder with a random LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from doctune.base_model import prepare_base_model

    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(prepare_base_model())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    run = root / "run-001"
    # init_lora_weights=False: random B as well as A, so the adapter really changes the replies.
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"base_model": str(base), "dataset_dir": "-", "method": "lora_fp32",
                                              "device": "cpu", "created": "now"}))
    return base, run


def test_evaluate_end_to_end_on_a_tiny_model(tmp_path, tiny_models):
    base, run = tiny_models
    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps(g, ensure_ascii=False) for g in GOLD) + "\n{not json\n", encoding="utf-8")
    dataset = write_dataset(tmp_path / "ds")
    settings = EvalSettings(max_new_tokens=6, batch_size=8, max_test_examples=3)

    report = ev.evaluate(base, run, dataset, gold, settings, tmp_path / "out")

    out = Path(report.eval_dir)
    assert out.parent == tmp_path / "out" / "evals" and out.name.startswith("run-001-")
    assert {p.name for p in out.iterdir()} == {"report.json", "examples.jsonl", "report.md"}
    assert report.counts == {"gold": 3, "exam": 0, "test": 3, "dropped": 1}
    assert "not JSON" in report.dropped[0]["reason"]
    for set_name in ("gold", "test"):
        for metric in ("fact_recall", "rouge_l", "chrf"):
            for language in ("all", "en", "zh"):
                row = report.get(metric, set_name, language)
                if (metric, set_name, language) == ("fact_recall", "test", "zh"):
                    assert row is None  # its only row has no key span: no fact recall, no fake 0.0
                    continue
                assert row is not None, (metric, set_name, language)
                assert row.delta == pytest.approx(row.tuned - row.base, abs=1e-3)
    assert report.get("rouge_l", "gold", "zh").n == 1 and report.get("rouge_l", "gold", "en").n == 2

    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["question"] for e in examples] == [g["question"] for g in GOLD] + [q for q, _, _ in TEST_ROWS]
    for e in examples:
        assert isinstance(e["base_reply"], str) and isinstance(e["tuned_reply"], str)
        for who in ("base", "tuned"):
            reply = e[f"{who}_reply"]
            assert e[who]["rouge_l"] == pytest.approx(rouge_l(reply, e["reference"]))
            assert e[who]["chrf"] == pytest.approx(chrf(reply, e["reference"]))
    # The random adapter must have been applied: the two models answer differently.
    assert any(e["base_reply"] != e["tuned_reply"] for e in examples)
    assert examples[5]["facts"] == [] and examples[5]["base"]["fact_recall"] is None  # no key span in it
    saved = json.loads((out / "report.json").read_text())
    assert {"base", "tuned", "delta"} <= set(saved["metrics"][0])
    assert "| fact_recall | gold | all |" in (out / "report.md").read_text(encoding="utf-8")
    # The forgetting check: the random adapter moved the model off the base's own general answers.
    general = report.general
    assert general["prompts"] == 12 and len(general["rows"]) == 12 and general["mean_shift"] > 0
    assert {r["language"] for r in general["rows"]} == {"en", "zh"}
    assert all(r["shift"] == pytest.approx(r["tuned_nll"] - r["base_nll"], abs=1e-3) for r in general["rows"])
    assert "## General prompts (the forgetting check)" in (out / "report.md").read_text(encoding="utf-8")

    # Same inputs: the finished folder is returned untouched. Another gold file: a new folder.
    mtime = (out / "report.json").stat().st_mtime_ns
    assert ev.evaluate(base, run, dataset, gold, settings, tmp_path / "out").eval_dir == str(out)
    assert (out / "report.json").stat().st_mtime_ns == mtime
    gold.write_text(json.dumps(GOLD[0]) + "\n", encoding="utf-8")
    again = ev.evaluate(base, run, None, gold, settings, tmp_path / "out")
    assert again.eval_dir != str(out) and again.counts == {"gold": 1, "exam": 0, "test": 0, "dropped": 0}


def test_evaluate_scores_the_exam_beside_the_dataset_and_the_current_model_beside_the_candidate(tmp_path, tiny_models):
    import shutil

    base, run = tiny_models
    dataset = write_dataset(tmp_path / "ds")
    exam = [{"id": "e1", "question": "How much does the Kestrel K4 cost?", "answer": "The Kestrel K4 costs 8,950 euros.",
             "facts": ["8,950"], "language": "en", "path": "prices.md", "doc_id": "aaaa", "chunk_id": "aaaa:0",
             "source": "llm", "prompt_version": "exam-en-1"},
            {"id": "e2", "question": "Who leads Tessarine?", "answer": "Tessarine is led by Jonas Villemo.",
             "facts": ["Jonas Villemo"], "language": "en", "path": "handbook.md", "doc_id": "bbbb",
             "chunk_id": "bbbb:0", "source": "rule", "prompt_version": "cloze-3"}]
    (Path(dataset) / "exam.jsonl").write_text("".join(json.dumps(e) + "\n" for e in exam), encoding="utf-8")
    current = tmp_path / "run-000"
    shutil.copytree(run, current)  # the same weights under another name: its replies equal the candidate's
    settings = EvalSettings(max_new_tokens=4, batch_size=8, max_test_examples=0, forgetting_check=False)

    report = ev.evaluate(base, run, dataset, None, settings, tmp_path / "out", current_run_dir=current)
    assert report.counts == {"gold": 0, "exam": 2, "test": 0, "dropped": 0}
    assert report.current == str(current) and report.exam_path == str(Path(dataset) / "exam.jsonl")
    row = report.get("fact_recall", "exam")
    assert row.n == 2 and row.current == row.tuned
    examples = [json.loads(line) for line in (Path(report.eval_dir) / "examples.jsonl").read_text().splitlines()]
    assert [(e["path"], e["doc_id"]) for e in examples] == [("prices.md", "aaaa"), ("handbook.md", "bbbb")]
    assert all(e["current_reply"] == e["tuned_reply"] for e in examples)
    md = (Path(report.eval_dir) / "report.md").read_text(encoding="utf-8")
    assert "per document (exam" in md and "| handbook.md | 1 |" in md and "current" in md
    # Another exam is another evaluation; the candidate as its own current model is not scored twice.
    (Path(dataset) / "exam.jsonl").write_text(json.dumps(exam[0]) + "\n", encoding="utf-8")
    again = ev.evaluate(base, run, dataset, None, settings, tmp_path / "out", current_run_dir=run)
    assert again.eval_dir != report.eval_dir and again.current is None and again.counts["exam"] == 1


def test_evaluate_scores_scripted_replies_per_language(tmp_path, monkeypatch):
    """With generation scripted (the base knows nothing, the candidate knows the gold facts), the
    aggregates must be exact; two right answers of three are too few to promote on."""
    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps(g, ensure_ascii=False) for g in GOLD), encoding="utf-8")
    tuned_answers = {"How much does the X2 cost?": "It is 149 euros for the X2.",
                     "Who leads the Berlin office?": "I don't know.", "退货期限是多久？": "30 天内可以退货"}

    def scripted(model_ref, questions, system_prompt, max_new_tokens=64, batch_size=8):
        assert system_prompt == [SYSTEM] * len(questions)
        if str(model_ref) == "base-model":
            return ["I don't know."] * len(questions)
        return [tuned_answers[q] for q in questions]

    monkeypatch.setattr(ev, "generate_answers", scripted)
    settings = EvalSettings(system_prompt=SYSTEM, forgetting_check=False)  # its prompts are not scripted
    report = ev.evaluate("base-model", "runs/candidate", None, gold, settings, tmp_path / "out")
    assert report.get("fact_recall", "gold", "en").tuned == 0.5  # X2 right, Alice Smith wrong
    assert report.get("fact_recall", "gold", "zh").tuned == 1.0  # "30 天" matches "30天"
    fr = report.get("fact_recall", "gold")
    assert (fr.base, fr.tuned, fr.delta, fr.better, fr.worse) == (0.0, 0.6667, 0.6667, 2, 0)
    expected = rouge_l("30 天内可以退货", "退货期限为30天。")
    assert report.get("rouge_l", "gold", "zh").tuned == pytest.approx(expected, abs=1e-4)
    assert report.get("rouge_l", "gold", "zh").tuned > 0  # a whitespace tokenizer would give 0.0 here

    table = ev.side_by_side_table(ev.read_jsonl(Path(report.eval_dir) / "examples.jsonl"))
    assert [(r["change"], r["question"]) for r in table] == [
        ("improved", "How much does the X2 cost?"), ("improved", "退货期限是多久？"), ("", "Who leads the Berlin office?")]
    assert table[0]["fine-tuned"].startswith("✓ 1.00") and table[0]["base"].startswith("✗ 0.00")
    assert {r["metric"] for r in ev.metrics_table(report)} == {"fact_recall", "rouge_l", "chrf"}

    d = decide_promotion(report, tmp_path / "registry")
    assert not d.promoted and "0.667" in d.reason and "0.000" in d.reason and "on 3 questions" in d.reason
    assert d.parts[0].low == 0.0 and d.parts[0].high == 1.0  # the bootstrap sees how few they are


def test_a_gold_folder_is_every_jsonl_in_it_and_a_missing_one_names_the_fix(tmp_path, monkeypatch):
    gold = tmp_path / "docs" / "gold"
    gold.mkdir(parents=True)
    (gold / "en.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in GOLD[:2]), encoding="utf-8")
    (gold / "zh.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in GOLD[2:]),
                                   encoding="utf-8")
    (gold / "README.md").write_text("how to write questions")
    monkeypatch.setattr(ev, "generate_answers", lambda model_ref, questions, *a, **k: ["?"] * len(questions))
    report = ev.evaluate("base-model", "runs/candidate", None, gold,
                         EvalSettings(system_prompt=SYSTEM, forgetting_check=False),
                         tmp_path / "out")
    assert report.counts["gold"] == len(GOLD) and report.gold_path == str(gold)
    from doctune.gold import gold_digest

    assert report.gold_sha256 == gold_digest(gold)
    with pytest.raises(FileNotFoundError, match="no gold file there.*gold_path=None"):
        ev.evaluate("base-model", "runs/candidate", None, tmp_path / "docs", EvalSettings(), tmp_path / "out")


# --------------------------------------------------------------------------- Prefect tasks

def test_tasks_cache_on_content_and_publish_artifacts(tmp_path, monkeypatch, prefect_server):
    """prefect_server: the session-wide test server from conftest.py."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps(g, ensure_ascii=False) for g in GOLD), encoding="utf-8")
    calls = []

    def scripted(model_ref, questions, system_prompt, max_new_tokens=64, batch_size=8):
        calls.append(model_ref)
        return ["149 euros, X2, 30天"] * len(questions) if model_ref == "runs/c" else ["?"] * len(questions)

    monkeypatch.setattr(ev, "generate_answers", scripted)

    @flow
    def evaluate_and_promote(out: str):
        report = ev.evaluate_task("base", "runs/c", None, str(gold),
                                  EvalSettings(system_prompt="S", forgetting_check=False), out)
        return report, promote.promote_task(report, out + "/registry")

    report, decision = evaluate_and_promote(str(tmp_path / "out"))
    assert decision.set == "gold" and "95%" in decision.reason and len(calls) == 2
    evaluate_and_promote(str(tmp_path / "out"))
    assert len(calls) == 2  # same content: the evaluation came from the cache
    gold.write_text(json.dumps(GOLD[0]) + "\n", encoding="utf-8")  # edited in place, same path
    evaluate_and_promote(str(tmp_path / "out"))
    assert len(calls) == 4  # keyed on content, so no stale hit

    async def artifact_keys():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            keys = ["eval-metrics", "eval-side-by-side", "promotion-decision"]
            return {a.key for a in await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))}

    assert {"eval-metrics", "eval-side-by-side", "promotion-decision"} <= asyncio.run(artifact_keys())
