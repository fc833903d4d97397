"""Ingest and chunk at scale: 1,000 and 10,000 small generated files (Markdown, HTML, text, 1% PDF,
1% DOCX), read into documents and chunks three ways, against a Prefect server of our own:

  work alone   ingest + chunk in a plain loop, no Prefect: the cost of the files themselves;
  per file     one cached Prefect task per file and one more per document to chunk it (how
               build_dataset ingested before tasks/prepare.py);
  batched      build_dataset's way now: one task run per `ingest.files_per_task` files, each file
               cached on its own content in Prefect's result storage.

Both Prefect ways run twice, cold (an empty result storage of their own) and warm (nothing changed:
every file from the cache). Printed per run: wall seconds, files/s, Prefect's overhead per file
((wall - work alone) / files) and the CPU seconds the Prefect server spent meanwhile (its event and
API traffic, which competes with the run on a 2-core machine); then the per-file/batched ratios.

Run:  .venv/bin/python bench/ingest_scale.py [--files 1000 10000] [--per-file-max 10000] [--files-per-task 200]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nightly_cost import cpu_seconds, free_port, services  # bench/ is this script's folder on sys.path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("invoice warranty shipment router lamp kettle customer refund policy office server backup "
         "contract support ticket manual install battery charger region store price discount").split()


def sentence(rng: random.Random, i: int) -> str:
    a, b, c = rng.sample(WORDS, 3)
    return f"The {a} {b} of unit {i} is handled by the {c} team within {rng.randint(2, 90)} days."


def write_files(folder: Path, n: int, seed: int = 0) -> dict[str, int]:
    """n small files: per hundred, 40 Markdown, 30 HTML, 28 text, 1 PDF and 1 DOCX."""
    import docx
    import pymupdf

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, int] = {}
    for i in range(n):
        sub = folder / f"team-{i % 20:02d}"
        sub.mkdir(exist_ok=True)
        paras = [" ".join(sentence(rng, i) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(1, 3))]
        slot = i % 100
        kind = "pdf" if slot == 0 else "docx" if slot == 1 else "md" if slot < 42 else "html" if slot < 72 else "txt"
        path = sub / f"note-{i:05d}.{kind}"
        if kind == "md":
            path.write_text(f"# Note {i}\n\n" + "\n\n".join(paras) + "\n", encoding="utf-8")
        elif kind == "html":
            body = "".join(f"<p>{p}</p>" for p in paras)
            path.write_text(f"<html><head><title>Note {i}</title></head><body><nav>Home | Help</nav>"
                            f"<h1>Note {i}</h1>{body}</body></html>", encoding="utf-8")
        elif kind == "txt":
            path.write_text(f"Note {i}\n\n" + "\n\n".join(paras) + "\n", encoding="utf-8")
        elif kind == "pdf":
            pdf = pymupdf.open()
            page = pdf.new_page()
            page.insert_textbox(pymupdf.Rect(50, 50, 550, 800), f"Note {i}\n\n" + "\n\n".join(paras), fontsize=10)
            pdf.save(str(path))
        else:
            d = docx.Document()
            d.add_heading(f"Note {i}", level=1)
            for p in paras:
                d.add_paragraph(p)
            d.save(str(path))
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def server_cpu(run_dir: Path) -> float:
    """CPU seconds of the Prefect server process and its children so far."""
    return cpu_seconds(int((run_dir / "prefect.pid").read_text()))


def flows():
    from prefect import flow

    from tasks.chunk import chunk_document_task
    from tasks.ingest import discover, ingest_file_task
    from tasks.prepare import prepare_batch_task

    # The folder, not the file list, is the parameter (as in build_dataset): Prefect refuses flow
    # parameters over 512 KB, and 10,000 FileRefs are 1.2 MB.
    @flow(name="ingest-per-file")
    def per_file(folder: str, ingest, chunk) -> tuple[int, int]:
        refs = discover(Path(folder), ingest)
        ingested = [ingest_file_task(folder, ref, ingest) for ref in refs]
        docs = [d for r in ingested for d in r.documents]
        chunks = [chunk_document_task(d, chunk) for d in docs]
        return len(docs), sum(len(c) for c in chunks)

    @flow(name="ingest-batched")
    def batched(folder: str, ingest, chunk) -> tuple[int, int]:
        refs = discover(Path(folder), ingest)
        n = ingest.files_per_task
        files = [f for i in range(0, len(refs), n) for f in prepare_batch_task(folder, refs[i:i + n], ingest, chunk).files]
        return sum(len(f.ingested.documents) for f in files), sum(len(c) for f in files for c in f.chunks)

    return per_file, batched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--per-file-max", type=int, default=10000,
                    help="skip the per-file way above this many files (it takes minutes per thousand)")
    ap.add_argument("--files-per-task", type=int, default=200)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ingest-scale-"))
    port = free_port()
    os.environ.update({
        "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "DOCTUNE_RUN_DIR": str(work / "run"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore", "PREFECT_LOGGING_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    sys.path.insert(0, str(ROOT))
    rows = []
    try:
        print(f"starting a Prefect server on port {port} ...", flush=True)
        services(os.environ.copy(), "up", "prefect")
        from prefect.exceptions import PrefectHTTPStatusError
        from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        from doctune.settings import ChunkSettings, IngestSettings
        from tasks.ingest import discover
        from tasks.prepare import prepare_files

        per_file, batched = flows()
        ingest, chunk = IngestSettings(files_per_task=args.files_per_task), ChunkSettings()
        for n in args.files:
            folder = work / f"docs-{n}"
            kinds = write_files(folder, n)
            print(f"\n{n} files: {kinds}", flush=True)
            t = time.perf_counter()
            refs = discover(folder, ingest)
            alone = prepare_files(folder, refs, ingest, chunk)
            base = time.perf_counter() - t
            n_docs = sum(len(f.ingested.documents) for f in alone.files)
            n_chunks = sum(len(c) for f in alone.files for c in f.chunks)
            rows.append((n, "work alone", "-", base, 0.0))
            print(f"  work alone: {base:.1f} s ({n_docs} documents, {n_chunks} chunks)", flush=True)
            ways = [("batched", batched)] + ([("per file", per_file)] if n <= args.per_file_max else [])
            for name, fn in ways:
                with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(work / f"storage-{n}-{name}")}):
                    for when in ("cold", "warm"):
                        cpu0, t = server_cpu(work / "run"), time.perf_counter()
                        try:
                            got = fn(str(folder), ingest, chunk)
                        except PrefectHTTPStatusError as exc:
                            # Measured at 10,000 files per file: the server, still writing the cold
                            # run's events, answered the next flow run with 503.
                            print(f"  {name} {when}: the Prefect server refused the run: {str(exc)[:200]}")
                            break
                        wall, cpu = time.perf_counter() - t, server_cpu(work / "run") - cpu0
                        assert tuple(got) == (n_docs, n_chunks), (name, when, got, (n_docs, n_chunks))
                        rows.append((n, name, when, wall, cpu))
                        print(f"  {name} {when}: {wall:.1f} s, server CPU {cpu:.1f} s", flush=True)
    finally:
        services(os.environ.copy(), "down")
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report(rows, args.files_per_task))


def report(rows, files_per_task: int) -> str:
    out = ["| files | way | cache | wall s | files/s | ms/file | Prefect overhead ms/file | server CPU s |",
           "|---|---|---|---|---|---|---|---|"]
    alone = {n: wall for n, way, _, wall, _ in rows if way == "work alone"}
    by = {(n, way, when): (wall, cpu) for n, way, when, wall, cpu in rows}
    for n, way, when, wall, cpu in rows:
        # Against the work alone only when cold: warm, the files are not read at all.
        overhead = f"{1000 * (wall - alone[n]) / n:.1f}" if when == "cold" else "-"
        label = f"batched ({files_per_task} per task)" if way == "batched" else way
        out.append(f"| {n} | {label} | {when} | {wall:.1f} | {n / wall:.0f} | {1000 * wall / n:.1f} | {overhead} "
                   f"| {cpu:.1f} |")
    ratios = [f"{n} files {when}: per file / batched wall {by[(n, 'per file', when)][0] / by[(n, 'batched', when)][0]:.1f}x"
              for n, way, when, *_ in rows if way == "batched" and (n, "per file", when) in by]
    return "\n".join(out + [""] + ratios)


if __name__ == "__main__":
    main()
