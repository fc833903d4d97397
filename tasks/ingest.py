"""Ingest: a folder of files → Documents (Markdown text) and ready-made Q&A pairs.

Every file either becomes records or is listed in `skipped` with what is wrong and how to fix
it; one bad file never stops a run. Documents (PDF, DOCX, HTML, Markdown, text, tables) feed
chunking and synthesis; FAQ tables and instruction files (Alpaca, ShareGPT, OpenAI messages)
are already question/answer pairs and go straight to the dataset.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import functools
import hashlib
import io
import json
import logging
import os
import re
import stat
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from pydantic import BaseModel, Field

from doctune.prefect_utils import CACHE
from doctune.records import Document, QAPair, SkippedFile, detect_language
from doctune.settings import IngestSettings
from doctune.tables import markdown_table, tidy_tables

MB = 1024 * 1024

# extension → Document.format
FORMATS = {
    ".pdf": "pdf", ".docx": "docx", ".html": "html", ".htm": "html", ".xlsx": "xlsx",
    ".md": "md", ".markdown": "md", ".txt": "txt", ".csv": "csv", ".json": "json", ".jsonl": "jsonl",
    ".pptx": "pptx", ".xls": "xls", ".doc": "doc", ".epub": "epub", ".odt": "odt", ".eml": "eml",
    ".png": "image", ".jpg": "image", ".jpeg": "image", ".tif": "image", ".tiff": "image",
}
# What to tell the owner of a file we cannot read, for formats people commonly drop in.
CONVERT_HINTS = {
    ".ppt": "save it as .pptx or PDF", ".rtf": "save it as .docx", ".ods": "save it as .xlsx",
    ".odp": "save it as .pptx or PDF", ".msg": "save the mail as .eml (Outlook: File > Save As)",
    ".gif": "save it as .png", ".webp": "save it as .png", ".bmp": "save it as .png",
}

QUESTION_NAMES = {"question", "questions", "q", "问题", "提问"}
ANSWER_NAMES = {"answer", "answers", "a", "答案", "回答"}
ACCEPTED_JSON = (
    'Alpaca [{"instruction", "input", "output"}], '
    'ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}, '
    'OpenAI {"messages": [{"role": "system"|"user"|"assistant", "content"}]}'
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "model": "assistant", "system": "system"}


# The reason of a file whose content changed between discover and ingest: its result must not be
# cached under the hash discovered (tasks/prepare.py checks for it).
CHANGED_SINCE_DISCOVERY = "changed since it was discovered"
# Reasons that are no fact about the file's content (a limit hit on a busy night, a change while being
# read): such a result is not cached, so the next run reads the file again.
NOT_CACHED = (CHANGED_SINCE_DISCOVERY, "ingest.file_timeout_s", "ingest.file_memory_mb", "OCR is unavailable here")


class FileRef(BaseModel):
    relpath: str = Field(description="POSIX path relative to the ingested folder; bytes of a name that are not "
                         "valid UTF-8 are shown escaped (caf\\xe9.md), so every output can carry it.")
    sha256: str = Field(description="Content hash; part of the cache key, so an edited file is re-ingested.")
    size: int
    fs_name: str | None = Field(None, description="Hex of the path's bytes as the filesystem has them, when "
                                "relpath had to escape some; the file is read by it.")


def fs_path(folder: Path, ref: FileRef) -> Path:
    """Where the file of `ref` is on disk (its name as the filesystem has it)."""
    return Path(folder) / (os.fsdecode(bytes.fromhex(ref.fs_name)) if ref.fs_name else ref.relpath)


def shown_name(relpath: str) -> str:
    """A path as every output can carry it: bytes that are not UTF-8 (surrogate-escaped by os.walk) as \\xNN."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _outside(path: Path, root: Path) -> Path | None:
    """The target of a symbolic link that leads out of `root` (resolved), or None."""
    target = path.resolve()
    return None if target == root or target.is_relative_to(root) else target


class IngestResult(BaseModel):
    documents: list[Document] = Field(default_factory=list)
    pairs: list[QAPair] = Field(default_factory=list)
    skipped: list[SkippedFile] = Field(default_factory=list)

    def merge(self, other: IngestResult) -> IngestResult:
        return IngestResult(documents=self.documents + other.documents, pairs=self.pairs + other.pairs,
                            skipped=self.skipped + other.skipped)


class Unreadable(Exception):
    """A file we cannot use; the message is the reason shown to the user."""


def _logger():
    # Inside a flow or task the run logger sends lines to the Prefect UI; elsewhere (tests, CLI) it
    # raises MissingContextError, and the standard logger does.
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


