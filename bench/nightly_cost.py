"""What does a night cost when little changed? LLM calls, tokens, training and wall time of three
nightly runs over a folder of generated documents: (1) the first night, (2) nothing changed, (3) one
document edited (one sentence added), against the goals of issue "Performance", item 5:
unchanged -> 0 LLM calls and no training; one of N changed -> LLM calls <= 1/N + 5% of the first night's.

What runs is what users schedule: the `nightly` deployment of prefect.yaml on the `cpu` pool with its
training and evaluation children on the `gpu` pool, started by scripts/services.sh against a temporary
Prefect server with its own PREFECT_HOME and result storage (so the first night starts cold), with the
default build settings. Synthesis goes to `doctune serve` over the offline base model, started here on a
free port and counted at the endpoint through its /v1/stats route: every chat and embedding request it
answered, with prompt and completion tokens as the model saw them. Nightly finds that server up and uses
it as it is, so here it is not stopped before training (on a real night nightly starts its own and stops
it). Training is a tiny random Llama (hidden 64, 2 layers, SmolLM2's tokenizer) for 4 steps: what is
measured is what a night re-does, not what it learns.

Run:  .venv/bin/python bench/nightly_cost.py [--docs 20] [--scripted] [--keep]
--scripted: tests/endpoints.ScriptedEndpoint answers instead of the model (seconds instead of minutes), in
synth.mode fact as in the tests (so without the mode probe); its calls are exact, its tokens are counted
with the base model's tokenizer over the requests it answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = ["lamp", "kettle", "drone", "router", "scanner", "printer", "heater", "bicycle", "tent", "radio"]
COLOURS = ["amber", "cobalt", "slate", "jade", "copper", "ivory", "crimson", "olive"]


def write_docs(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """n Markdown documents of three fact sentences each; returns each one's name and price (for gold)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    facts = []
    for i in range(n):
        name = f"{rng.choice(COLOURS).title()} {rng.choice(PRODUCTS)} {chr(65 + i % 26)}{i}"
        price = rng.randint(20, 2000)
        text = (f"# {name}\n\n"
                f"The {name} costs {price} euros at the Brekke store. "
                f"The {name} weighs {rng.randint(2, 90) / 10} kilograms without its case. "
                f"The {name} was designed in {rng.randint(1995, 2025)} by the Fjord team in Skarvhamn.\n")
        (folder / f"doc-{i:04d}.md").write_text(text, encoding="utf-8")
        facts.append({"name": name, "price": price})
    return facts


def edit_one(folder: Path, i: int, name: str) -> str:
    path = folder / f"doc-{i:04d}.md"
    path.write_text(path.read_text(encoding="utf-8") + f"The {name} ships with a 3-year warranty.\n", encoding="utf-8")
    return path.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process, its threads and its child processes (a server that
    works in a spawned child, as `transformers serve` 5.25 does, is counted whole)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def services(env: dict, *args: str) -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts/services.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"scripts/services.sh {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")


def tiny_llama(path: Path, base: str) -> str:
    """The random Llama of tests/conftest.py: a training step in milliseconds, SmolLM2's chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from doctune.training.model import load_tokenizer

    tok = load_tokenizer(base)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def stats_counter(base_url: str):
    """Calls and tokens doctune serve has answered so far, read once nothing is running or waiting
    (its token counters move when a row ends)."""
    import httpx

    def snapshot() -> dict:
        for _ in range(120):
            s = httpx.get(base_url.rstrip("/") + "/stats", timeout=10).json()
            if s["running"] == 0 and s["waiting"] == 0:
                return {"calls": s["requests"] + s["embedding_requests"], "prompt_tokens": s["prompt_tokens"],
                        "completion_tokens": s["completion_tokens"]}
            time.sleep(0.5)
        raise TimeoutError(f"{base_url}/stats: rows still running after 60 s: {s}")
    return snapshot


def scripted_counter(endpoint, base: str):
    """Calls the scripted endpoint answered, with their tokens counted as doctune serve counts them
    (the chat template's text, then the reply), since its own usage numbers are made up."""
    from doctune.training.model import load_tokenizer
    from tests.endpoints import scripted_reply

    tok = load_tokenizer(base)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def snapshot() -> dict:
        with endpoint.lock:
            requests = list(endpoint.requests)
        prompt = sum(n_tokens(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False))
                     for r in requests)
        completion = sum(n_tokens(scripted_reply(r["messages"], r.get("seed"), endpoint.behaviour)[1])
                         for r in requests)
        return {"calls": len(requests), "prompt_tokens": prompt, "completion_tokens": completion}
    return snapshot


