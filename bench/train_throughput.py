"""Throughput of tasks.train.train against a plain transformers Trainer + peft with default padding.

Same model, synthetic data (realistic spread of question and answer lengths, so padding
matters), steps, LoRA settings, batch size and compute dtype. Each side runs in its own
subprocess, so peak RSS is its own. Prints non-pad tokens/s, s/step and peak memory of both and
the ratio.

    .venv/bin/python bench/train_throughput.py --steps 8 --batch-size 8
    .venv/bin/python bench/train_throughput.py --steps 8 --batch-size 8 --repeats 3
    .venv/bin/python bench/train_throughput.py --batching length_grouped --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the invoice policy requires approval from a manager before payment of any amount above the limit "
    "employees may work remotely two days per week with the agreement of their team lead and the office "
    "closes at six on fridays while the support line stays open until eight for urgent customer requests"
).split()


def synthetic_dataset(out: Path, n: int, seed: int = 0) -> Path:
    """Q&A pairs whose lengths spread like real ones: short questions, answers from one clause to a
    paragraph (log-normal), so a padded batch wastes a realistic share of its tokens."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(6, 24))).capitalize() + "?"
        a_words = min(220, max(4, int(rng.lognormvariate(3.3, 0.8))))  # median ~27 words, long tail
        a = " ".join(rng.choices(WORDS, k=a_words)).capitalize() + "."
        messages = [
            {"role": "system", "content": "You answer questions about the company's documents."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]
        rows.append({"pair_id": str(i), "question": q, "answer": a, "system": messages[0]["content"],
                     "source": "synthesized", "language": "en", "doc_id": "bench", "path": "bench.md",
                     "chunk_id": None, "messages": messages})
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:8])}).save_to_disk(str(out / "hf"))
    return out


def peak(device: str) -> dict:
    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def settings_for(args):
    from doctune.model_settings import TrainSettings

    return TrainSettings(
        base_model=args.model, max_steps=args.steps, per_device_batch_size=args.batch_size,
        batching=args.batching, save_every_steps=0, device=args.device, cpu_dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, method=args.method, lora_dropout=args.lora_dropout,
        fast_lora_dropout=args.fast_dropout,
        learning_rate=2e-4, neftune_alpha=0, question_dropout=0,  # set, not by size: both sides train alike
    )


def run_ours(args) -> dict:
    from tasks.train import train

    with tempfile.TemporaryDirectory() as out:
        run_dir = train(args.data, settings_for(args), out, progress=False)
        m = json.loads((run_dir / "metrics.json").read_text())
        run = json.loads((run_dir / "run.json").read_text())
    return {
        "side": f"ours ({args.batching})", "method": run["method"], "tokens": m["tokens"],
        "seconds": m["train_seconds"], "tokens_per_s": m["tokens_per_s"], "s_per_step": m["s_per_step"],
        "probe": m["probe"], "first_loss": m["losses"][0]["loss"], "last_loss": m["losses"][-1]["loss"],
        "losses": [r["loss"] for r in m["losses"]], **peak(run["device"]),
    }


