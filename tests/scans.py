"""Scanned pages made from known text, for tests/test_ocr.py and bench/ocr.py: the text is drawn with
Pillow at a scanner's resolution, turned a little, blurred and speckled, so an OCR engine's output can be
scored against the text that was drawn.

The font is the subset of Noto Sans CJK SC in tests/fixtures/fonts (Chinese and Latin glyphs: CI cannot
install fonts); `python -m tests.scans` makes it again from the full font when the texts here change.
"""

from __future__ import annotations

import io
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT = Path(__file__).parent / "fixtures" / "fonts" / "NotoSansSC-subset.otf"
FULL_FONT = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"  # Debian's fonts-noto-cjk
FULL_FONT_INDEX = 2  # Noto Sans CJK SC in that collection
A4_INCHES = (8.27, 11.69)


@dataclass
class Table:
    rows: list[list[str]]  # the first is the header


# A page is a title and blocks: a paragraph (str, wrapped to the page) or a Table.
PRICE_LIST = ("Kestrel Industrial Supply - Price List 2026", [
    "This list replaces all earlier price lists from 1 March 2026. Prices are in euros, excluding VAT, and are "
    "valid for orders placed before 31 December 2026. Orders above 2,000 EUR ship free within the EU; smaller "
    "orders pay a flat fee of 45 EUR.",
    Table([["Item", "Code", "Price (EUR)"],
           ["Kestrel K4 compressor", "K4-220", "8,950"],
           ["Kestrel K2 compressor", "K2-110", "4,380"],
           ["Air dryer AD-60", "AD-60", "1,275"],
           ["Pressure hose, 20 m", "PH-20", "96.50"],
           ["Service kit for K4", "SK-K4", "310"]]),
    "Warranty: compressors carry a three-year warranty on parts and labour. Service visits are booked through "
    "the support desk at +49 30 5550 1234 and take place within five working days.",
])
TRAVEL_POLICY = ("Travel and Expenses Policy", [
    "Employees book economy class for flights under six hours and may book premium economy for longer flights. "
    "Hotel costs are reimbursed up to 180 EUR per night in capital cities and 120 EUR elsewhere.",
    "Claims are submitted in the expense system within 30 days of the trip, with every receipt attached. Meals "
    "are covered by a daily allowance of 42 EUR; alcohol is never reimbursed.",
    "Questions about this policy go to the finance team at finance@kestrel.example or extension 4417.",
])
HANDBOOK_ZH = ("员工手册（2026年版）", [
    "第一条 年假：员工每年享有十五天带薪年假，入职满五年后增加至二十天。年假须提前两周在人事系统中申请，"
    "经直属主管批准后生效。",
    "第二条 报销：差旅费用须在出差结束后三十天内提交报销，并附上发票原件。单笔超过三千二百元的支出需要"
    "部门经理签字。",
    "第三条 办公时间：总部位于上海市浦东新区，工作时间为周一至周五上午九点至下午六点，午休一小时。",
])
SAFETY_ZH = ("安全与设备管理规定", [
    "所有员工进入车间前必须佩戴安全帽和防护眼镜。设备每季度检修一次，检修记录保存三年。发现故障时，应立即"
    "停止使用并通知设备科，联系电话为 021-6888 2400。",
    "仓库物资领用实行登记制度，每月五日前盘点库存。贵重工具由专人保管，借用期限不超过七天，逾期未还将通知"
    "所在部门。",
    "公司鼓励员工提出改进建议，经采纳的建议每条奖励五百元，年度最佳建议另奖一万元。",
])
NOTICE = ("Opening hours", [
    "The Lyon warehouse is open Monday to Friday from 08:00 to 18:00 and closes at 16:30 on Fridays in August.",
])
PAGES = {"price_list": PRICE_LIST, "travel_policy": TRAVEL_POLICY, "handbook_zh": HANDBOOK_ZH,
         "safety_zh": SAFETY_ZH, "notice": NOTICE}

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")