# ---------------------------------------------------------------- discover


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """Glob → regex over POSIX relpaths: `*` stays inside one folder, `**/` spans any number
    of folders (zero included), a trailing `/**` also matches the folder itself."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def is_excluded(relpath: str, patterns: list[str]) -> bool:
    """True when a pattern matches the path or one of its folders (so `**/.*` also drops `.git/x`)."""
    regexes = [_glob_regex(p) for p in patterns]
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(r.match(p) for r in regexes for p in prefixes)


def _hash_file(path: Path) -> tuple[str, int]:
    # Streamed in blocks so a multi-GB file never sits in memory.
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(MB):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def discover(folder: Path, settings: IngestSettings) -> list[FileRef]:
    """All regular files under `folder`, sorted by relpath, minus `settings.exclude` (see discover_all)."""
    return discover_all(folder, settings)[0]


def discover_all(folder: Path, settings: IngestSettings) -> tuple[list[FileRef], list[SkippedFile]]:
    """The files to read under `folder`, sorted by relpath, minus `settings.exclude`, and what is not read,
    each with its reason: a symbolic link whose target is outside the folder (a link must not pull files from
    elsewhere into training), a symbolic link to a folder (not followed: no loops, no file read twice), and
    anything that is not a regular file (a FIFO would block the reader forever)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; point ingest at the folder holding your documents")
    log = _logger()
    root_resolved = folder.resolve()
    refs, skipped, n_excluded = [], [], 0
    for root, dirs, files in os.walk(folder):  # symlinked folders are not followed: no loops
        rel_root = Path(root).relative_to(folder).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        keep = [d for d in dirs if not is_excluded(rel_root + d, settings.exclude)]
        n_excluded += len(dirs) - len(keep)
        dirs[:] = keep
        for d in keep:
            if (Path(root) / d).is_symlink():
                skipped.append(SkippedFile(path=shown_name(rel_root + d) + "/", reason=(
                    f"a symbolic link to a folder ({(Path(root) / d).resolve()}): not followed; copy or move the "
                    "files into the folder to include them")))
        for name in files:
            relpath = rel_root + name
            path = Path(root) / name
            shown = shown_name(relpath)
            if is_excluded(relpath, settings.exclude):
                n_excluded += 1
                continue
            if path.is_symlink() and (target := _outside(path, root_resolved)):
                skipped.append(SkippedFile(path=shown, reason=(
                    f"a symbolic link to {shown_name(str(target))}, outside the folder: not read (a link must not "
                    "pull files from elsewhere into training); copy the file into the folder to include it")))
                continue
            try:
                if not stat.S_ISREG(path.stat().st_mode):
                    skipped.append(SkippedFile(path=shown, reason="not a regular file (a FIFO, socket or device): "
                                                                  "not read"))
                    continue
                sha, size = _hash_file(path)
            except OSError as exc:
                # Kept with an empty hash so ingest_file lists it as skipped with the error.
                log.warning("ingest: cannot read %s: %s", shown, exc)
                sha, size = "", 0
            fs_name = os.fsencode(relpath).hex() if shown != relpath else None
            refs.append(FileRef(relpath=shown, sha256=sha, size=size, fs_name=fs_name))
    refs.sort(key=lambda r: r.relpath)
    log.info("ingest: %d files in %s (%d files or folders excluded by %s, %d not read: links out of the folder, "
             "linked folders, special files)", len(refs), folder, n_excluded, settings.exclude, len(skipped))
    return refs, skipped


# ---------------------------------------------------------------- sniffing and text helpers


def _head(data: bytes) -> bytes:
    """The printable start of the file, for messages: b'PK' rather than b'PK\\x03\\x04'."""
    printable = re.match(rb"[\x20-\x7e]*", data[:8]).group()
    return printable if len(printable) >= 2 else data[:4]


def _sniff(data: bytes) -> tuple[str | None, str | None]:
    """What the bytes look like: (a description, the extension they belong under)."""
    if data.startswith(b"PK\x03\x04"):
        try:
            names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
        except zipfile.BadZipFile:
            return "a damaged zip archive", None
        for member, ext in (("word/document.xml", ".docx"), ("xl/workbook.xml", ".xlsx"),
                            ("ppt/presentation.xml", ".pptx"), ("META-INF/container.xml", ".epub")):
            if member in names:
                return None, ext
        if "content.xml" in names and "mimetype" in names:
            kind = zipfile.ZipFile(io.BytesIO(data)).read("mimetype")[:100]
            if kind.endswith(b"opendocument.text"):
                return None, ".odt"
            return f"an OpenDocument file ({kind.decode('ascii', 'replace')})", None
        return "a zip archive", None
    if data.startswith(OLE_MAGIC):
        return ("an old binary Office file (.doc/.xls/.ppt) or a password-protected one; "
                "save it as .docx/.xlsx/.pptx without a password"), None
    if b"%PDF-" in data[:1024]:
        return None, ".pdf"
    for magic, ext in ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif")):
        if data.startswith(magic):
            return None, ext
    if data.startswith(b"GIF8"):
        return "a GIF image (save it as .png to have it read by OCR)", None
    if data.startswith(b"{\\rtf"):
        return "an RTF document; save it as .docx", None
    if data.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return None, ".html"
    return None, None


OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # .doc, .xls, .ppt, .msg, and encrypted Office files


def _hint(data: bytes, otherwise: str = "the file is damaged or has the wrong extension") -> str:
    what, ext = _sniff(data)
    return f"; is it a {ext}?" if ext else f"; it looks like {what}" if what else f"; {otherwise}"


_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


