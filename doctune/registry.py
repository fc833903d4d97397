"""The model registry a person can read: `outputs/registry/<model name>/`, one per model (a nightly names its
model after its folder, or `model_name`), so two folders on one output folder never compare against each
other. (`outputs/registry/` itself held the one registry of earlier versions; it is still read as such.)

- `current.json`: the promoted model (run folder, dataset and settings hashes, scores, when, the one before);
  rewritten atomically by a promotion only.
- `decisions.jsonl`: every evaluated candidate, one line each, appended and never rewritten: its dataset
  hash, settings digest, scores on every set and language, and the promotion decision with its reason.

The nightly flow publishes both as one markdown artifact with a stable key, so the Prefect UI shows
the registry's history night after night."""

from __future__ import annotations

import json
import re
from pathlib import Path

from doctune.metrics import fmt_score

REGISTRY_KEY = "model-registry"
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def model_name_for(folder: str | Path) -> str:
    """A model name from a document folder's name: lower case, runs of other characters as one '-'
    ("Sales Docs (2025)" -> "sales-docs-2025"); "docs" when nothing is left."""
    name = re.sub(r"[^a-z0-9_.]+", "-", Path(folder).resolve().name.lower()).strip("-._")[:64]
    return name or "docs"


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model_name={name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', starting with "
                         "a letter or digit (it names a folder and a served model, promoted/<name>)")
    return name


def named_registries(root: str | Path) -> dict[str, Path]:
    """{model name: its registry folder} under `outputs/registry/`, for every model with a current.json."""
    root = Path(root)
    return {d.name: d for d in sorted(root.iterdir()) if (d / "current.json").is_file()} if root.is_dir() else {}


def artifact_key(prefix: str, name: str) -> str:
    """An artifact key per model (Prefect keys take lower-case letters, digits and dashes)."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]+', '-', name)}"


def read_current(registry_dir: str | Path) -> dict | None:
    path = Path(registry_dir) / "current.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def append_decision(registry_dir: str | Path, decision: dict) -> None:
    """Add one evaluated candidate to decisions.jsonl (never rewritten: the history stays whole)."""
    registry = Path(registry_dir)
    registry.mkdir(parents=True, exist_ok=True)
    with (registry / "decisions.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(decision, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_current(registry_dir: str | Path, record: dict) -> None:
    """Replace current.json atomically: a reader sees the old promoted model or the new one, never half."""
    registry = Path(registry_dir)
    registry.mkdir(parents=True, exist_ok=True)
    tmp = registry / "current.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(registry / "current.json")


def read_decisions(registry_dir: str | Path) -> list[dict]:
    path = Path(registry_dir) / "decisions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def earlier_decision(registry_dir: str | Path, dataset_sha256: str, settings_sha256: str) -> dict | None:
    """The latest decision about a candidate trained on this dataset with these settings."""
    same = [d for d in read_decisions(registry_dir)
            if d.get("dataset_sha256") == dataset_sha256 and d.get("settings_sha256") == settings_sha256]
    return same[-1] if same else None


def registry_markdown(registry_dir: str | Path, limit: int = 30) -> str:
    registry = Path(registry_dir)
    current = read_current(registry)
    lines = [f"## Model registry `{registry.name}`", ""]
    if current:
        lines += [
            f"**Current model:** `{current['run_dir']}`, promoted {current['promoted_at']} "
            f"({current.get('set') or 'gold'} {current['metric']} {fmt_score(current.get('score'))}; trained on the dataset with content hash "
            f"`{str(current.get('dataset_sha256'))[:12]}`; before it: `{current.get('previous') or 'the base model'}`)",
            "",
        ]
    else:
        lines += ["**Current model:** none promoted yet; the base model serves.", ""]
    decisions = read_decisions(registry)
    if not decisions:
        return "\n".join(lines + ["No candidate evaluated yet."]) + "\n"
    lines += [
        f"Candidates, newest first ({min(limit, len(decisions))} of {len(decisions)}; all in "
        f"`{registry / 'decisions.jsonl'}`):",
        "",
        "| decided | candidate | dataset | settings | gold fact recall | exam fact recall | test fact recall | promoted "
        "| reason |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for d in reversed(decisions[-limit:]):
        scores = d.get("scores") or {}
        # The dataset by its folder name (what a person finds in outputs/datasets/), else its hash.
        dataset = Path(d["dataset_dir"]).name if d.get("dataset_dir") else str(d.get("dataset_sha256"))[:12]
        lines.append(
            f"| {d['decided_at']} | `{Path(d['candidate']).name}` | `{dataset}` | "
            f"`{str(d.get('settings_sha256'))[:8]}` | {fmt_score(scores.get('gold/all/fact_recall'))} | "
            f"{fmt_score(scores.get('exam/all/fact_recall'))} | {fmt_score(scores.get('test/all/fact_recall'))} | "
            f"{'**yes**' if d['promoted'] else 'no'} | "
            f"{d['reason'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def publish_registry(registry_dir: str | Path, key: str = REGISTRY_KEY) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(registry_markdown(registry_dir), key=key,
                             description="The promoted model and every candidate with its decision")
