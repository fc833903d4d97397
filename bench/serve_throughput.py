"""`doctune serve` against `transformers serve --continuous-batching`, same model folder, same requests.

    .venv/bin/python bench/serve_throughput.py [--clients 1 8 16] [--repeats 2] [--max-tokens 64]

Both servers run as subprocesses over the offline base model (`prepare_base_model()`), on free
loopback ports, for the whole run. Each configuration (prompt kind x clients x streamed or not) is
measured on one server, then on the other, with the order flipped every repeat, so a neighbour's
load hits both sides alike; the idle server's CPU use during the other's turn is reported, and so
is what every other process on the machine used (`busy`).

Clients are closed-loop: each of N threads sends its next request (through the `openai` client,
greedy, the same max_tokens) as soon as its last one is answered, until 2N requests (at least 4)
are done. Every request of a run has a prompt of its own, the same one on both servers; no prompt
is sent twice to a server, so neither answers from a cache of whole prompts. Prompt kinds:

- fewshot: fact mode's shape (~250 tokens): a system line, four worked examples rotated in three
  sets as synthesis rotates them (so prompts share a long prefix), then a new fact;
- short: a one-line question (~30 tokens);
- passage: a ~250-token passage of its own per request and a question (no shared prefix but the
  system line), as QA mode sends.

Reported per configuration: new tokens/s (completion_tokens from usage / wall time), requests/s,
p50/p95 latency, p50/p95 time to first content token (streamed runs), and how many greedy answers
were the same text on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nightly_cost import cpu_seconds, free_port  # bench/ is this script's folder on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ["Aurora", "Kestrel", "Brightwell", "Tellpoint", "Corvo", "Pebble", "Fjord", "Skarv", "Lumen", "Orla"]
THINGS = ["kettle", "drone", "router", "scanner", "printer", "heater", "bicycle", "tent", "radio", "lamp"]
PLACES = ["Oslo", "Bergen", "Tromso", "Lyon", "Porto", "Gdansk", "Turku", "Leeds", "Graz", "Malmo"]
SYSTEM = "Write one question about the fact whose answer is the given answer. Reply with the question only."
EXAMPLES = [
    ("The Aurora 3 kettle costs 59 dollars in the online shop.", "59 dollars", "How much does the Aurora 3 kettle cost?"),
    ("The Oslo branch has 14 employees.", "14 employees", "How many people work at the Oslo branch?"),
    ("The spring sale of Brightwell Foods starts on 3 March.", "3 March", "When does the Brightwell Foods spring sale begin?"),
    ("Maria Olsen leads the quality team at Tellpoint.", "Maria Olsen", "Who is in charge of quality at Tellpoint?"),
    ("Greenhill Bakery delivers bread to cafes in the harbour district.", "cafes in the harbour district",
     "Where does Greenhill Bakery deliver its bread?"),
    ("The Pebble app stores photos for 90 days after deletion.", "90 days",
     "For how long does the Pebble app keep deleted photos?"),
    ("Staff of Tellpoint book their flights through the agency SkyWay Tours.", "SkyWay Tours",
     "Which agency books flights for Tellpoint staff?"),
    ("Visitors to the Kestrel lab must wear safety glasses.", "yes", "Do visitors to the Kestrel lab need safety glasses?"),
    ("Version 2.1 of the Pebble app added dark mode.", "dark mode", "What did version 2.1 of the Pebble app add?"),
]


def fact(rng: random.Random) -> tuple[str, str]:
    name = f"{rng.choice(NAMES)} {rng.choice(THINGS)} {rng.randint(1, 999)}"
    price = f"{rng.randint(20, 4000)} euros"
    return f"The {name} costs {price} at the {rng.choice(PLACES)} store.", price


def messages(kind: str, index: int) -> list[dict]:
    """The `index`-th prompt of a kind: a fresh fact, question or passage for every index."""
    rng = random.Random(f"{kind}-{index}")
    if kind == "fewshot":
        start = 3 * (index % 3)
        shown = [EXAMPLES[(start + k) % len(EXAMPLES)] for k in range(4)]
        out = [{"role": "system", "content": SYSTEM}]
        for text, answer, question in shown:
            out += [{"role": "user", "content": f"Fact: {text}\nAnswer: {answer}"},
                    {"role": "assistant", "content": question}]
        text, answer = fact(rng)
        return out + [{"role": "user", "content": f"Fact: {text}\nAnswer: {answer}"}]
    if kind == "short":
        return [{"role": "user", "content": f"In one sentence, what is a {rng.choice(NAMES)} {rng.choice(THINGS)} "
                                            f"from {rng.choice(PLACES)} used for?"}]
    if kind == "passage":
        sentences = []
        for _ in range(8):
            text, _ = fact(rng)
            sentences.append(text + f" It weighs {rng.randint(2, 90) / 10} kilograms.")
        return [{"role": "system", "content": "Answer from the passage only."},
                {"role": "user", "content": " ".join(sentences) + "\n\nWhich of these items is the lightest?"}]
    raise ValueError(f"--kinds: unknown prompt kind {kind!r}; choose from fewshot, short, passage")


def _machine_busy_seconds() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    label: str
    cmd: list[str]
    model: str  # the model name requests ask for
    log: Path
    url: str = ""
    proc: subprocess.Popen | None = None
    texts: dict = field(default_factory=dict)  # (kind, index) -> greedy answer


@contextmanager
def running(server: Server, env: dict):
    port = free_port()
    server.url = f"http://127.0.0.1:{port}"
    with server.log.open("wb") as out:
        server.proc = subprocess.Popen([*server.cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                       start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if server.proc.poll() is not None:
                raise SystemExit(f"{server.label} exited with {server.proc.returncode}; its log "
                                 f"({server.log}):\n{server.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.label} not healthy within 300 s; see {server.log}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.proc.pid, signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def one_request(client, server: Server, kind: str, index: int, max_tokens: int, stream: bool) -> dict:
    t0 = time.perf_counter()
    body = dict(model=server.model, messages=messages(kind, index), max_tokens=max_tokens, temperature=0)
    if not stream:
        resp = client.chat.completions.create(**body)
        text = resp.choices[0].message.content or ""
        return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": resp.usage.completion_tokens,
                "text": text}
    first, parts, tokens = None, [], None
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
    if tokens is None:
        raise RuntimeError(f"{server.label}: the stream carried no usage chunk")
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens, "text": "".join(parts)}


def measure(server: Server, idle: Server, kind: str, clients: int, max_tokens: int, stream: bool,
            first_index: int) -> dict:
    import openai

    n = max(4, 2 * clients)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=900)
    lock, next_index, results = threading.Lock(), [0], []

    def worker():
        while True:
            with lock:
                if next_index[0] >= n:
                    return
                i = next_index[0]
                next_index[0] += 1
            out = one_request(client, server, kind, first_index + i, max_tokens, stream)
            with lock:
                results.append(out)
                server.texts[(kind, first_index + i)] = out["text"]

    cpu0 = (cpu_seconds(server.proc.pid), cpu_seconds(idle.proc.pid), cpu_seconds(os.getpid()),
            _machine_busy_seconds())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    ours, idle_cpu, bench, machine = (b - a for a, b in zip(cpu0, (
        cpu_seconds(server.proc.pid), cpu_seconds(idle.proc.pid), cpu_seconds(os.getpid()),
        _machine_busy_seconds())))
    latency = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)

    def pct(values, q):
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None

    return {"server": server.label, "kind": kind, "clients": clients, "stream": stream, "requests": n,
            "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "req_s": n / wall,
            "p50_s": pct(latency, 0.5), "p95_s": pct(latency, 0.95), "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p95_s": pct(ttft, 0.95), "server_cpu_s": ours, "idle_server_cpu_s": idle_cpu,
            "others_cpu_pct": 100 * max(0.0, machine - ours - idle_cpu - bench) / wall,
            "mean_new_tokens": statistics.mean(r["tokens"] for r in results)}


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--kinds", nargs="+", default=["fewshot", "short", "passage"])
    ap.add_argument("--modes", nargs="+", default=["plain", "stream"], choices=["plain", "stream"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--only", choices=["doctune", "transformers"],
                    help="measure one server only (for profiling; no ratio)")
    ap.add_argument("--out", type=Path, help="also write every measurement as JSON lines here")
    args = ap.parse_args()

    from doctune.base_model import prepare_base_model
    from doctune.serving import KEY_ENV

    model = str(prepare_base_model())
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(KEY_ENV, None)  # loopback: no key, so both servers take the same unauthenticated requests
    venv_bin = Path(sys.executable).parent
    ours = Server("doctune", [sys.executable, "-m", "doctune.cli", "serve", "--model", model, "--no-promoted",
                              "--name", "smollm2"], "smollm2", logs / "doctune.log")
    # force_model pins the server to this folder (loaded from disk, offline); requests must name it.
    theirs = Server("transformers", [str(venv_bin / "transformers"), "serve", model, "--continuous-batching",
                                     "--device", "cpu", "--host", "127.0.0.1"], model, logs / "transformers.log")
    servers = [s for s in (ours, theirs) if args.only in (None, s.label)]
    print(f"model {model}; server logs in {logs}", flush=True)

    rows = []
    with ExitStack() as stack:
        for s in servers:
            stack.enter_context(running(s, env))
        for s in servers:  # warm-up: first forwards, thread pools, CB's cache allocation
            for kind in args.kinds:
                measure(s, servers[-1] if s is servers[0] else servers[0], kind, 2, args.max_tokens, False,
                        first_index=10_000_000)
        out = args.out.open("a") if args.out else None
        for rep in range(args.repeats):
            order = servers if rep % 2 == 0 else servers[::-1]
            for kind in args.kinds:
                for clients in args.clients:
                    for mode in args.modes:
                        first = 100_000 * (rep + 1) + 1_000 * clients + (500 if mode == "stream" else 0)
                        for s in order:
                            other = next((o for o in servers if o is not s), s)
                            row = measure(s, other, kind, clients, args.max_tokens, mode == "stream", first)
                            row["repeat"] = rep
                            rows.append(row)
                            if out:
                                out.write(json.dumps(row) + "\n")
                                out.flush()
                            print(f"rep {rep} {kind:8} c={clients:<2} {mode:6} {s.label:12} "
                                  f"{row['tok_s']:6.1f} tok/s  {row['req_s']:5.2f} req/s  p50 {row['p50_s']:.2f} s  "
                                  f"p95 {row['p95_s']:.2f} s  ttft p50 {fmt(row['ttft_p50_s'])} s  "
                                  f"new/req {row['mean_new_tokens']:.1f}  idle-server cpu "
                                  f"{row['idle_server_cpu_s']:.1f} s  others {row['others_cpu_pct']:.0f}%",
                                  flush=True)

    if len(servers) < 2:
        return
    same = sum(ours.texts[k] == theirs.texts.get(k) for k in ours.texts)
    print(f"\nsame greedy text on both servers: {same} of {len(ours.texts)} prompts")
    print("\n| kind | clients | mode | rep | doctune tok/s | transformers tok/s | ratio | doctune p50 / p95 s | "
          "transformers p50 / p95 s | TTFT p50 doctune / transformers s | others' CPU % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for a in rows:
        if a["server"] != "doctune":
            continue
        b = next(r for r in rows if r["server"] == "transformers" and all(
            r[k] == a[k] for k in ("kind", "clients", "stream", "repeat")))
        ttft = f"{fmt(a['ttft_p50_s'])} / {fmt(b['ttft_p50_s'])}" if a["stream"] else "–"
        print(f"| {a['kind']} | {a['clients']} | {'stream' if a['stream'] else 'plain'} | {a['repeat']} | "
              f"{a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x | "
              f"{a['p50_s']:.2f} / {a['p95_s']:.2f} | {b['p50_s']:.2f} / {b['p95_s']:.2f} | {ttft} | "
              f"{a['others_cpu_pct']:.0f} / {b['others_cpu_pct']:.0f} |")


if __name__ == "__main__":
    main()
