"""OCR of scanned pages and images, offline: RapidOCR (PaddleOCR's PP-OCRv4 detection and recognition models
for Chinese and English, shipped inside its wheel) on onnxruntime. No download, no system package.

Chosen by bench/ocr.py (bench/README.md): on our scans it reads Chinese at 0.997 character accuracy where
Debian's Tesseract reads 0.983 (told the language: 0.989), and it needs nothing but pip, which is all CI
installs. Tesseract reads English better (0.998 against 0.992: RapidOCR drops some spaces between words)
and about 3 times faster, but only as a system package.

The engine is built once per process (tasks.ingest.warm_readers does it in the reader process, before
its memory limit: onnxruntime maps its code and thread pools then).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import re
import statistics
from dataclasses import dataclass, field

# PDF pages are rendered at PDF_DPI: English read 0.871 at 100 dpi, 0.968 at 150, 0.993 at 200 and 0.997 at
# 300 (slower: 0.25 against 0.28 pages/s); Chinese 0.997 at all four (bench/ocr.py). MAX_SIDE holds an A4
# page at 200 dpi (1654 x 2339) unshrunk: the engine's own cap of 2000 read English 0.9912 against our
# 0.9922, about 15% faster. Larger images (photos, 600 dpi scans) are shrunk to it, which also bounds the
# memory a page takes (1.4 GB of address space at most, with the 2,048 MB of ingest.file_memory_mb).
PDF_DPI = 200
MAX_SIDE = 2400

_CJK = re.compile(r"[\u2e80-\u2fff\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


@dataclass(frozen=True)
class OcrLine:
    """One line of text as read: the engine's boxes on it joined in reading order."""

    text: str
    confidence: float
    box: tuple[float, float, float, float]  # left, top, right, bottom, in pixels of the image read


@dataclass
class OcrPage:
    text: str  # lines in reading order; a blank line where the gap between lines says a paragraph ends
    confidence: float  # the engine's line scores averaged, weighted by characters; 0.0 when nothing was read
    lines: list[OcrLine] = field(default_factory=list)
    page: int = 0  # 0-based page (PDF) or frame (TIFF) number


class OcrUnavailable(Exception):
    """The engine cannot load in this environment; the message says why and what to install."""


def engine():
    """The RapidOCR engine, built once per process (0.3 s and three ONNX sessions); raises OcrUnavailable,
    every time, when it could not be built."""
    built, error = _build()
    if error:
        raise OcrUnavailable(f"OCR is unavailable here ({error}); `pip install rapidocr_onnxruntime` (OpenCV, "
                             "which it loads, needs the system's libGL.so.1 and libglib-2.0.so.0), or set "
                             "ingest.ocr to false")
    return built


@functools.lru_cache(maxsize=1)
def _build():
    """(engine, None), or (None, the error): a failed import is not retried for every page."""
    try:
        from rapidocr_onnxruntime import RapidOCR

        logging.getLogger("RapidOCR").setLevel(logging.WARNING)  # it logs at DEBUG to its own handler otherwise
        return RapidOCR(max_side_len=MAX_SIDE), None
    except Exception as exc:  # ImportError, a missing shared library (OSError), a damaged model file
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def warm() -> None:
    """Load what OCR uses (pdfium, Pillow, onnxruntime, OpenCV, the models) before the reader process limits
    its memory. The engine is built, not run: a first reading left 78 MB of freed memory in the heap (16 MB
    without it), room the reader's limit would not count, and the first page reads fine under the limit."""
    import importlib

    for library in ("PIL.Image", "pypdfium2"):
        importlib.import_module(library)
    engine()


def ocr_image(data: bytes) -> OcrPage:
    """The text of an image file (PNG, JPEG, TIFF, ...): its first frame."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return _ocr_pil(img)


def ocr_frames(data: bytes) -> list[OcrPage]:
    """The text of every frame of an image file: a fax or a multi-page scan is one TIFF of many pages."""
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as img:
        return [dataclasses.replace(_ocr_pil(frame), page=n) for n, frame in enumerate(ImageSequence.Iterator(img))]


def ocr_pdf(data: bytes, pages_without_text: list[int]) -> list[OcrPage]:
    """The text of the given 0-based pages of a PDF, each rendered at PDF_DPI (at most MAX_SIDE pixels)."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        pages = []
        for n in pages_without_text:
            page = pdf[n]
            try:
                scale = min(PDF_DPI / 72, MAX_SIDE / max(page.get_size()))
                img = page.render(scale=scale, grayscale=True).to_pil()
            finally:
                page.close()
            pages.append(dataclasses.replace(_ocr_pil(img), page=n))
        return pages
    finally:
        pdf.close()


def _ocr_pil(img) -> OcrPage:
    """The page as read upright, or turned half round when that reads better (a sheet fed upside down)."""
    img = _plain(img)
    page = _read(img)
    if page.confidence < UPRIGHT_CONFIDENCE:
        turned = _read(img.rotate(180))
        if _weight(turned) > _weight(page):
            return turned
    return page


# RapidOCR's classifier turns single lines it takes for upside down; on our scans it turned upright ones
# (a line read as "u d d r e sso" at 0.46 and dropped: English 0.962 with it, 0.992 without, bench/ocr.py).
# So pages are read as they come, and read again turned when the first reading is poor: an upside-down page
# reads as nothing or as garbage below 0.5, our scans upright 0.93-0.99.
UPRIGHT_CONFIDENCE = 0.8


def _read(img) -> OcrPage:
    result, _ = engine()(img, use_cls=False)
    return page_from_boxes([(box, text, float(score)) for box, text, score in result or []])