def decode_text(data: bytes) -> str:
    """Bytes → str: a BOM wins, then strict UTF-8, then charset detection (GB18030/GBK exports
    from Chinese Windows are common and are not UTF-8)."""
    for bom, encoding in _BOMS:  # UTF-32 LE before UTF-16 LE: their BOMs share a prefix
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    if b"\x00" in data[:65536]:
        hint = _hint(data, "if it is UTF-16 text without a BOM, save it as UTF-8")
        raise Unreadable(f"binary, not text (contains NUL bytes){hint}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        hint = _hint(data, "if it is text, save it as UTF-8")
        raise Unreadable(f"binary or unknown text encoding (neither UTF-8 nor a detectable charset){hint}")
    return str(best)


def junk_share(text: str) -> float:
    """Share of non-space characters that are replacement, control, private or unassigned code
    points; real text has almost none, bytes decoded as text have many."""
    chars = [c for c in text[:100_000] if not c.isspace()]
    if not chars:
        return 0.0
    bad = sum(c == "\ufffd" or unicodedata.category(c) in ("Cc", "Co", "Cn", "Cs") for c in chars)
    return bad / len(chars)


def _check_not_junk(text: str) -> None:
    share = junk_share(text)
    if share > 0.1:
        raise Unreadable(f"binary junk, not text ({share:.0%} of characters are control or undecodable); "
                         "check the file opens in a text editor, or remove it")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """Modest clean-up: unify newlines, drop control characters and trailing spaces, collapse runs
    of blank lines to one. Headings and line structure stay, chunking relies on them."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n\n")  # \x0c: PDF page breaks
    # str methods and a search before each sub: on a 50 MB file this is 0.3 s instead of 0.9 s.
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


# ATX ("# Title") or Setext (a line underlined with === or ---, common in plain-text files).
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$|^(\S.*?)[ \t]*\n(?:={3,}|-{3,})[ \t]*$", re.MULTILINE)


def _title(text: str, relpath: str) -> str:
    m = _HEADING.search(text, 0, 100_000)  # a title sits near the top; don't scan 50 MB for one
    return (m.group(1) or m.group(2)).strip()[:200] if m else Path(relpath).stem


# ---------------------------------------------------------------- readers


@dataclass
class _File:
    relpath: str
    ext: str
    data: bytes
    sha256: str
    max_file_mb: float = 20.0  # ingest.max_file_mb: archives are bounded by what they may unpack to
    ocr: bool = True  # ingest.ocr: scanned PDF pages and images are read by OCR
    # ingest.ocr_min_confidence: pages read below it are left out and listed (a _File made without it, such as
    # a mail's attachment, gets the setting's default)
    ocr_min_confidence: float = IngestSettings.model_fields["ocr_min_confidence"].default

    @property
    def doc_id(self) -> str:
        return self.sha256[:16]


def _document(f: _File, text: str, title: str | None = None, ocr_pages: dict[str, float] | None = None
              ) -> IngestResult:
    text = normalise(tidy_tables(text))
    if not text:
        raise Unreadable("no text found" + _NO_TEXT_HINTS.get(f.ext, ""))
    return IngestResult(documents=[Document(
        doc_id=f.doc_id, path=f.relpath, sha256=f.sha256, format=FORMATS[f.ext],
        title=title or _title(text, f.relpath), text=text, language=detect_language(text),
        ocr_pages=ocr_pages or {},
    )])


_NO_TEXT_HINTS = {
    ".pdf": " (no text layer, and nothing OCR could read: blank pages?)",
    ".docx": " (only images? images inside a Word file are not read by OCR: save it as PDF)",
    ".html": " (a page drawn by JavaScript? save the page as it is shown, or export it as PDF)",
}


@functools.lru_cache(maxsize=1)
def _markitdown():
    from markitdown import MarkItDown  # ~0.5 s to set up, so once per process

    return MarkItDown()


def warm_readers() -> None:
    """Load every parser library now (a reader process does, before its memory limit): reading a tiny
    document of each kind imports what markitdown loads lazily."""
    import importlib

    for library in ("openpyxl", "bs4", "charset_normalizer"):  # read_xlsx, clean_html, decode_text
        importlib.import_module(library)
    for ext, mimetype, data in ((".pdf", "application/pdf", _TINY_PDF), (".html", "text/html", b"<p>warm</p>")):
        _convert(data, ext, mimetype)
    _warm_ocr()


def _warm_ocr() -> None:
    """Build the OCR engine and run it once (read_pdf, read_image). An engine that cannot load here (a
    system library missing) must not stop the reader process: every other format still reads, and scans
    are listed with the reason."""
    from tasks import ocr

    try:
        ocr.warm()
    except Exception as exc:  # OcrUnavailable says what to install; anything else is reported as it is
        _logger().warning("ingest: %s", exc if isinstance(exc, ocr.OcrUnavailable) else
                          f"OCR could not warm up ({type(exc).__name__}: {exc}); scans will be tried as they come")


_TINY_PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
             b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>"
             b"endobj\n4 0 obj<</Length 35>>stream\nBT /F1 12 Tf 20 100 Td (warm) Tj ET\nendstream endobj\n"
             b"5 0 obj<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def _convert(data: bytes, ext: str, mimetype: str) -> str:
    from markitdown import StreamInfo

    try:
        result = _markitdown().convert_stream(io.BytesIO(data), stream_info=StreamInfo(
            extension=ext, mimetype=mimetype, charset="utf-8" if ext == ".html" else None))
    except Exception as exc:
        # markitdown wraps the parser's error in a long message; the parser's own one is clearer.
        attempts = getattr(exc, "attempts", None) or []
        inner = next((a.exc_info[1] for a in reversed(attempts) if a.exc_info), exc)
        message = re.sub(r"\s+", " ", f"{type(inner).__name__}: {inner}".rstrip(": "))[:300]
        if "password" in message.lower() or "encrypt" in message.lower():
            raise Unreadable(f"{ext[1:].upper()} is password-protected ({message}); save a copy without the password")
        raise Unreadable(f"{ext[1:].upper()} could not be parsed ({message}); the file may be damaged: "
                         "re-export it from its source program") from exc
    return result.markdown or ""


def read_pdf(f: _File) -> IngestResult:
    """The text layer, and with ingest.ocr the pages that have none (scans) read by OCR, in page order. A PDF
    with no scanned page is read exactly as it was before OCR existed."""
    if b"%PDF-" not in f.data[:1024]:  # checked first: parsers give baffling errors on non-PDFs
        raise Unreadable(f"not a PDF (starts with {_head(f.data)!r}){_hint(f.data)}")
    from tasks.ocr import OcrUnavailable, ocr_pdf, pdf_pages, pdf_subset

    kinds = pdf_pages(f.data) or []  # none: pdfium cannot open it, and the text reader says why
    scans = [n for n, kind in enumerate(kinds) if kind == "scan"]
    if not scans:
        return _document(f, _convert(f.data, ".pdf", "application/pdf"))
    not_read = f"{len(scans)} of {len(kinds)} pages are scans and were not read: "
    if not f.ocr:
        return _with_notes(f, _convert(f.data, ".pdf", "application/pdf"), [SkippedFile(
            path=f.relpath, reason=not_read + "ingest.ocr is off; turn it on to read them")])
    try:
        scanned = ocr_pdf(f.data, scans)
        read, notes = _ocr_kept(f, scanned)
    except OcrUnavailable as exc:
        return _with_notes(f, _convert(f.data, ".pdf", "application/pdf"),
                           [SkippedFile(path=f.relpath, reason=not_read + str(exc))])
    parts = []
    for scan, pages in _runs([kind == "scan" for kind in kinds]):
        if scan:
            parts += [read[n] for n in pages if n in read]
        else:  # the text pages between two scans, read as a PDF of their own so their text stays in place
            parts.append(_convert(pdf_subset(f.data, pages), ".pdf", "application/pdf"))
    return _with_notes(f, "\n\n".join(p.strip() for p in parts if p.strip()), notes, _ocr_confidences(scanned, read))


def _runs(flags: list[bool]) -> list[tuple[bool, list[int]]]:
    """Consecutive pages with the same flag: (flag, 0-based pages)."""
    runs: list[tuple[bool, list[int]]] = []
    for n, flag in enumerate(flags):
        if runs and runs[-1][0] == flag:
            runs[-1][1].append(n)
        else:
            runs.append((flag, [n]))
    return runs


def _ocr_kept(f: _File, pages: list) -> tuple[dict[int, str], list[SkippedFile]]:
    """The text of each OCR'd page (by 0-based number) read at ingest.ocr_min_confidence or above, and a note
    listing the pages read below it, which are left out: garbage read from a smudge or a photo must not
    become training text. A page where OCR found nothing (a blank back side) is neither."""
    kept = {p.page: p.text for p in pages if p.text and p.confidence >= f.ocr_min_confidence}
    low = [p for p in pages if p.text and p.confidence < f.ocr_min_confidence]
    if kept:
        _logger().info("ingest: %s: OCR read page %s (confidence %s)", f.relpath,
                       ", ".join(str(p.page + 1) for p in pages if p.page in kept),
                       ", ".join(f"{p.confidence:.2f}" for p in pages if p.page in kept))
    if not low:
        return kept, []
    where = ", ".join(f"page {p.page + 1}: {p.confidence:.2f}" for p in low[:10]) + (" ..." if len(low) > 10 else "")
    what = f"{len(low)} of {len(pages)} scanned pages" if len(pages) > 1 else "the scan"
    return kept, [SkippedFile(path=f.relpath, reason=(
        f"{what} read by OCR below ingest.ocr_min_confidence={f.ocr_min_confidence:g} ({where}), left out: "
        "a straighter, sharper or 300 dpi scan may read; lower ingest.ocr_min_confidence to keep such text"))]


def _ocr_confidences(pages: list, read: dict[int, str]) -> dict[str, float]:
    """The confidence of each page whose OCR text was kept, by 1-based page number (Document.ocr_pages)."""
    return {str(p.page + 1): round(p.confidence, 3) for p in pages if p.page in read}


def _with_notes(f: _File, text: str, notes: list[SkippedFile], ocr_pages: dict[str, float] | None = None
                ) -> IngestResult:
    """The document and its notes; when no text is left, the file is skipped with the notes' reasons."""
    if not normalise(text) and notes:
        raise Unreadable("no text kept: " + "; ".join(n.reason for n in notes))
    result = _document(f, text, ocr_pages=ocr_pages)
    result.skipped += notes
    return result


def read_image(f: _File) -> IngestResult:
    """A scan or photo of a page (.png, .jpg, .jpeg, .tif, .tiff), read by OCR; each frame of a multi-page
    TIFF (a fax) is a page."""
    from PIL import Image, UnidentifiedImageError

    from tasks.ocr import OcrUnavailable, ocr_frames

    if not f.ocr:
        raise Unreadable("an image, and ingest.ocr is off: turn it on to read its text by OCR")
    try:
        pages = ocr_frames(f.data)
    except UnidentifiedImageError:
        raise Unreadable(f"not an image Pillow can open (starts with {_head(f.data)!r}){_hint(f.data)}")
    except Image.DecompressionBombError as exc:
        raise Unreadable(f"an image too large to decode ({exc}); scan it again at 300 dpi")
    except OcrUnavailable as exc:
        raise Unreadable(f"an image, not read: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for a truncated or damaged image
        raise Unreadable(f"the image could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); the file may "
                         "be damaged: save or scan it again") from exc
    read, notes = _ocr_kept(f, pages)
    if not read and not notes:
        raise Unreadable("no text found: OCR read nothing in the image")
    return _with_notes(f, "\n\n".join(read[n] for n in sorted(read)), notes, _ocr_confidences(pages, read))


# A .docx or .xlsx is a zip archive: what it unpacks to is checked before any parser opens it. Python's
# zipfile never unpacks a member past its declared size, so the declared sizes bound the memory it takes.
ZIP_UNPACKED_PER_FILE_MB = 25  # unpacked MB per MB of ingest.max_file_mb: Office XML packs text 5-20x
ZIP_MAX_RATIO = 200  # text in Office XML packs 5-20x; a zip bomb packs thousands of times
ZIP_RATIO_FROM_MB = 32  # below this, a high ratio is harmless (an almost empty sheet packs well)


def check_zip_size(f: _File) -> None:
    """Refuse an archive that would unpack to more than 25x ingest.max_file_mb (500 MB by default), or far
    more than such files do."""
    try:
        with zipfile.ZipFile(io.BytesIO(f.data)) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, ValueError) as exc:
        raise Unreadable(f"a damaged zip archive ({exc}); save it again from its application")
    ratio = unpacked / max(len(f.data), 1)
    limit_mb = ZIP_UNPACKED_PER_FILE_MB * f.max_file_mb
    if unpacked > limit_mb * MB or (unpacked > ZIP_RATIO_FROM_MB * MB and ratio > ZIP_MAX_RATIO):
        raise Unreadable(f"a zip archive that would unpack to {unpacked / MB:,.0f} MB from {len(f.data) / MB:.2f} MB "
                         f"({ratio:,.0f}x; the limits are {limit_mb:,.0f} MB, {ZIP_UNPACKED_PER_FILE_MB}x "
                         f"ingest.max_file_mb, and {ZIP_MAX_RATIO}x): not opened, as a possible zip bomb; if it is a "
                         "real document, save it again or split it (or raise ingest.max_file_mb)")


def _check_office_zip(f: _File, member: str) -> None:
    if not f.data.startswith(b"PK\x03\x04"):
        raise Unreadable(f"not a {f.ext} (starts with {_head(f.data)!r}){_hint(f.data)}")
    check_zip_size(f)  # before _sniff: even listing members must not start on a bomb's contents
    what, ext = _sniff(f.data)
    if ext != f.ext:
        found = f"is it a {ext}?" if ext else f"it is {what}"
        raise Unreadable(f"not a {f.ext} (a zip archive without {member}); {found}")


_EMPTY_HEADER = re.compile(r"^(\|(?: +\|)+)\n(\|(?: *-+ *\|)+)\n(\|.*\|)$", re.MULTILINE)


def promote_empty_headers(text: str) -> str:
    """A Word table has no header cells, so its Markdown gets an empty header row: its first row is the
    header (what a reader takes it for, and what row facts read each row with)."""
    return _EMPTY_HEADER.sub(lambda m: f"{m.group(3)}\n{m.group(2)}", text)


def read_docx(f: _File) -> IngestResult:
    _check_office_zip(f, "word/document.xml")
    return _document(f, promote_empty_headers(_convert(
        f.data, ".docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document")))


# Page furniture: menus, banners, cookie notices and scripts are not knowledge to train on.
_HTML_DROP = ["script", "style", "noscript", "template", "nav", "aside", "iframe", "svg"]


def clean_html(data: bytes) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")  # bytes: bs4 honours <meta charset> and detects otherwise
    for tag in soup.find_all(_HTML_DROP) + soup.find_all(attrs={"role": "navigation"}):
        if not tag.decomposed:  # already gone with a dropped parent
            tag.decompose()
    # A page's own header/footer is site chrome; a <header> inside an <article> or <section>
    # holds that article's title, which we keep.
    for tag in soup.find_all(["header", "footer"]) + soup.find_all(attrs={"role": ["banner", "contentinfo"]}):
        if not tag.decomposed and not tag.find_parent(["article", "main", "section"]):
            tag.decompose()
    return str(soup)


def read_html(f: _File) -> IngestResult:
    return _document(f, _convert(clean_html(f.data).encode("utf-8"), ".html", "text/html"))


def read_text(f: _File) -> IngestResult:
    text = decode_text(f.data)
    _check_not_junk(text)
    return _document(f, text)


# ---- tables: FAQ exports become pairs, other tables become Markdown


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime) and value.time() == dt.time(0):
        return value.date().isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value).strip()


