"""OCR engines on scans of known text: which one reads our English and Chinese pages, how well and how fast.

Pages (tests/scans.py): an English price list (paragraphs and a price table), an English policy page, two
Chinese pages, drawn at 200 dpi with the committed Noto Sans CJK SC subset, turned by up to 0.8 degrees,
blurred and speckled; each page in `--seeds` variants. Engines:

  rapidocr (ours)      tasks/ocr.py: RapidOCR (pip, models in the wheel), our size cap (2400 pixels: an A4
                       page at 200 dpi is not shrunk), no line orientation classifier, our reading order
  rapidocr, cap 2000   the same with RapidOCR's own cap on the longer side (an A4 page shrinks to 171 dpi)
  rapidocr, line classifier on   the same with RapidOCR's classifier turning lines it takes for upside down
  rapidocr as shipped  RapidOCR's defaults, its boxes in its own order, one per line
  tesseract +          Debian's tesseract-ocr (apt only, so never CI's) with chi_sim+eng on every page: an
                       engine that is not told the language
  tesseract by lang    the same with eng or chi_sim, the right one for each page (the best Tesseract can do)

Printed per engine and language: character accuracy (1 - character error rate; NFKC, whitespace compared
as in tests/scans.py: between Latin words only), its lowest page, and pages per second (decode + OCR).
Then tasks.ocr.ocr_pdf on the same pages scanned at 300 dpi into an image-only PDF, rendered at several
resolutions (what PDF_DPI must be), and the page confidence against accuracy on worse scans and on
scans of no text (what ingest.ocr_min_confidence must be).

Run:  .venv/bin/python bench/ocr.py [--seeds 3] [--skip-tesseract]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tasks.ocr and tests.scans

from tests.scans import (  # noqa: E402
    PAGES, char_accuracy, is_cjk, noise_image, png_bytes, render_page, scanned, scanned_pdf,
)

BENCH_PAGES = ["price_list", "travel_policy", "handbook_zh", "safety_zh"]


def scans(seeds: int, dpi: int = 200) -> list[tuple[str, str, object]]:
    """(language, expected text, scanned image) for every bench page and seed."""
    out = []
    for name in BENCH_PAGES:
        clean, want = render_page(PAGES[name], dpi=dpi)
        for seed in range(seeds):
            out.append(("zh" if is_cjk(want) else "en", want, scanned(clean, seed=seed)))
    return out


def rapidocr(max_side: int | None = None, use_cls: bool = False, our_order: bool = True):
    """A reading of PNG bytes by RapidOCR: tasks.ocr itself with no arguments, else a variant of it with
    RapidOCR's own size cap, its line orientation classifier, or its own box order (lines joined by \\n)."""
    import io

    import tasks.ocr as ocr
    from PIL import Image

    if max_side is None and not use_cls and our_order:
        ocr.engine()
        return lambda data: ocr.ocr_image(data).text
    from rapidocr_onnxruntime import RapidOCR

    side = max_side or ocr.MAX_SIDE
    eng = RapidOCR(max_side_len=side)

    def read(data: bytes) -> str:
        img = Image.open(io.BytesIO(data))
        img.thumbnail((side, side), Image.LANCZOS)
        result, _ = eng(img, use_cls=use_cls)
        boxes = [(b, t, float(s)) for b, t, s in result or []]
        return ocr.page_from_boxes(boxes).text if our_order else "\n".join(t for _, t, _ in boxes)
    return read


def tesseract(lang: str | None):
    """Debian's tesseract CLI on a PNG file; `lang` None: eng or chi_sim by the page's language."""
    def read(data: bytes, page_lang: str) -> str:
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            f.write(data)
            f.flush()
            use = lang or ("chi_sim" if page_lang == "zh" else "eng")
            return subprocess.run(["tesseract", f.name, "-", "-l", use, "--dpi", "200"], capture_output=True,
                                  text=True, check=True).stdout
    return read


def engine_table(pages, engines: dict) -> list[str]:
    """Every engine on every page, the engines taking turns page by page: on a machine shared with other
    jobs a change of load then falls on all of them alike."""
    accs = {(name, lang): [] for name in engines for lang in ("en", "zh")}
    took = dict.fromkeys(accs, 0.0)
    for page_lang, want, img in pages:
        data = png_bytes(img)
        for name, read in engines.items():
            start = time.perf_counter()
            got = read(data, page_lang)
            took[name, page_lang] += time.perf_counter() - start
            accs[name, page_lang].append(char_accuracy(want, got))
    rows = ["| engine | language | pages | character accuracy (mean) | lowest page | pages/s |",
            "|---|---|---|---|---|---|"]
    for (name, lang), got in accs.items():
        rows.append(f"| {name} | {lang} | {len(got)} | {statistics.fmean(got):.4f} | {min(got):.4f} | "
                    f"{len(got) / took[name, lang]:.2f} |")
    print("\n".join(rows), flush=True)
    return rows