def _weight(page: OcrPage) -> float:
    """Characters read, each counted by its confidence."""
    return page.confidence * sum(len(line.text.replace(" ", "")) for line in page.lines)


def _plain(img):
    """An image the engine reads right: upright (a phone's EXIF rotation applied), on white where it was
    transparent, 8-bit grey or RGB, no larger than MAX_SIDE."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit scans: keep the top 8 bits, not a clipped white
        import numpy as np

        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode == "1" else "RGB")  # "1": a fax's black and white
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
    return img


# ---------------------------------------------------------------- reading order


@dataclass
class _Box:
    text: str
    score: float
    left: float
    right: float
    middle: float  # of the text, top to bottom
    height: float  # of the text: the box's own side, which a skewed scan does not stretch as an upright frame

    @classmethod
    def of(cls, pts: list, text: str, score: float) -> _Box:
        """From the engine's corners (top-left, top-right, bottom-right, bottom-left; a turned rectangle)."""
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = pts
        height = (abs(y3 - y0) + abs(y2 - y1)) / 2
        return cls(text.strip(), score, min(x0, x3), max(x1, x2), (y0 + y1 + y2 + y3) / 4, height)


def page_from_boxes(boxes: list[tuple[list, str, float]]) -> OcrPage:
    """An OcrPage from the engine's (4 corner points, text, score) boxes: boxes on one line joined left to
    right, lines top to bottom, and a blank line where a paragraph ends (chunking splits there)."""
    found = [_Box.of(pts, text, score) for pts, text, score in boxes if text.strip()]
    lines = [_join(row) for row in _rows(found)]
    if not lines:
        return OcrPage(text="", confidence=0.0)
    breaks = _paragraph_ends(lines)
    text = "".join(("\n\n" if n in breaks else "\n") + line.text for n, line in enumerate(lines))
    return OcrPage(text=text.lstrip("\n"), confidence=_weighted([(b.text, b.score) for b in found]), lines=lines)


def _paragraph_ends(lines: list[OcrLine]) -> set[int]:
    """Indexes of the lines that start a paragraph: further below the line above than lines usually are
    (the lower quartile of the distances, so pages of many short paragraphs count too) by 40%. Ours, at
    200 dpi: 48-54 pixels between the lines of a paragraph or a table's rows, 81-98 after a heading or a
    paragraph."""
    middles = [(line.box[1] + line.box[3]) / 2 for line in lines]
    pitches = [below - above for above, below in zip(middles, middles[1:])]
    if not pitches:
        return set()
    usual = sorted(pitches)[len(pitches) // 4]
    return {n for n, pitch in enumerate(pitches, start=1) if pitch > usual * 1.4}


def _rows(boxes: list[_Box]) -> list[list[_Box]]:
    """Boxes grouped into lines: a box joins a line when its middle is within half a box height of the
    line's. Table cells of one row come as separate boxes, offset by a skewed scan (ours: 12 pixels across
    a 2-column table at 0.8 degrees), so nearness, not equal tops, decides."""
    rows: list[list[_Box]] = []
    for box in sorted(boxes, key=lambda b: b.middle):
        for row in reversed(rows[-3:]):  # boxes come top to bottom: only the last few lines can match
            middle = statistics.fmean(b.middle for b in row)
            if abs(box.middle - middle) < min(box.height, statistics.fmean(b.height for b in row)) / 2:
                row.append(box)
                break
        else:
            rows.append([box])
    return rows


def _join(row: list[_Box]) -> OcrLine:
    """One line's boxes left to right: a space between them, none between two Chinese characters."""
    row = sorted(row, key=lambda b: b.left)
    text = row[0].text
    for box in row[1:]:
        glue = "" if _CJK.match(text[-1]) and _CJK.match(box.text[0]) else " "
        text += glue + box.text
    return OcrLine(text=text, confidence=_weighted([(b.text, b.score) for b in row]),
                   box=(row[0].left, min(b.middle - b.height / 2 for b in row), max(b.right for b in row),
                        max(b.middle + b.height / 2 for b in row)))


def _weighted(scored: list[tuple[str, float]]) -> float:
    """Scores averaged by characters (spaces not counted): a long line read well outweighs a stray mark."""
    sizes = [len(text.replace(" ", "")) for text, _ in scored]
    return sum(n * score for n, (_, score) in zip(sizes, scored)) / sum(sizes) if sum(sizes) else 0.0


# ---------------------------------------------------------------- PDF pages


def pdf_pages(data: bytes) -> list[str] | None:
    """What each page of a PDF holds: "text" (a text layer: read as text, never OCR'd), "scan" (no text but
    something drawn: an image, or text turned into outlines) or "blank". pdfium's text page is fast: 22 ms
    for the page of 3,000 scattered labels that takes pdfminer hours, 10 ms for 200 pages of text. None when
    pdfium cannot open the file: the text reader then says what is wrong with it (damaged, password)."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError:
        return None
    try:
        kinds = []
        for n in range(len(pdf)):
            page = pdf[n]
            try:
                textpage = page.get_textpage()
                has_text = bool(textpage.get_text_range().strip())
                textpage.close()
                kinds.append("text" if has_text else "scan" if next(page.get_objects(), None) else "blank")
            finally:
                page.close()
        return kinds
    finally:
        pdf.close()


def pdf_subset(data: bytes, pages: list[int]) -> bytes:
    """A PDF of only the given 0-based pages, for the text reader to read the text pages between scans."""
    import pypdfium2 as pdfium

    src, out = pdfium.PdfDocument(data), pdfium.PdfDocument.new()
    try:
        out.import_pages(src, pages)
        buf = io.BytesIO()
        out.save(buf)
        return buf.getvalue()
    finally:
        out.close()
        src.close()