def _column_name(value: str) -> str:
    return value.replace("\ufeff", "").strip().strip(":：").strip().lower()


def qa_columns(header: list[str]) -> tuple[int, int] | None:
    """Indexes of the question and answer columns, when the header has both."""
    names = [_column_name(h) for h in header]
    q = next((i for i, n in enumerate(names) if n in QUESTION_NAMES), None)
    a = next((i for i, n in enumerate(names) if n in ANSWER_NAMES), None)
    return (q, a) if q is not None and a is not None else None


@dataclass
class _Table:
    name: str
    rows: list[list[str]]  # first row is the header; fully empty rows already dropped
    numbers: list[int]  # each row's number in the file, so messages point where the user looks


def _faq_pairs(f: _File, table: _Table, cols: tuple[int, int]) -> tuple[list[QAPair], list[int]]:
    """Pairs from a FAQ table, and the 1-based row numbers that had only half a pair."""
    q_col, a_col = cols
    pairs, half = [], []
    for n, row in zip(table.numbers[1:], table.rows[1:]):
        q = row[q_col].strip() if q_col < len(row) else ""
        a = row[a_col].strip() if a_col < len(row) else ""
        if q and a:
            pairs.append(QAPair(question=q, answer=a, source="faq", doc_id=f.doc_id, path=f.relpath,
                                language=detect_language(q + "\n" + a)))
        elif q or a:
            half.append(n)
    return pairs, half


