"""Does synthesis keep the endpoint full? Completion tokens/s of build_dataset's synthesis stage
against the endpoint's own maximum, measured in the same run on the same requests.

1. A folder of generated documents (3 fact sentences each) is planned into the exact calls fact
   mode sends (ingest -> chunk -> plan_calls).
2. Endpoint maximum: a sample of those calls sent straight through the openai client at several
   concurrencies; the best completion tokens/s is the endpoint's maximum.
3. Synthesis: the build_dataset flow over the folder (on a temporary Prefect server), with documents
   one at a time (documents_at_once=1) and side by side (the default), at the best concurrency. Its
   synthesis time runs from the first synthesize task's start to the last one's end.

Run:  .venv/bin/python bench/synth_throughput.py [--docs 50] [--sample 96]
Starts `doctune serve` over the offline base model on a free port (or uses --base-url).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nightly_cost import free_port  # bench/ is this script's folder on sys.path

PRODUCTS = ["lamp", "kettle", "drone", "router", "scanner", "printer", "heater", "bicycle", "tent", "radio"]
COLOURS = ["amber", "cobalt", "slate", "jade", "copper", "ivory", "crimson", "olive"]


def write_docs(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"{rng.choice(COLOURS).title()} {rng.choice(PRODUCTS)} {chr(65 + i % 26)}{i}"
        text = (f"# {name}\n\n"
                f"The {name} costs {rng.randint(20, 2000)} euros at the Brekke store. "
                f"The {name} weighs {rng.randint(2, 90) / 10} kilograms without its case. "
                f"The {name} was designed in {rng.randint(1995, 2025)} by the Fjord team in Skarvhamn.\n")
        (folder / f"doc-{i:04d}.md").write_text(text, encoding="utf-8")


def planned_calls(folder: Path, synth):
    from doctune.settings import ChunkSettings, IngestSettings
    from tasks.chunk import chunk_document
    from tasks.ingest import discover, ingest_file
    from tasks.synthesize import plan_calls

    chunks = [c for ref in discover(folder, IngestSettings())
              for doc in ingest_file(folder, ref, IngestSettings()).documents
              for c in chunk_document(doc, ChunkSettings())]
    return plan_calls(chunks, synth, "fact")


def endpoint_rate(llm, calls, concurrency: int) -> dict:
    from doctune.llm import chat, make_client

    client = make_client(llm.model_copy(update={"concurrency": concurrency}))
    llm = llm.model_copy(update={"concurrency": concurrency})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda c: chat(client, llm, c.messages, **c.params), calls))
    wall = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in replies)
    return {"concurrency": concurrency, "calls": len(calls), "seconds": wall, "tokens": tokens,
            "tok_s": tokens / wall, "calls_s": len(calls) / wall}


async def synthesis_window(flow_run_id) -> tuple[float, dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        for _ in range(60):  # task run states arrive as events just after the flow returns
            tasks = [t for t in await client.read_task_runs(flow_run_filter=runs) if t.name.startswith("synthesize ")]
            if tasks and all(t.start_time and t.end_time for t in tasks):
                break
            await asyncio.sleep(0.5)
        usage = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["token-usage"])),
                                            flow_run_filter=runs)
    seconds = (max(t.end_time for t in tasks) - min(t.start_time for t in tasks)).total_seconds()
    data = usage[0].data
    rows = {r["stage"]: r for r in (json.loads(data) if isinstance(data, str) else data)}
    return seconds, rows["synthesize"]


def synthesis_rate(folder: Path, out: Path, llm, synth, documents_at_once: int) -> dict:
    from doctune.settings import BuildSettings
    from flows.build_dataset import build_dataset

    # A new seed: nothing may come from an earlier run's cache.
    settings = BuildSettings(llm=llm, synth=synth.model_copy(update={"seed": random.randrange(10**9)}),
                             output_dir=str(out), documents_at_once=documents_at_once)
    state = build_dataset(str(folder), settings, return_state=True)
    assert state.is_completed(), state.message
    seconds, usage = asyncio.run(synthesis_window(state.state_details.flow_run_id))
    manifest = json.loads((Path(state.result()) / "manifest.json").read_text())
    return {"documents_at_once": documents_at_once, "seconds": seconds, "calls": usage["calls"],
            "tokens": usage["completion_tokens"], "tok_s": usage["completion_tokens"] / seconds,
            "pairs_min": 60 * manifest["counts"]["synthesized_pairs"] / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50, help="generated documents (3 facts each)")
    ap.add_argument("--sample", type=int, default=96, help="calls per concurrency for the endpoint's maximum")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--base-url", help="an endpoint that is already up (default: start doctune serve)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from prefect.testing.utilities import prefect_test_harness

    from doctune.local_llm import serving
    from doctune.settings import LLMSettings, SynthSettings

    llm = LLMSettings(base_url=args.base_url or f"http://127.0.0.1:{free_port()}/v1", model=args.model,
                      max_retries=2, timeout_s=600)
    synth = SynthSettings(mode="fact", questions_per_fact=2, replay_share=0, min_pairs=1, min_keep_share=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        write_docs(folder, args.docs)
        calls = planned_calls(folder, synth)
        sample = random.Random(0).sample(calls, min(args.sample, len(calls)))
        with serving(llm, start=not args.base_url, log_dir=Path(tmp) / "logs") as how:
            print(how)
            endpoint_rate(llm, sample[:8], 8)  # warm-up: first batches compile and allocate
            rates = [endpoint_rate(llm, sample, c) for c in args.concurrency]
            best = max(rates, key=lambda r: r["tok_s"])
            llm = llm.model_copy(update={"concurrency": best["concurrency"]})
            with prefect_test_harness(server_startup_timeout=120):
                runs = [synthesis_rate(folder, Path(tmp) / f"out{n}", llm, synth, n) for n in (1, 8)]

    print(f"\n{args.docs} documents, {len(calls)} synthesis calls; endpoint {llm.base_url} ({args.model})")
    print("endpoint alone, the same requests through the openai client:")
    print(f"  {'concurrency':>11} {'calls':>6} {'s':>7} {'completion tok/s':>17} {'calls/s':>8}")
    for r in rates:
        print(f"  {r['concurrency']:>11} {r['calls']:>6} {r['seconds']:>7.1f} {r['tok_s']:>17.1f} {r['calls_s']:>8.2f}")
    print(f"build_dataset synthesis at llm.concurrency={best['concurrency']}:")
    print(f"  {'documents_at_once':>17} {'calls':>6} {'s':>7} {'completion tok/s':>17} {'pairs/min':>9} {'vs max':>7}")
    for r in runs:
        print(f"  {r['documents_at_once']:>17} {r['calls']:>6} {r['seconds']:>7.1f} {r['tok_s']:>17.1f} "
              f"{r['pairs_min']:>9.1f} {r['tok_s'] / best['tok_s']:>6.2f}x")


if __name__ == "__main__":
    main()
