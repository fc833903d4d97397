"""Dedup at scale: the current tasks/dedup.py against the datasketch version it replaced, same data.

    .venv/bin/python bench/dedup_scale.py --sizes 10000 100000 1000000 --baseline-max 100000

Each size is half English, half Chinese synthetic pairs with planted exact duplicates (case,
spacing and punctuation changed), planted near-duplicates (one character of the question edited,
same answer) and planted look-alikes (one character edited, a different answer: must be kept).
Every (implementation, size) runs in a fresh subprocess, so its peak RSS is its own. The baseline
is tasks/dedup.py as of BASELINE_COMMIT, read from git, so this needs a clone with history.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASELINE_COMMIT = "d881656018b544c08643ba84a1ac8bfabe970327"  # last tasks/dedup.py on datasketch
LETTERS = "abcdefghijklmnopqrstuvwxyz"
HANZI = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def make_pairs(n: int, seed: int = 0):
    """n pairs: 80% originals, then (shuffled) 5% exact copies, 10% near copies, 5% look-alikes.
    Returns the pairs and, for each planted row, (kind, index of its original)."""
    from doctune.records import QAPair

    rng = random.Random(seed)
    vocab = ["".join(rng.choices(LETTERS, k=rng.randint(3, 9))) for _ in range(5000)]

    def english(lo, hi):
        return " ".join(rng.choices(vocab, k=rng.randint(lo, hi)))

    def chinese(lo, hi):
        return "".join(rng.choices(HANZI, k=rng.randint(lo, hi)))

    def edit(text, zh):
        # English: one character anywhere; Chinese: near the end, where it touches fewer 5-grams
        # of a short question (the way a "呢" is added before the question mark).
        i = rng.randrange(len(text) - 4, len(text) - 1) if zh else rng.randrange(1, len(text) - 1)
        c = rng.choice(HANZI if zh else LETTERS)
        return rng.choice([text[:i] + c + text[i + 1:], text[:i] + c + text[i:], text[:i] + text[i + 1:]])

    n_orig = int(n * 0.8)
    rows = []
    for k in range(n_orig):
        if k % 2:
            rows.append((chinese(18, 40) + "？", chinese(10, 30) + "。", True))
        else:
            rows.append((english(10, 16).capitalize() + "?", english(8, 14) + f" {rng.randint(1, 999)}.", False))
    planted = []
    for kind, share in (("exact", 0.05), ("near", 0.10), ("lookalike", 0.05)):
        for o in rng.sample(range(n_orig), int(n * share)):
            q, a, zh = rows[o]
            if kind == "exact":
                planted.append((f"  {q.upper() if not zh else q}!! ", a.rstrip("。.") + " ", kind, o))
            elif kind == "near":
                planted.append((edit(q, zh), a, kind, o))
            else:
                planted.append((edit(q, zh), (chinese(10, 30) + "。") if zh else english(8, 14) + ".", kind, o))
    rng.shuffle(planted)
    pairs = [QAPair(question=q, answer=a, language="zh" if zh else "en") for q, a, zh in rows]
    truth = {}
    for q, a, kind, o in planted:
        truth[len(pairs)] = (kind, o)
        pairs.append(QAPair(question=q, answer=a))
    return pairs, truth


def load_impl(name: str):
    if name == "new":
        import tasks.dedup as module
        return module
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:tasks/dedup.py"],
                            capture_output=True, text=True)
    if source.returncode != 0:
        sys.exit(f"git show {BASELINE_COMMIT}:tasks/dedup.py failed ({source.stderr.strip()}); the baseline "
                 "needs a clone with history (git fetch --unshallow), or run with --baseline-max 0")
    path = Path(tempfile.mkdtemp()) / "dedup_baseline.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("dedup_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def worker(impl: str, size: int) -> dict:
    from doctune.settings import DedupSettings

    module = load_impl(impl)
    stages = {}
    for name in ("_exact", "_conflicts", "_near"):  # both versions have these three stages
        def timed(*args, _f=getattr(module, name), _name=name):
            t0 = time.perf_counter()
            out = _f(*args)
            stages[_name.strip("_")] = round(time.perf_counter() - t0, 2)
            return out
        setattr(module, name, timed)
    t0 = time.perf_counter()
    pairs, truth = make_pairs(size)
    gen_s = time.perf_counter() - t0
    settings = DedupSettings()
    # The ground truth of "near": the edit kept the question at or above the threshold.
    def qset(text):
        return module.shingles(module.normalize(text), settings.ngram)
    near_truth = {i for i, (kind, o) in truth.items()
                  if kind == "near" and module.jaccard(qset(pairs[i].question), qset(pairs[o].question))
                  >= settings.near_threshold}
    before = rss_mb()
    t0 = time.perf_counter()
    result = module.dedup_pairs(pairs, settings)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    index = {id(p): i for i, p in enumerate(pairs)}
    ids = [p.pair_id for p in pairs]
    near_drops = [(d.record["pair_id"], d.duplicate_of) for d in result.dropped if d.reason == "near_duplicate"]
    planted_near = {ids[i]: ids[truth[i][1]] for i in near_truth}
    true_pos = sum(planted_near.get(p) == dup for p, dup in near_drops)
    lookalike_ids = {ids[i] for i, (kind, _) in truth.items() if kind == "lookalike"}
    kept_ids = {ids[index[id(p)]] for p in result.kept}
    return {
        "impl": impl, "size": size, "wall_s": round(wall, 2), "stages_s": stages, "generate_s": round(gen_s, 1),
        "rss_before_mb": round(before), "peak_rss_mb": round(peak),
        "near_precision": round(true_pos / len(near_drops), 4) if near_drops else None,
        "near_recall": round(true_pos / len(near_truth), 4) if near_truth else None,
        "planted_near": len(near_truth), "near_drops": len(near_drops),
        "lookalikes_kept": f"{len(lookalike_ids & kept_ids)}/{len(lookalike_ids)}",
        "counts": result.counts,
        "dropped": sorted((d.record["pair_id"], d.reason, d.duplicate_of) for d in result.dropped)
        if size <= 100_000 else None,
    }


def run_one(impl: str, size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", impl, str(size)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{impl} at {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--baseline-max", type=int, default=100_000,
                        help="skip the datasketch baseline above this many pairs (at 1M it takes many minutes)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average before: {' '.join(load)} on {len(__import__('os').sched_getaffinity(0))} cores")
    print("| pairs | impl | wall s | stages s (exact / conflicts / near) | peak RSS MB (input alone) "
          "| near precision | near recall | look-alikes kept | same drops as baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        runs = [run_one("new", size)]
        if size <= args.baseline_max:
            runs.append(run_one("baseline", size))
        same = "–"
        if len(runs) == 2 and runs[0]["dropped"] is not None:
            new, old = (set(map(tuple, r["dropped"])) for r in runs)
            same = "yes" if new == old else f"new drops {len(new - old)} more, misses {len(old - new)}"
        for r in runs:
            st = r["stages_s"]
            print(f"| {size:,} | {r['impl']} | {r['wall_s']} | {st.get('exact')} / {st.get('conflicts')} / "
                  f"{st.get('near')} | {r['peak_rss_mb']} ({r['rss_before_mb']}) | {r['near_precision']} | "
                  f"{r['near_recall']} ({r['planted_near']} planted) | {r['lookalikes_kept']} | {same} |",
                  flush=True)
        if len(runs) == 2:
            print(f"|  | ratio | **{runs[1]['wall_s'] / runs[0]['wall_s']:.1f}x** | | | | | | |", flush=True)
        else:
            print(f"|  | baseline | skipped (--baseline-max {args.baseline_max}) | | | | | | |", flush=True)
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