def _tables_result(f: _File, tables: list[_Table]) -> IngestResult:
    tables = [t for t in tables if t.rows]
    if not tables:
        raise Unreadable("no rows in the table")
    pairs, notes, text_parts = [], [], []
    for t in tables:
        cols = qa_columns(t.rows[0])
        if cols:
            got, half = _faq_pairs(f, t, cols)
            pairs += got
            if half:
                where = f"sheet {t.name!r} " if f.ext in (".xlsx", ".xls") else ""
                notes.append(SkippedFile(path=f.relpath, reason=(
                    f"{where}{len(half)} of {len(t.rows) - 1} FAQ rows have a question or an answer missing "
                    f"(first at row {half[0]}); fill in both cells to include them")))
        elif len(t.rows) > 1:
            heading = f"## {t.name}\n\n" if len(tables) > 1 else ""
            text_parts.append(heading + markdown_table(t.rows))
    result = IngestResult(pairs=pairs, skipped=notes)
    if text_parts:
        result = result.merge(_document(f, "\n\n".join(text_parts), title=Path(f.relpath).stem))
    if not result.documents and not result.pairs:
        raise Unreadable("; ".join(n.reason for n in notes) or "only a header row, no data")
    return result


def read_csv(f: _File) -> IngestResult:
    text = decode_text(f.data)
    _check_not_junk(text)
    try:
        dialect = csv.Sniffer().sniff(text[:20_000], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    numbered = [(reader.line_num, [c.strip() for c in r]) for r in reader]
    return _tables_result(f, [_table(Path(f.relpath).stem, numbered)])


def _table(name: str, numbered: list[tuple[int, list[str]]]) -> _Table:
    numbered = [(n, r) for n, r in numbered if any(r)]
    # Drop columns that are empty everywhere (cell formatting often widens a sheet).
    width = max((len(r) for _, r in numbered), default=0)
    used = [i for i in range(width) if any(i < len(r) and r[i] for _, r in numbered)]
    return _Table(name=name, rows=[[r[i] if i < len(r) else "" for i in used] for _, r in numbered],
                  numbers=[n for n, _ in numbered])


def read_xlsx(f: _File) -> IngestResult:
    import openpyxl

    _check_office_zip(f, "xl/workbook.xml")
    # Read with openpyxl rather than markitdown: FAQ detection needs the cells, and one table
    # renderer for CSV and XLSX keeps their Markdown alike.
    try:
        wb = openpyxl.load_workbook(io.BytesIO(f.data), read_only=True, data_only=True)
    except Exception as exc:
        raise Unreadable(f"XLSX could not be parsed ({type(exc).__name__}: {str(exc)[:200]}); the file may be "
                         "damaged: re-save it from Excel") from exc
    try:
        tables = []
        for ws in wb.worksheets:
            rows = ws.iter_rows(min_row=1, values_only=True)
            tables.append(_table(ws.title, [(n, [_cell(v) for v in r]) for n, r in enumerate(rows, start=1)]))
    finally:
        wb.close()
    return _tables_result(f, tables)


def read_xls(f: _File) -> IngestResult:
    """An Excel 97-2003 workbook (xlrd), read like .xlsx: FAQ sheets become pairs, other sheets tables."""
    import xlrd

    if not f.data.startswith(OLE_MAGIC):
        raise Unreadable(f"not an .xls (starts with {_head(f.data)!r}){_hint(f.data)}")
    try:
        book = xlrd.open_workbook(file_contents=f.data, on_demand=True)
    except Exception as exc:
        raise Unreadable(f"XLS could not be parsed ({type(exc).__name__}: {str(exc)[:200]}); the file may be "
                         "damaged or password-protected: save it as .xlsx from Excel") from exc
    try:
        tables = []
        for sheet in book.sheets():
            rows = []
            for n in range(sheet.nrows):
                cells = []
                for cell in sheet.row(n):
                    value = cell.value
                    if cell.ctype == xlrd.XL_CELL_DATE:
                        value = xlrd.xldate.xldate_as_datetime(value, book.datemode)
                    elif cell.ctype == xlrd.XL_CELL_BOOLEAN:
                        value = bool(value)
                    cells.append(_cell(value))
                rows.append((n + 1, cells))
            tables.append(_table(sheet.name, rows))
    finally:
        book.release_resources()
    return _tables_result(f, tables)


# ---- slides, books, OpenDocument, old Word, mail


def read_pptx(f: _File) -> IngestResult:
    """A slide deck: each slide's title a heading, its text, tables as Markdown tables, speaker notes kept."""
    _check_office_zip(f, "ppt/presentation.xml")
    text = _convert(f.data, ".pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation")
    text = re.sub(r"^<!-- Slide number: (\d+) -->$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^### Notes:$", "Speaker notes:", text, flags=re.MULTILINE)
    return _document(f, text)


_EPUB_META = re.compile(r"^\*\*(Title|Authors?|Language|Identifier|Publisher|Date|Description):\*\* ?(.*)$",
                        re.MULTILINE)


def read_epub(f: _File) -> IngestResult:
    """An e-book: its chapters in spine order; the book's title from its metadata."""
    _check_office_zip(f, "META-INF/container.xml")
    text = _convert(f.data, ".epub", "application/epub+zip")
    title = next((m.group(2).strip() for m in _EPUB_META.finditer(text) if m.group(1) == "Title"), None)
    return _document(f, _EPUB_META.sub("", text), title=title or None)


_ODF = {"text": "urn:oasis:names:tc:opendocument:xmlns:text:1.0",
        "table": "urn:oasis:names:tc:opendocument:xmlns:table:1.0",
        "office": "urn:oasis:names:tc:opendocument:xmlns:office:1.0"}


def _odf_text(node) -> str:
    """A paragraph's text: spans inline, text:s as spaces, tabs and line breaks kept, notes left out."""
    parts = [node.text or ""]
    for child in node:
        tag = child.tag.split("}")[-1]
        if tag == "s":
            parts.append(" " * int(child.get(f"{{{_ODF['text']}}}c", "1")))
        elif tag == "tab":
            parts.append("\t")
        elif tag == "line-break":
            parts.append("\n")
        elif tag not in ("note", "annotation"):
            parts.append(_odf_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _odf_blocks(node, out: list[str]) -> None:
    for child in node:
        tag = child.tag.split("}")[-1]
        if tag == "h":
            level = int(child.get(f"{{{_ODF['text']}}}outline-level", "1"))
            out.append("#" * min(level, 6) + " " + _odf_text(child).strip())
        elif tag == "p":
            out.append(_odf_text(child).strip())
        elif tag == "list":
            for item in child.iter(f"{{{_ODF['text']}}}list-item"):
                text = " ".join(_odf_text(p).strip() for p in item.findall(f"{{{_ODF['text']}}}p"))
                out.append("- " + text)
        elif tag == "table":
            rows = [[" ".join(_odf_text(p).strip() for p in cell.iter(f"{{{_ODF['text']}}}p"))
                     for cell in row.iter(f"{{{_ODF['table']}}}table-cell")]
                    for row in child.iter(f"{{{_ODF['table']}}}table-row")]
            rows = [r for r in rows if any(r)]
            if rows:
                out.append(markdown_table(rows))
        elif tag in ("section", "soft-page-break", "index-body", "table-of-content"):
            _odf_blocks(child, out)


def read_odt(f: _File) -> IngestResult:
    """An OpenDocument text (LibreOffice, WPS): headings, paragraphs, lists and tables from content.xml."""
    from lxml import etree

    _check_office_zip(f, "content.xml")
    try:
        with zipfile.ZipFile(io.BytesIO(f.data)) as z:
            xml = z.read("content.xml")
        # No entities, no network, no huge trees: the XML is the sender's.
        root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False))
    except (KeyError, zipfile.BadZipFile, etree.XMLSyntaxError) as exc:
        raise Unreadable(f"ODT could not be parsed ({type(exc).__name__}: {str(exc)[:200]}); re-save it") from exc
    body = root.find(f"{{{_ODF['office']}}}body/{{{_ODF['office']}}}text")
    blocks: list[str] = []
    if body is not None:
        _odf_blocks(body, blocks)
    return _document(f, "\n\n".join(b for b in blocks if b))


