"""How many LLM rewrites (rewrite.styles, tasks/rewrite.py) of a folder's chunks the checks keep, per style and per
reason, for one endpoint: is the endpoint worth turning rewrites on for? No Prefect and no cache: every call is made.

Needs an endpoint; the local one:  . scripts/env.sh && scripts/services.sh up llm
Run:   python bench/rewrites.py                                   # bench/corpora/lumen, 8 English chunks, 3 styles
       python bench/rewrites.py --folder data/docs --chunks 20 --base-url http://127.0.0.1:8000/v1 --model qwen2.5-7b
Prints the kept share per style, the reasons of the dropped ones, and a few kept rewrites to read.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from doctune.settings import ChunkSettings, IngestSettings, LLMSettings, RewriteSettings
    from tasks.ingest import discover_all
    from tasks.prepare import prepare_files
    from tasks.rewrite import rewrite_chunks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(ROOT / "bench/corpora/lumen/docs"))
    ap.add_argument("--chunks", type=int, default=8, help="the first N chunks of the language, in folder order")
    ap.add_argument("--language", default="en", choices=["en", "zh"])
    ap.add_argument("--styles", nargs="+", default=["notes", "relations", "paraphrase"])
    ap.add_argument("--base-url", default=None, help="default: the local endpoint (LLMSettings)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key-env", default=None, help="the variable holding the key, never the key itself")
    args = ap.parse_args()

    folder = Path(args.folder)
    refs, _ = discover_all(folder, IngestSettings())
    prepared = prepare_files(folder, refs, IngestSettings(), ChunkSettings())
    chunks = [c for f in prepared.files for cs in f.chunks for c in cs if c.language == args.language][:args.chunks]
    llm = LLMSettings(**{k: v for k, v in (("base_url", args.base_url), ("model", args.model),
                                           ("api_key_env", args.api_key_env)) if v})
    settings = RewriteSettings(styles=args.styles)
    start = time.perf_counter()
    result = rewrite_chunks(chunks, llm, settings, [])
    seconds = time.perf_counter() - start
    kept = Counter(r["kind"] for r in result.rows)
    dropped = Counter(d.record["kind"] for d in result.dropped)
    print(f"{llm.model} at {llm.base_url}: {len(chunks)} {args.language} chunks of {folder} x {len(args.styles)} styles, "
          f"{result.calls} calls in {seconds:.0f} s, {len(result.rows)} kept\n")
    print("| style | kept | dropped | reasons |\n|---|---|---|---|")
    for style in args.styles:
        kind = f"rewrite:{style}"
        reasons = Counter(d.reason for d in result.dropped if d.record["kind"] == kind)
        print(f"| {style} | {kept[kind]} | {dropped[kind]} | "
              + ", ".join(f"{r} {n}" for r, n in reasons.most_common()) + " |")
    for row in result.rows[:3]:
        print(f"\n--- kept, {row['kind']} of {row['chunk_id']}:\n{row['text'][:600]}")


if __name__ == "__main__":
    main()
