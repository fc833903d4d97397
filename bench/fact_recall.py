"""Does the dataset teach the documents? Build a dataset from the prose documents only (FAQ exports
and instruction files left out), fine-tune, and print base vs fine-tuned fact recall on the gold
questions about those documents, which are worded differently from every training question.

Needs the local services:  . scripts/env.sh && scripts/services.sh up prefect llm
Run:                        python bench/fact_recall.py [--config configs/demo.yaml] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from doctune.model_settings import load_train_settings
from doctune.settings import BuildSettings, IngestSettings
from flows.build_dataset import build_dataset
from flows.evaluate import evaluate
from flows.train import train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default=str(ROOT / "data/docs"))
    ap.add_argument("--gold", default=str(ROOT / "data/docs/gold/gold.jsonl"))
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one seed is noisy: compare over several")
    ap.add_argument("--output-dir", default=str(ROOT / "outputs/bench"))
    args = ap.parse_args()
    for name in ("doctune", "tasks", "flows"):  # the device plan and the validation recall per step
        logging.getLogger(name).setLevel(logging.INFO)

    exclude = IngestSettings().exclude + ["faq/**", "instructions/**"]
    settings = BuildSettings(ingest=IngestSettings(exclude=exclude), output_dir=args.output_dir)
    dataset = build_dataset(args.docs, settings)
    rows = []
    for seed in args.seeds:
        train_settings = load_train_settings(args.config).model_copy(update={"seed": seed})
        run = train(dataset, train_settings, args.output_dir)
        result = evaluate(run, None, args.gold, output_dir=args.output_dir)
        examples = [json.loads(line) for line in open(Path(result["eval_dir"]) / "examples.jsonl", encoding="utf-8")]
        gold = {json.loads(line)["id"]: json.loads(line) for line in open(args.gold, encoding="utf-8")}
        doc_en = [e for e in examples if e["set"] == "gold" and gold[e["id"]]["kind"] == "document"
                  and e["language"] == "en"]
        base = sum(e["base"]["fact_recall"] for e in doc_en)
        tuned = sum(e["tuned"]["fact_recall"] for e in doc_en)
        rows.append((seed, len(doc_en), base, tuned))
    print(f"\ndataset: {dataset}  (documents only; FAQ and instruction files left out)")
    print(f"{'seed':>4} {'questions':>9} {'base recall':>12} {'tuned recall':>13} {'ratio':>7}")
    for seed, n, base, tuned in rows:
        ratio = f"{tuned / base:.1f}x" if base else "inf" if tuned else "-"
        print(f"{seed:>4} {n:>9} {base:>6.1f}/{n:<5} {tuned:>6.1f}/{n:<6} {ratio:>7}")


if __name__ == "__main__":
    main()