def read_doc(f: _File) -> IngestResult:
    """An old binary Word file, through antiword (Debian's `antiword`) when it is installed."""
    import shutil
    import subprocess
    import tempfile

    if not f.data.startswith(OLE_MAGIC):
        raise Unreadable(f"not a .doc (starts with {_head(f.data)!r}){_hint(f.data)}")
    antiword = shutil.which("antiword")
    if antiword is None:
        raise Unreadable("an old Word .doc: doctune reads it with antiword, which is not installed here "
                         "(apt-get install antiword); or save it as .docx")
    with tempfile.NamedTemporaryFile(suffix=".doc") as tmp:
        tmp.write(f.data)
        tmp.flush()
        done = subprocess.run([antiword, "-w", "0", tmp.name], capture_output=True, timeout=300)
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip()[:200]
        raise Unreadable(f"antiword could not read this .doc ({why}); save it as .docx")
    return _document(f, done.stdout.decode("utf-8", "replace"))


MAIL_DEPTH = 3  # a mail attached to a mail attached to a mail: deeper is not knowledge, it is a loop


def _mail_body(msg) -> str:
    body = msg.get_body(preferencelist=("plain", "html"))
    if body is None:
        return ""
    content = body.get_content()
    if body.get_content_subtype() == "html":
        raw = content.encode("utf-8") if isinstance(content, str) else content
        return _convert(clean_html(raw).encode("utf-8"), ".html", "text/html")
    return content if isinstance(content, str) else content.decode("utf-8", "replace")