def dpi_table(dpis: list[int]) -> list[str]:
    """tasks.ocr.ocr_pdf on an image-only PDF of the bench pages scanned at 300 dpi, at each render resolution."""
    import tasks.ocr as ocr

    items = []
    for name in BENCH_PAGES:
        clean, want = render_page(PAGES[name], dpi=300)
        items.append(("zh" if is_cjk(want) else "en", want, scanned(clean, seed=0)))
    pdf = scanned_pdf([img for _, _, img in items])
    rows = ["| render dpi | en accuracy | zh accuracy | pages/s |", "|---|---|---|---|"]
    saved = ocr.PDF_DPI, ocr.MAX_SIDE
    try:
        for dpi in dpis:
            ocr.PDF_DPI, ocr.MAX_SIDE = dpi, max(saved[1], round(11.69 * dpi) + 1)  # the page is never shrunk
            start = time.perf_counter()
            got = ocr.ocr_pdf(pdf, list(range(len(items))))
            took = time.perf_counter() - start
            acc = {lang: statistics.fmean(char_accuracy(w, p.text) for (lg, w, _), p in zip(items, got) if lg == lang)
                   for lang in ("en", "zh")}
            rows.append(f"| {dpi} | {acc['en']:.4f} | {acc['zh']:.4f} | {len(items) / took:.2f} |")
            print(rows[-1], flush=True)
    finally:
        ocr.PDF_DPI, ocr.MAX_SIDE = saved
    return rows


def confidence_table() -> list[str]:
    """Page confidence next to accuracy: worse and worse scans, and scans of no text at all."""
    import io

    import tasks.ocr as ocr
    from PIL import Image

    rows = ["| scan | language | confidence | character accuracy | characters read |", "|---|---|---|---|---|"]

    def add(label, lang, want, img):
        page = ocr.ocr_image(png_bytes(img))
        acc = f"{char_accuracy(want, page.text):.4f}" if want else "–"
        rows.append(f"| {label} | {lang} | {page.confidence:.3f} | {acc} | {len(''.join(page.text.split()))} |")
        print(rows[-1], flush=True)

    for name in ("price_list", "handbook_zh"):
        lang = "zh" if name.endswith("_zh") else "en"
        clean, want = render_page(PAGES[name])
        for noise in (10, 30, 60):
            add(f"{name}, noise {noise}", lang, want, scanned(clean, seed=1, noise=noise))
        buf = io.BytesIO()
        scanned(clean, seed=1).convert("RGB").save(buf, "JPEG", quality=15)
        add(f"{name}, JPEG quality 15", lang, want, Image.open(io.BytesIO(buf.getvalue())))
        small, want_small = render_page(PAGES[name], dpi=100)
        add(f"{name}, 100 dpi", lang, want_small, scanned(small, seed=1))
        tiny, want_tiny = render_page(PAGES[name], dpi=75)
        add(f"{name}, 75 dpi", lang, want_tiny, scanned(tiny, seed=1))
        add(f"{name}, upside down", lang, want, scanned(clean, seed=1).rotate(180))
    smudged, want_smudged = render_page(PAGES["travel_policy"], dpi=35)
    add("travel_policy, 35 dpi, noise 20 (tests' smudged scan)", "en", want_smudged,
        scanned(smudged, seed=0, noise=20, angle=0.0))
    for seed in range(6):
        add(f"noise image, seed {seed}", "–", "", noise_image(seed))
    add("blank page", "–", "", scanned(Image.new("L", (1654, 2339), 255), seed=0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="scanned variants of each page")
    parser.add_argument("--skip-tesseract", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    pages = scans(args.seeds)
    variants = {"rapidocr (ours)": rapidocr(), "rapidocr, cap 2000": rapidocr(max_side=2000),
                "rapidocr, line classifier on": rapidocr(use_cls=True),
                "rapidocr as shipped": rapidocr(max_side=2000, use_cls=True, our_order=False)}
    engines = {name: (lambda read: lambda data, _lang: read(data))(read) for name, read in variants.items()}
    if not args.skip_tesseract and shutil.which("tesseract"):
        engines["tesseract chi_sim+eng"] = tesseract("chi_sim+eng")
        engines["tesseract by lang"] = tesseract(None)
    elif not args.skip_tesseract:
        print("no tesseract on PATH (apt-get install tesseract-ocr tesseract-ocr-chi-sim): rapidocr only")
    tables = [engine_table(pages, engines), dpi_table([100, 150, 200, 300]), confidence_table()]
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("\n\n".join("\n".join(t) for t in tables))


if __name__ == "__main__":
    main()