def is_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def _font(pt: float, dpi: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), round(pt * dpi / 72))


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Lines that fit `width`: at spaces for Latin, at any character for Chinese (as typesetters do)."""
    units = list(text) if is_cjk(text) else text.split(" ")
    sep = "" if is_cjk(text) else " "
    lines, line = [], ""
    for unit in units:
        candidate = line + sep + unit if line else unit
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = unit
        else:
            line = candidate
    return lines + [line] if line else lines


def render_page(page: tuple[str, list], dpi: int = 200, pt: float = 11, size_in: tuple[float, float] = A4_INCHES,
                ) -> tuple[Image.Image, str]:
    """A clean page image (greyscale) and the text drawn on it, one line per drawn line (table cells joined
    with a space), as a perfect OCR would read it."""
    title, blocks = page
    width, height = round(size_in[0] * dpi), round(size_in[1] * dpi)
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    margin = dpi * 0.9
    body, head = _font(pt, dpi), _font(pt * 1.5, dpi)
    y, step, lines = margin, pt * dpi / 72 * 1.6, []
    draw.text((margin, y), title, font=head, fill=20)
    lines.append(title)
    y += step * 2
    for block in blocks:
        if isinstance(block, Table):
            columns = [margin, margin + (width - 2 * margin) * 0.45, margin + (width - 2 * margin) * 0.7]
            for row in block.rows:
                for x, cell in zip(columns, row):
                    draw.text((x, y), cell, font=body, fill=20)
                lines.append(" ".join(row))
                y += step
        else:
            for line in _wrap(block, body, width - 2 * margin):
                draw.text((margin, y), line, font=body, fill=20)
                lines.append(line)
                y += step
        y += step * 0.8
    return img, "\n".join(lines)


def scanned(img: Image.Image, seed: int = 0, angle: float = 0.8, noise: float = 10.0) -> Image.Image:
    """`img` as a flatbed scanner gives it back: turned by up to `angle` degrees, slightly blurred, grey
    paper with sensor noise (`noise`: standard deviation in grey levels) and dust specks."""
    rnd = random.Random(seed)
    img = img.rotate(rnd.uniform(-angle, angle), resample=Image.BICUBIC, fillcolor=255)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    rng = np.random.default_rng(seed)
    arr = np.asarray(img, dtype=np.float32) * (242 / 255) + rng.normal(0, noise, (img.height, img.width))
    specks = rng.random(arr.shape) < 0.0002
    arr[specks] = rng.uniform(0, 120, int(specks.sum()))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def noise_image(seed: int = 0, size: tuple[int, int] = (1200, 900)) -> Image.Image:
    """A scan of no text: grey paper, noise, specks and a few smudges, what an OCR engine must not turn
    into words with confidence."""
    rng = np.random.default_rng(seed)
    arr = 235 + rng.normal(0, 25, (size[1], size[0]))
    for _ in range(12):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(3, 30)
        arr[max(0, y - r):y + r, max(0, x - r):x + r] -= rng.uniform(40, 160)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def scanned_pdf(pages: list[Image.Image | tuple[Image.Image, str]]) -> bytes:
    """A PDF of A4 pages, each an image filling the page (a scan, no text layer) or an (image, text) pair: a
    scan with an invisible text layer of its own, as a PDF already OCR'd elsewhere has (the text layer, not
    the image, is what a reader must give back)."""
    import pymupdf

    doc = pymupdf.open()
    for page in pages:
        img, text = page if isinstance(page, tuple) else (page, "")
        new = doc.new_page(width=A4_INCHES[0] * 72, height=A4_INCHES[1] * 72)
        new.insert_image(new.rect, stream=png_bytes(img))
        for i, line in enumerate(text.split("\n") if text else []):
            new.insert_text((72, 90 + 18 * i), line, fontsize=11, render_mode=3)  # 3: invisible
    return doc.tobytes(deflate=True)


def comparable(text: str) -> str:
    """Text as character accuracy compares it: NFKC (full-width punctuation as ASCII), whitespace runs as one
    space between Latin words and none next to a Chinese character (a CJK line has no spaces to get right)."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()
    return re.sub(rf"(?<={_CJK.pattern}) | (?={_CJK.pattern})", "", text)


def char_accuracy(expected: str, got: str) -> float:
    """1 - character error rate: the edit distance from the expected text, per expected character (0 when
    the engine made up as much as there was)."""
    from rapidfuzz.distance import Levenshtein

    want, have = comparable(expected), comparable(got)
    return max(0.0, 1 - Levenshtein.distance(want, have) / max(len(want), 1))


def font_characters() -> str:
    """Every character the texts here draw, plus printable ASCII (tests write Latin text of their own)."""
    chars = {chr(c) for c in range(0x20, 0x7F)}
    for title, blocks in PAGES.values():
        for block in [title, *blocks]:
            chars |= set("".join("".join(r) for r in block.rows) if isinstance(block, Table) else block)
    return "".join(sorted(chars))


def make_font_subset(out: Path = FONT) -> Path:
    """The subset font: Noto Sans CJK SC with only font_characters(), a few hundred KB instead of 19 MB."""
    from fontTools import subset
    from fontTools.ttLib import TTCollection

    font = TTCollection(FULL_FONT).fonts[FULL_FONT_INDEX]
    options = subset.Options()
    options.layout_features = ["*"]
    options.name_IDs = ["*"]
    options.notdef_outline = True
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=font_characters())
    subsetter.subset(font)
    out.parent.mkdir(parents=True, exist_ok=True)
    font.save(out)
    return out


if __name__ == "__main__":
    print(make_font_subset(), len(font_characters()), "characters")