def read_eml(f: _File, depth: int = 0) -> IngestResult:
    """A saved e-mail: the subject is its title, the sender and date its first lines, then the body; every
    attachment doctune can read becomes a document of its own (`mail.eml/report.pdf`), the rest are listed."""
    import email
    import email.policy

    msg = email.message_from_bytes(f.data, policy=email.policy.default)
    if not msg.keys() or not any(msg.get(h) for h in ("From", "Subject", "Date", "To")):
        raise Unreadable("not an e-mail (no From/Subject/Date headers); a mail saved from a mail program starts with them")
    subject = " ".join(str(msg.get("Subject", "")).split())
    head = [f"{name}: {' '.join(str(msg[name]).split())}" for name in ("From", "To", "Date") if msg.get(name)]
    body = normalise(_mail_body(msg))
    result = IngestResult()
    if body:
        text = (f"# {subject}\n\n" if subject else "") + "\n".join(head) + "\n\n" + body
        result = _document(f, text, title=subject or None)
    for part in msg.iter_attachments():
        name = part.get_filename() or f"part-{len(result.documents) + len(result.skipped) + 1}"
        where = f"{f.relpath}/{name}"
        if part.get_content_type() == "message/rfc822":
            ext, data = ".eml", part.get_content().as_bytes() if depth + 1 < MAIL_DEPTH else b""
        else:
            ext, data = Path(name).suffix.lower(), part.get_payload(decode=True) or b""
        if ext not in FORMATS or not data.strip():
            why = "nested too deep" if ext == ".eml" else f"unsupported extension {ext or '(none)'}" \
                if ext not in FORMATS else "empty"
            result.skipped.append(SkippedFile(path=where, reason=f"attachment not read: {why}"))
            continue
        if len(data) > f.max_file_mb * MB:
            result.skipped.append(SkippedFile(path=where, reason=(
                f"attachment of {len(data) / MB:.1f} MB is over ingest.max_file_mb={f.max_file_mb:g}")))
            continue
        inner = _File(relpath=where, ext=ext, data=data, sha256=hashlib.sha256(data).hexdigest(),
                      max_file_mb=f.max_file_mb, ocr=f.ocr, ocr_min_confidence=f.ocr_min_confidence)
        try:
            got = read_eml(inner, depth + 1) if ext == ".eml" else READERS[FORMATS[ext]](inner)
        except Unreadable as exc:
            result.skipped.append(SkippedFile(path=where, reason=f"attachment not read: {exc}"))
            continue
        result = result.merge(got)
    if not result.documents and not result.pairs:
        raise Unreadable("; ".join(s.reason for s in result.skipped) or "an e-mail without text or readable "
                         "attachments")
    return result


# ---- instruction data: Alpaca, ShareGPT, OpenAI messages


def _content(value) -> str:
    if isinstance(value, list):  # OpenAI content parts
        return "\n".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    return value if isinstance(value, str) else ""


def record_pairs(record) -> list[tuple[str, str, str | None]] | None:
    """(question, answer, system) per user→assistant turn; None when the shape is unknown."""
    if not isinstance(record, dict):
        return None
    if "instruction" in record and "output" in record:
        q = _content(record.get("instruction")).strip()
        extra = _content(record.get("input")).strip()
        q = f"{q}\n\n{extra}" if extra else q
        a = _content(record.get("output")).strip()
        return [(q, a, _content(record.get("system")).strip() or None)] if q and a else []
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        return None
    system = _content(record.get("system")).strip() or None  # LLaMA-Factory keeps it beside the turns
    pairs, question = [], None
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = _content(turn.get("value", turn.get("content"))).strip()
        if role == "system":
            system = text or system
        elif role == "user":
            question = f"{question}\n\n{text}" if question else text  # consecutive user turns read as one
        elif role == "assistant":
            if question and text:
                pairs.append((question, text, system))
            question = None
    return pairs


def _whole_json(text: str) -> list[tuple[str, object]]:
    obj = json.loads(text)
    items = obj if isinstance(obj, list) else [obj]
    return [(f"record {i}", r) for i, r in enumerate(items, start=1)]