def run_trainer(args, compute: str) -> dict:
    """The usual recipe: Trainer + peft, DataCollatorForSeq2Seq padding to the longest in the batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from datasets import Dataset

    from doctune.training.data import load_train_split, tokenize_split
    from doctune.training.model import load_tokenizer

    s = settings_for(args)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    tokenizer = load_tokenizer(s.base_model)
    # The same reply-only labels as ours, so both sides learn the same thing.
    examples, _ = tokenize_split(tokenizer, load_train_split(args.data), s)
    dataset = Dataset.from_list(
        [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    )
    torch.manual_seed(s.seed)
    dtype = torch.bfloat16 if device == "cuda" and compute == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(s.base_model, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                             target_modules=s.target_modules, task_type="CAUSAL_LM"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    counted = []

    def collator(features):
        counted.append(sum(len(f["input_ids"]) for f in features))
        return pad(features)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=s.per_device_batch_size, max_steps=s.max_steps,
            learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio,
            max_grad_norm=s.max_grad_norm, gradient_checkpointing=s.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=compute == "bf16",
            use_cpu=device == "cpu", report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False, seed=s.seed,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    tokens = sum(counted[: s.max_steps])  # the dataloader may prefetch a batch it never trains on
    return {
        "side": "Trainer (padded)", "method": f"lora_{compute}", "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / s.max_steps, 3),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None, "losses": losses,
        **peak(device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model folder or HF id (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="CPU compute dtype for ours; the Trainer gets whatever ours used")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "auto"],
                   help="ours; the baseline is always plain LoRA (Trainer's default recipe)")
    p.add_argument("--batching", default="packed", choices=["packed", "length_grouped", "padded"])
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--examples", type=int, default=256, help="synthetic training examples")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="both sides; on CPU its Bernoulli masks are ~1/4 of a step (bench/README.md)")
    p.add_argument("--no-fast-dropout", dest="fast_dropout", action="store_false",
                   help="ours with peft's nn.Dropout per module instead of shared, cheaper masks")
    p.add_argument("--repeats", type=int, default=1,
                   help="run ours and the Trainer this many times, alternating, and report the median ratio "
                   "(CPU time stolen by other guests on a shared machine moves single runs by 10-30%%)")
    p.add_argument("--side", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--compute", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.model:
        from doctune.base_model import prepare_base_model

        args.model = str(prepare_base_model())

    if args.side:  # child process: run one side, print its JSON as the last line
        result = run_ours(args) if args.side == "ours" else run_trainer(args, args.compute)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp), args.examples)
        base = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype,
                "--method", args.method, "--batching", args.batching, "--lora-dropout", str(args.lora_dropout),
                "--data", str(data)]
        if not args.gradient_checkpointing:
            base.append("--no-gradient-checkpointing")
        if not args.fast_dropout:
            base.append("--no-fast-dropout")

        def child(*extra) -> dict:
            done = subprocess.run(base + list(extra), capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench child failed:\n{done.stderr[-3000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        pairs = []
        for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits both sides
            ours = child("--side", "ours")
            compute = "bf16" if ours["method"].endswith("bf16") else "fp32"
            pairs.append((ours, child("--side", "trainer", "--compute", compute)))

    print(f"{args.steps} steps, batch {args.batch_size}, {args.examples} synthetic examples, lora_dropout "
          f"{args.lora_dropout} ({'shared masks' if args.fast_dropout else 'peft nn.Dropout'} on our side), "
          f"model {args.model}")
    for i, (ours, theirs) in enumerate(pairs, 1):
        if args.repeats > 1:
            print(f"-- run {i} of {args.repeats}")
        if ours.get("probe"):
            print(f"probe: {ours['probe']}")
        for r in (ours, theirs):
            mem = ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith(("peak", "cuda")))
            print(f"{r['side']:<22} {r['method']:<16} {r['tokens_per_s']:>8.1f} non-pad tokens/s  "
                  f"{r['s_per_step']:>6.2f} s/step  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  {mem}")
        # The correctness guard for a speed change: both curves (different batch orders, so equal
        # only within noise). Ours is the mean over reply tokens of a step, as is the Trainer's.
        print("loss per step, ours:   ", " ".join(f"{x:.3f}" for x in ours["losses"]))
        print("loss per step, Trainer:", " ".join(f"{x:.3f}" for x in theirs["losses"]))
        print(f"ratio ours/Trainer tokens/s: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
    if args.repeats > 1:
        ratios = sorted(o["tokens_per_s"] / t["tokens_per_s"] for o, t in pairs)
        print(f"median ratio of {args.repeats} runs: {statistics.median(ratios):.2f}x "
              f"(runs: {', '.join(f'{r:.2f}x' for r in ratios)}); median tokens/s ours "
              f"{statistics.median(o['tokens_per_s'] for o, _ in pairs):.1f}, Trainer "
              f"{statistics.median(t['tokens_per_s'] for _, t in pairs):.1f}")


if __name__ == "__main__":
    main()
