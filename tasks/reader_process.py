"""Each file is parsed in a child process under a time and a memory limit, so one pathological file is
skipped with its reason and its batch goes on.

A parser can take minutes on a small file (a 136 KB PDF of 3,000 scattered text labels: pdfminer's
layout analysis grows faster than the number of labels, 1,000 of them took 13 s here, 3,000 did not
finish in 300 s) or memory without bound. A thread cannot be stopped and a MemoryError may come from any
allocation of the worker, so the parsing runs in one child process per batch of files, reused from file
to file and replaced when it is killed:
- time: the parent waits `ingest.file_timeout_s` for a file's result, then kills the child;
- memory: the child's address space is limited (RLIMIT_AS) to what it had when it started plus
  `ingest.file_memory_mb`; a parser that asks for more gets a MemoryError (or dies) and the file is skipped.
The child is a fresh interpreter (`python -m tasks.reader_process`), not a multiprocessing child: those
re-run the main script of whoever called, which breaks any script without a `__main__` guard. It costs
about 1.6 s of imports and the OCR engine's setup, once per batch that has a file not in the cache.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterator

from doctune.settings import IngestSettings

log = logging.getLogger(__name__)

MB = 1024 * 1024
STARTUP_S = 120  # a fresh interpreter importing the readers and the OCR engine: 1.6 s here, more when loaded
Read = Callable[[Path, object, IngestSettings], object]  # (folder, FileRef, settings) -> IngestResult


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux), what RLIMIT_AS bounds."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _child(conn, memory_mb: float) -> None:
    """Read files sent by the parent until it sends None; answer each with ("ok", IngestResult),
    ("unreadable", reason), ("memory", "") or ("error", text)."""
    from tasks.ingest import Unreadable, read_file, warm_readers

    warm_readers()  # libraries loaded under the limit fail to map their code (numpy did), not for lack of memory
    if memory_mb > 0:
        limit = _address_space() + int(memory_mb * MB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("ready", os.getpid()))  # the file's time starts after the imports
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        try:
            conn.send(("ok", read_file(*job)))
        except Unreadable as exc:
            conn.send(("unreadable", str(exc)))
        except MemoryError:
            conn.send(("memory", ""))
            return  # what a failed allocation left behind is not worth trusting: a fresh child reads on
        except Exception as exc:
            conn.send(("error", (type(exc).__name__, str(exc)[:300])))


class ReaderError(Exception):
    """A parser's unexpected exception in the reader process, under its own type's name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


class ReaderProcess:
    """A child process that reads files under the limits of `settings`; started at the first file,
    replaced after a file it could not survive. Use as a context manager, or call close()."""

    def __init__(self, settings: IngestSettings):
        self.timeout_s, self.memory_mb = settings.file_timeout_s, settings.file_memory_mb
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.reader_process", str(theirs.fileno()), str(self.memory_mb)],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            ready = self._conn.poll(STARTUP_S) and self._conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            died = self._proc.poll() is not None
            code = self._stop(kill=True)
            what = "exited while starting" if died else f"did not start within {STARTUP_S} s"
            raise RuntimeError(f"the reader process {what} (exit code {code}); its errors are in the worker's log above")

    def _stop(self, kill: bool) -> int | None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None:
            return None
        if not kill:
            try:
                conn.send(None)
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        conn.close()
        return proc.returncode

    def close(self) -> None:
        self._stop(kill=False)

    def __enter__(self) -> ReaderProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, folder: Path, ref, settings: IngestSettings):
        """The file's IngestResult; raises Unreadable (with the limit to raise) when it takes too long,
        needs too much memory or kills the reader."""
        from tasks.ingest import Unreadable

        if self._proc is None:
            self._start()
        try:
            self._conn.send((folder, ref, settings))
            ready = self._conn.poll(self.timeout_s or None)  # 0: no time limit
            answer = self._conn.recv() if ready else None
        except (EOFError, OSError):
            ready, answer = True, None
        if not ready:
            self._stop(kill=True)
            raise Unreadable(f"reading it took over {self.timeout_s:g} s (ingest.file_timeout_s), so it was stopped; "
                             "a PDF of thousands of scattered text fragments can take hours. Raise "
                             "ingest.file_timeout_s to give it longer, or export it again (e.g. print it to PDF)")
        if answer is None:  # the child died: killed for memory, or a parser crashed
            code = self._stop(kill=False)
            raise Unreadable(f"the reader process died on it (exit code {code}); it may have needed more than "
                             f"ingest.file_memory_mb={self.memory_mb:g} MB. Raise ingest.file_memory_mb, or "
                             "export the file again")
        kind, value = answer
        if kind == "ok":
            return value
        if kind == "memory":
            self._stop(kill=True)
            raise Unreadable(f"reading it needed more than ingest.file_memory_mb={self.memory_mb:g} MB of memory; "
                             "raise ingest.file_memory_mb to include it, or split the file")
        if kind == "unreadable":
            raise Unreadable(value)
        raise ReaderError(*value)  # ingest_file lists it as an unexpected error, as in-process


@contextmanager
def file_reader(settings: IngestSettings) -> Iterator[Read]:
    """How a batch reads its files: in a child process under the settings' limits, or in this process
    when both limits are 0."""
    from tasks.ingest import read_file

    if not settings.file_timeout_s and not settings.file_memory_mb:
        yield read_file
        return
    with ReaderProcess(settings) as reader:
        yield reader.read


if __name__ == "__main__":
    _child(Connection(int(sys.argv[1])), float(sys.argv[2]))