def _is_jsonl(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        return len(lines) > 1 and isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _json_records(f: _File, text: str) -> tuple[list[tuple[str, object]], list[SkippedFile]]:
    """(location, record) pairs, plus a note when some JSONL lines do not parse."""
    if f.ext == ".json":
        try:
            return _whole_json(text), []
        except json.JSONDecodeError as exc:
            if not _is_jsonl(text):  # many JSONL files are named .json: those are read line by line
                raise Unreadable(f"invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                                 "fix it, or save one record per line as .jsonl")
    records, bad = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append((n, exc.msg))
    if not records and f.ext == ".jsonl":
        try:
            return _whole_json(text), []  # a JSON array saved as .jsonl
        except json.JSONDecodeError:
            pass
    notes = []
    if bad:
        total = len(records) + len(bad)
        notes.append(SkippedFile(path=f.relpath, reason=(
            f"{len(bad)} of {total} lines unreadable (first at line {bad[0][0]}: {bad[0][1]}); "
            "the other lines were kept")))
    if not records:
        raise Unreadable(notes[0].reason if notes else "no records")
    return records, notes


def read_instructions(f: _File) -> IngestResult:
    text = decode_text(f.data)
    _check_not_junk(text)
    records, notes = _json_records(f, text)
    pairs, unknown, empty = [], [], []
    for where, record in records:
        got = record_pairs(record)
        if got is None:
            keys = sorted(record)[:6] if isinstance(record, dict) else type(record).__name__
            unknown.append(f"{where}: {keys}")
        elif not got:
            empty.append(where)
        for q, a, system in got or []:
            pairs.append(QAPair(question=q, answer=a, source="instruction", doc_id=f.doc_id, path=f.relpath,
                                system=system, language=detect_language(q + "\n" + a)))
    if unknown and not pairs:
        raise Unreadable(f"unknown JSON shape (first at {unknown[0]}); accepted shapes: {ACCEPTED_JSON}")
    if unknown:
        notes.append(SkippedFile(path=f.relpath, reason=(
            f"{len(unknown)} of {len(records)} records have an unknown shape (first at {unknown[0]}); "
            f"accepted shapes: {ACCEPTED_JSON}")))
    if empty:
        notes.append(SkippedFile(path=f.relpath, reason=(
            f"{len(empty)} of {len(records)} records hold no complete question and answer "
            f"(first at {empty[0]}); each needs a non-empty user turn followed by an assistant turn")))
    if not pairs:
        raise Unreadable("; ".join(n.reason for n in notes) or "no question/answer pairs")
    return IngestResult(pairs=pairs, skipped=notes)


READERS = {
    "pdf": read_pdf, "docx": read_docx, "html": read_html, "md": read_text, "txt": read_text,
    "csv": read_csv, "xlsx": read_xlsx, "json": read_instructions, "jsonl": read_instructions,
    "pptx": read_pptx, "xls": read_xls, "doc": read_doc, "epub": read_epub, "odt": read_odt, "eml": read_eml,
    "image": read_image,
}


# ---------------------------------------------------------------- one file


def ingest_file(folder: Path, ref: FileRef, settings: IngestSettings, read=None) -> IngestResult:
    """Read one file (with `read`: e.g. a tasks.reader_process reader, under time and memory limits; by
    default in this process). Never raises for a bad file: it comes back in `skipped` with the reason."""
    try:
        result = (read or read_file)(Path(folder), ref, settings)
    except Unreadable as exc:
        result = IngestResult(skipped=[SkippedFile(path=ref.relpath, reason=str(exc))])
    except Exception as exc:  # a parser bug on one odd file must not stop the other thousand
        kind = getattr(exc, "type_name", type(exc).__name__)  # a reader process's error keeps its type's name
        result = IngestResult(skipped=[SkippedFile(path=ref.relpath, reason=(
            f"unexpected {kind} while reading: {str(exc)[:300]}; please report it with the file"))])
    log = _logger()
    for s in result.skipped:
        log.warning("ingest: skipped %s: %s", s.path, s.reason)
    if result.documents or result.pairs:  # debug: a folder of 10,000 files would send 10,000 lines to the UI
        log.debug("ingest: %s → %d documents, %d pairs", ref.relpath, len(result.documents), len(result.pairs))
    return result


def read_file(folder: Path, ref: FileRef, settings: IngestSettings) -> IngestResult:
    """One file's records; raises Unreadable with the reason (ingest_file turns it into `skipped`)."""
    ext = Path(ref.relpath).suffix.lower()
    if ext not in FORMATS:
        hint = f" ({CONVERT_HINTS[ext]})" if ext in CONVERT_HINTS else ""
        raise Unreadable(f"unsupported extension {ext or '(none)'}{hint}; supported: {', '.join(FORMATS)}")
    path = fs_path(folder, ref)
    if path.is_symlink() and (target := _outside(path, folder.resolve())):  # made a link since discovery
        raise Unreadable(f"a symbolic link to {shown_name(str(target))}, outside the folder: not read; copy the "
                         "file into the folder to include it")
    try:
        size = path.stat().st_size  # checked before reading: a 5 GB file is refused in microseconds
        if size > settings.max_file_mb * MB:
            raise Unreadable(f"{size / MB:.1f} MB is over ingest.max_file_mb={settings.max_file_mb:g}; "
                             "raise ingest.max_file_mb to include it")
        data = path.read_bytes()
    except OSError as exc:
        raise Unreadable(f"cannot read the file ({exc.strerror or exc}); check that it exists and is readable")
    if not data.strip():
        raise Unreadable("empty (no content, or only whitespace)")
    sha = hashlib.sha256(data).hexdigest()
    if sha != ref.sha256:
        # The result is cached under ref.sha256; caching other content under it would go stale.
        raise Unreadable(f"{CHANGED_SINCE_DISCOVERY} (sha256 differs); run ingest again")
    return READERS[FORMATS[ext]](_File(relpath=ref.relpath, ext=ext, data=data, sha256=sha,
                                       max_file_mb=settings.max_file_mb, ocr=settings.ocr,
                                       ocr_min_confidence=settings.ocr_min_confidence))


def ingest_folder(folder: Path, settings: IngestSettings) -> IngestResult:
    """discover + ingest_file for every file, outside Prefect (the CLI and quick checks use it)."""
    from tasks.reader_process import file_reader

    refs, skipped = discover_all(folder, settings)
    result = IngestResult(skipped=skipped)
    with file_reader(settings) as read:
        ones = [ingest_file(folder, ref, settings, read) for ref in refs]
    for one in ones:
        result.documents += one.documents
        result.pairs += one.pairs
        result.skipped += one.skipped
    return result


# ---------------------------------------------------------------- Prefect


@task(task_run_name="discover {folder}")
def discover_task(folder: str, settings: IngestSettings) -> list[FileRef]:
    # Not cached: finding changed files is the point, and hashing is what tells them apart.
    return discover(Path(folder), settings)


@task(cache_policy=CACHE, persist_result=True, task_run_name="ingest {ref.relpath}")
def ingest_file_task(folder: str, ref: FileRef, settings: IngestSettings) -> IngestResult:
    # ref.sha256 is in the cache key, so an edited file misses the cache and an unchanged one is free.
    return ingest_file(Path(folder), ref, settings)
