"""Does a full fine-tune learn the documents better than the LoRA adapter doctune trains by default?

For each corpus and seed: the dataset as bench/knowledge.py builds it, trained twice by doctune's training
(tasks/train.py) with the same data order, steps, rate schedule and NEFTune noise (configs/demo.yaml): once as
configured (LoRA rank 16) and once with `method: full` (every weight trainable, AdamW at --full-lr). Both are
scored on the corpus's paraphrased questions the way bench/knowledge.py scores them (its `full` recipe is the
second half alone). Until 2026-12-07 the full half was a loop of this script's own, with the same batches and
schedule. Optional extra rows per full fine-tune:
  --ranks 64 128   the full fine-tune's change of each LoRA target layer cut to that rank by SVD (what a LoRA
                   adapter extracted from it would carry; embeddings and norms as in the base)
  --soup           the full fine-tunes of all seeds averaged weight by weight (one model)

Needs the local services (the dataset build):  . scripts/env.sh && scripts/services.sh up prefect llm
Run:  python bench/full_finetune.py --corpora lumen sample --seeds 0 1 --output-dir outputs/bench/k1
The run folders go to <output-dir>/<corpus>/models/ (a full one about 540 MB); every reply to
<output-dir>/<corpus>/replies-*.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import knowledge  # noqa: E402  (bench/knowledge.py: corpora, scoring)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cut_to_rank(full: Path, base: str, out: Path, rank: int) -> float:
    """base + each LoRA target layer's change truncated to `rank` by SVD; returns the share of the change's
    energy (squared singular values) kept."""
    import torch
    from safetensors.torch import load_file, save_file

    tuned, original = load_file(full / "model.safetensors"), load_file(Path(base) / "model.safetensors")
    weights, kept, total = {}, 0.0, 0.0
    for name, w in tuned.items():
        if not any(f".{t}." in name for t in TARGETS):
            weights[name] = original[name]
            continue
        u, s, vh = torch.linalg.svd(w.float() - original[name].float(), full_matrices=False)
        kept, total = kept + float((s[:rank] ** 2).sum()), total + float((s ** 2).sum())
        weights[name] = (original[name] + (u[:, :rank] * s[:rank]) @ vh[:rank]).contiguous()
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(full, out, ignore=shutil.ignore_patterns("*.jsonl"))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return kept / total


def soup(models: list[Path], out: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = [load_file(m / "model.safetensors") for m in models]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(models[0], out, ignore=shutil.ignore_patterns("*.jsonl"))
    save_file({k: (sum(t[k] for t in tensors) / len(tensors)).contiguous() for k in tensors[0]},
              out / "model.safetensors", metadata={"format": "pt"})


def scored(row: dict, model: str, items: list, system: str, replies: Path) -> dict:
    replies.unlink(missing_ok=True)
    row.update(knowledge.shares(model, items, system, replies))
    print(json.dumps(row), flush=True)
    return row


def run_corpus(name: str, seeds: list[int], lr: float, ranks: list[int], with_soup: bool, config: str,
               out: Path) -> tuple[list[dict], dict, str]:
    from doctune.base_model import prepare_base_model
    from doctune.model_settings import load_train_settings
    from tasks.train import train

    dataset, system, items = knowledge.corpus_questions(name, out)
    base = str(prepare_base_model())
    rows, fulls = [], []
    for seed in seeds:
        settings = load_train_settings(config).model_copy(update={"seed": seed})
        run_dir = train(dataset, settings, out / name, progress=False)  # a finished run is reused
        minutes = json.loads((Path(run_dir) / "metrics.json").read_text())["train_seconds"] / 60
        rows.append(scored({"corpus": name, "recipe": "lora-r16", "seed": seed, "train_minutes": round(minutes, 1)},
                           str(run_dir), items, system, out / name / f"replies-lora-r16-seed{seed}.jsonl"))
        # The full fine-tune as doctune trains it (method: full), at the rate asked for.
        full_run = train(dataset, settings.model_copy(update={"method": "full", "learning_rate": lr}), out / name,
                         progress=False)
        full = Path(full_run) / "model"
        minutes = json.loads((Path(full_run) / "metrics.json").read_text())["train_seconds"] / 60
        fulls.append(full)
        recipe = f"full-lr{lr:g}"
        rows.append(scored({"corpus": name, "recipe": recipe, "seed": seed, "train_minutes": round(minutes, 1)},
                           str(full_run), items, system, out / name / f"replies-{recipe}-seed{seed}.jsonl"))
        for rank in ranks:
            # beside the corpus's runs, not inside the run folder (whose content names a finished run)
            cut = out / name / "cuts" / f"{Path(full_run).name}-rank{rank}"
            energy = cut_to_rank(full, base, cut, rank)
            rows.append(scored({"corpus": name, "recipe": f"{recipe}-cut-rank{rank}", "seed": seed,
                                "train_minutes": round(minutes, 1), "energy_kept": round(energy, 3)},
                               str(cut), items, system, out / name / f"replies-{recipe}-rank{rank}-seed{seed}.jsonl"))
            shutil.rmtree(cut)
    if with_soup and len(fulls) > 1:
        mixed = out / name / "soups" / f"{Path(dataset).name}-lr{lr:g}"
        soup(fulls, mixed)
        rows.append(scored({"corpus": name, "recipe": f"full-lr{lr:g}-soup", "seed": None,
                            "train_minutes": round(sum(r["train_minutes"] for r in rows
                                                       if r["recipe"] == f"full-lr{lr:g}"), 1)},
                           str(mixed), items, system, out / name / f"replies-full-lr{lr:g}-soup.jsonl"))
    counts = {lang: sum(i.language == lang for i in items) for lang in ("en", "zh")}
    return rows, counts, dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=list(knowledge.CORPORA), choices=list(knowledge.CORPORA))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full-lr", type=float, default=1e-4, help="the full fine-tune's peak rate (LoRA keeps the "
                    "config's)")
    ap.add_argument("--ranks", type=int, nargs="*", default=[], help="also score each full fine-tune cut to these "
                    "ranks")
    ap.add_argument("--soup", action="store_true", help="also score the seeds' full fine-tunes averaged")
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--output-dir", default=str(ROOT / "outputs/bench/knowledge"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per synthesis call otherwise
    out = Path(args.output_dir)
    report = []
    for corpus in args.corpora:
        rows, counts, dataset = run_corpus(corpus, args.seeds, args.full_lr, args.ranks, args.soup, args.config, out)
        report.append(f"### {corpus}: dataset {Path(dataset).name}, {counts['en']} English and {counts['zh']} "
                      f"Chinese questions\n\n{knowledge.table(rows, counts)}\n")
    print("\n" + "\n".join(report))


if __name__ == "__main__":
    main()
