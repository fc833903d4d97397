"""What a run reports: peak memory, the loss plot (loss.png) and the markdown of the train-loss artifact."""

from __future__ import annotations

import base64
import json
import resource
from pathlib import Path

import torch


def peak_memory(device: str) -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def plot_loss(losses: list[dict], path: Path, evals: list[dict] | None = None, selected: int | None = None) -> None:
    # The object API renders with Agg without switching pyplot's global backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], lw=1.5, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (reply tokens)")
    ax.set_title("training loss" + (" and validation fact recall" if evals else ""))
    ax.grid(alpha=0.3)
    if evals:
        right = ax.twinx()
        right.plot([e["step"] for e in evals], [e["fact_recall"] for e in evals], "o-", color="tab:green", lw=1.2)
        right.set_ylabel("validation fact recall", color="tab:green")
        right.set_ylim(0, 1)
        if selected is not None:
            ax.axvline(selected, color="tab:green", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path)


def loss_markdown(run_dir: Path, every: int = 5) -> str:
    """The train-loss artifact: loss every `every` steps, validation scores, the plot (embedded when small)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = metrics["losses"]
    rows = [r for r in losses if r["step"] % every == 0 or r["step"] in (1, len(losses))]
    lines = [
        f"## Training loss: `{run_dir.name}`",
        "",
        f"{metrics['plan']}; {metrics['steps']} steps in {metrics['train_seconds']} s, "
        f"{metrics['tokens_per_s']} tokens/s, peak RSS {metrics['peak_rss_mb']} MB",
        "",
        "| step | loss | lr |",
        "|---:|---:|---:|",
        *[f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} |" for r in rows],
        "",
    ]
    if metrics.get("validation"):
        lines += [
            f"Validation (held-out paraphrased questions), every evaluated step; the weights kept are those of step "
            f"{metrics['selected_step']}:",
            "",
            "| step | validation fact recall | ROUGE-L |",
            "|---:|---:|---:|",
            *[f"| {e['step']} | {e['fact_recall']:.3f} | {e['rouge_l']:.3f} |" for e in metrics["validation"]],
            "",
        ]
    lines.append(f"Loss curve: `{run_dir / 'loss.png'}`")
    png = (run_dir / "loss.png").read_bytes()
    if len(png) < 100_000:  # small enough to embed
        lines += ["", f"![loss](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines)