async def _flow_runs(**filters) -> list:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_runs(**filters)


def train_runs() -> int:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return len(asyncio.run(_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))))


async def build_tasks(nightly_id) -> dict:
    """Final task-run states of the nightly run's build_dataset subflow, and its token-usage table.
    States reach the server as events a moment after the flow returns: wait for them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                                FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId)

    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[nightly_id])))
        (build,) = [c for c in children if c.deployment_id is None]
        for _ in range(60):
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[build.id])))
            if all(r.state is not None and r.state.is_final() for r in runs):
                break
            await asyncio.sleep(0.5)
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["token-usage"]), flow_run_id=ArtifactFilterFlowRunId(any_=[build.id])))
    usage = (json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data) if arts else []
    synth = Counter(r.state.name for r in runs if r.name.startswith("synthesize "))
    probe = [r.state.name for r in runs if r.name.startswith("choose_mode_task")]
    return {"synthesized": synth.get("Completed", 0), "cached": synth.get("Cached", 0),
            "mode_probe": probe[0] if probe else "-", "usage_calls": sum(u["calls"] for u in usage)}


def night(label: str, params: dict, snapshot) -> dict:
    from prefect.deployments import run_deployment

    before, trained_before = snapshot(), train_runs()
    t0 = time.perf_counter()
    run = run_deployment("nightly/nightly", parameters=params, timeout=3600, poll_interval=2)
    wall = time.perf_counter() - t0
    if not run.state.is_completed():
        raise RuntimeError(f"night {label!r}: the nightly run ended {run.state.name}: {run.state.message}; "
                           "see the worker logs in the work folder's run/ (rerun with --keep)")
    result, after = run.state.result(), snapshot()
    row = {"night": label, **{k: after[k] - before[k] for k in after}, "trained": train_runs() > trained_before,
           "status": result["status"], "wall_s": round(wall, 1), **asyncio.run(build_tasks(run.id))}
    print(f"{label}: {row}", flush=True)
    return row


def report(rows: list[dict], n: int, endpoint: str) -> str:
    full, same, one = rows
    head = ("| night | LLM calls | prompt tokens | completion tokens | trained | status | documents synthesized "
            "/ cached | mode probe | usage artifact calls | wall s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['night']} | {r['calls']} | {r['prompt_tokens']} | {r['completion_tokens']} | "
                     f"{'yes' if r['trained'] else 'no'} | {r['status']} | {r['synthesized']} / {r['cached']} | "
                     f"{r['mode_probe']} | {r['usage_calls']} | {r['wall_s']} |")

    def share(key: str) -> str:
        return f"{one[key] / full[key]:.1%}" if full[key] else "-"
    goal = 1 / n + 0.05
    ok_same = same["calls"] == 0 and not same["trained"]
    ok_one = full["calls"] and one["calls"] / full["calls"] <= goal
    lines += ["", f"endpoint: {endpoint}; {n} documents",
              f"- unchanged: {same['calls']} LLM calls (goal 0), training {'ran' if same['trained'] else 'skipped'} "
              f"(goal skipped): **{'met' if ok_same else 'NOT met'}**",
              f"- one of {n} edited: {one['calls']} of {full['calls']} calls = {share('calls')} of the first night "
              f"(goal <= 1/{n} + 5% = {goal:.1%}): **{'met' if ok_one else 'NOT met'}**; prompt tokens "
              f"{share('prompt_tokens')}, completion tokens {share('completion_tokens')}, wall time "
              f"{one['wall_s'] / full['wall_s']:.0%} of the first night's"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20, help="documents in the generated folder")
    ap.add_argument("--scripted", action="store_true", help="a scripted endpoint instead of doctune serve")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (outputs, Prefect home, logs)")
    args = ap.parse_args()
    if args.docs < 1:
        ap.error("--docs must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="nightly-cost-"))
    port = free_port()
    # A Prefect of our own, set before prefect is first imported (its settings are read then): the
    # first night must find no cached task result and no promoted model.
    env = {"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_LOCAL_STORAGE_PATH": str(work / "prefect" / "storage"), "DOCTUNE_RUN_DIR": str(work / "run"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))  # tests.endpoints for --scripted

    from doctune.base_model import prepare_base_model

    base = str(prepare_base_model())
    folder = work / "docs"
    facts = write_docs(folder, args.docs)
    gold = work / "gold.jsonl"
    gold.write_text("".join(json.dumps({"id": f"g{i}", "question": f"What does the {f['name']} cost?",
                                        "answer": f"{f['price']} euros.", "facts": [str(f["price"])],
                                        "language": "en"}) + "\n" for i, f in enumerate(facts[:2])))
    ok = False
    try:
        rows, what = nights(args, work, env, folder, facts, gold, base)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
    print("\n" + report(rows, args.docs, what))


def nights(args, work: Path, env: dict, folder: Path, facts: list[dict], gold: Path, base: str):
    from doctune import local_llm
    from doctune.settings import LLMSettings

    with ExitStack() as stack:
        if args.scripted:
            from tests.endpoints import ScriptedEndpoint

            endpoint = ScriptedEndpoint()
            stack.callback(endpoint.close)
            llm = LLMSettings(base_url=endpoint.base_url, model=endpoint.model)
            snapshot, what = scripted_counter(endpoint, base), "tests/endpoints.ScriptedEndpoint"
        else:
            llm = LLMSettings(base_url=f"http://127.0.0.1:{free_port()}/v1")
            # Started here, not by nightly, so that its counters live through all three nights.
            stack.enter_context(local_llm.serving(llm, log_dir=work / "logs"))
            print(f"doctune serve on {llm.base_url}, up until the bench ends", flush=True)
            snapshot, what = stats_counter(llm.base_url), f"doctune serve ({llm.model}, offline)"
        print("starting the Prefect server, both pools' workers and the deployments ...", flush=True)
        services_env = {**os.environ, **env}
        stack.callback(services, services_env, "down")
        services(services_env, "up", "prefect", "workers", "deploy")

        params = {"folder": str(folder), "settings": {
            # The scripted endpoint asks one question of every chunk in qa mode, which dedup then drops
            # as conflicting answers: it gets fact mode, as in the tests (no mode probe then).
            "build": {"llm": llm.model_dump(mode="json"), "synth": {"mode": "fact"} if args.scripted else {}},
            "train": {"base_model": tiny_llama(work / "tiny-llama", base), "max_steps": 4,
                      "per_device_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "device": "cpu",
                      "cpu_dtype": "fp32", "save_every_steps": 2, "logging_steps": 1},
            # A random model learns nothing: margin 0 lets a tie promote, so night 2 meets a promoted model.
            "eval": {"max_new_tokens": 8, "max_test_examples": 4, "promotion_margin": 0.0},
            "output_dir": str(work / "out"), "gold_path": str(gold)}}
        rows = [night("1 first night", params, snapshot), night("2 unchanged", params, snapshot)]
        edited = edit_one(folder, args.docs // 2, facts[args.docs // 2]["name"])
        rows.append(night(f"3 {edited} edited", params, snapshot))
    return rows, what

if __name__ == "__main__":
    main()
