"""Files are read in a child process under a time and a memory limit: a pathological file is skipped with
the limit to raise, the other files of its batch are read, and the skip is not cached (a quieter night
may read it)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from doctune.settings import ChunkSettings, IngestSettings
from tasks.ingest import discover, ingest_file, ingest_folder
from tasks.prepare import prepare_files
from tasks.reader_process import ReaderProcess, file_reader

CHUNK = ChunkSettings(chunk_tokens=40, overlap_tokens=5)


def scattered_labels_pdf(n_labels: int, seed: int = 0) -> bytes:
    """A one-page PDF of `n_labels` short text labels at random places (a floor plan, a parts diagram):
    pdfminer's layout analysis of it grows much faster than the number of labels (1,000: 13 s here)."""
    rnd = random.Random(seed)
    ops = [f"BT /F1 {rnd.choice([5, 6, 7, 8])} Tf {rnd.uniform(10, 580):.1f} {rnd.uniform(10, 830):.1f} Td "
           f"(L{i} v{rnd.randint(0, 999)}) Tj ET" for i in range(n_labels)]
    stream = "\n".join(ops).encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 5 0 R >> >> "
               b"/Contents 4 0 R >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for k, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % k + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def folder_with(tmp_path: Path, **files: bytes | str) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, content in files.items():
        path = folder / name.replace("_", ".", 1)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


SMALL = "# Prices\n\nThe Kestrel K4 costs 8,950 EUR.\n"


def test_a_pdf_that_takes_hours_is_stopped_and_its_batch_goes_on(tmp_path):
    folder = folder_with(tmp_path, labels_pdf=scattered_labels_pdf(3000), a_md=SMALL, z_md=SMALL.replace("K4", "K5"))
    settings = IngestSettings(file_timeout_s=3)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")))
    refs = discover(folder, settings)
    start = time.monotonic()
    batch = prepare_files(folder, refs, settings, CHUNK, store)
    took = time.monotonic() - start
    by_name = {f.relpath: f.ingested for f in batch.files}
    assert [d.path for n in ("a.md", "z.md") for d in by_name[n].documents] == ["a.md", "z.md"]
    (skip,) = by_name["labels.pdf"].skipped
    assert "took over 3 s (ingest.file_timeout_s)" in skip.reason and "Raise ingest.file_timeout_s" in skip.reason
    assert took < 120, took  # the file alone would take far longer than this (minutes)
    # The skip is no fact about the file: it is not cached, the two documents are.
    again = prepare_files(folder, refs, settings, CHUNK, store)
    assert again.from_cache == 2


def test_a_file_that_needs_more_memory_than_allowed_is_skipped_and_the_next_read_by_a_fresh_reader(tmp_path):
    big = ("The office in Lyon opens at nine and closes at six. " * 20 + "\n\n") * 8000  # 8.4 MB
    folder = folder_with(tmp_path, big_txt=big, small_md=SMALL)
    result = ingest_folder(folder, IngestSettings(file_memory_mb=8, max_file_mb=20))
    assert [d.path for d in result.documents] == ["small.md"]
    (skip,) = result.skipped
    assert skip.path == "big.txt" and "more than ingest.file_memory_mb=8 MB" in skip.reason
    assert [d.path for d in ingest_folder(folder, IngestSettings(file_memory_mb=256)).documents] == ["big.txt",
                                                                                                   "small.md"]


def test_a_reader_killed_mid_file_skips_that_file_only(tmp_path):
    folder = folder_with(tmp_path, labels_pdf=scattered_labels_pdf(3000), z_md=SMALL)
    settings = IngestSettings(file_timeout_s=600)
    refs = {r.relpath: r for r in discover(folder, settings)}
    with ReaderProcess(settings) as reader:
        # A first file starts the reader, so the kill falls mid-file, not into a slow start-up on a loaded machine.
        assert [d.path for d in ingest_file(folder, refs["z.md"], settings, reader.read).documents] == ["z.md"]
        killer = threading.Timer(2.0, lambda: os.kill(reader.pid, signal.SIGKILL))  # as the OOM killer would
        killer.start()
        try:
            result = ingest_file(folder, refs["labels.pdf"], settings, reader.read)
        finally:
            killer.cancel()
        (skip,) = result.skipped
        assert "the reader process died on it (exit code -9)" in skip.reason and "ingest.file_memory_mb" in skip.reason
        assert [d.path for d in ingest_file(folder, refs["z.md"], settings, reader.read).documents] == ["z.md"]


def test_without_limits_files_are_read_in_this_process(tmp_path):
    folder = folder_with(tmp_path, a_md=SMALL)
    with file_reader(IngestSettings(file_timeout_s=0, file_memory_mb=0)) as read:
        assert read.__module__ == "tasks.ingest"
    with file_reader(IngestSettings()) as read:
        ref = discover(folder, IngestSettings())[0]
        assert read(folder, ref, IngestSettings()).documents[0].text.endswith("8,950 EUR.")
