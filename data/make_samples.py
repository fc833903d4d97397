"""Regenerate the generated sample documents in data/docs/ from readable sources.

    .venv/bin/python data/make_samples.py

Sources: data/src/*.md (English PDF and DOCX), data/src/zh/ (Chinese DOCX and the GBK text),
and the two FAQ exports defined below. The Markdown, HTML, TXT and instruction files in data/docs/
are hand-written and not touched here.

Every output is byte-for-byte repeatable (fixed timestamps and document ids), because the pipeline
caches on content hashes: regenerating unchanged samples must not invalidate a finished run.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

import docx
import pymupdf
from openpyxl import Workbook
from openpyxl.styles import Alignment, Font

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
DOCS = HERE / "docs"

FIXED_ZIP_TIME = (2025, 6, 2, 9, 0, 0)
FIXED_ISO = "2025-06-02T09:00:00Z"
FIXED_PDF_DATE = "D:20250602090000Z"
MAX_BYTES = 200_000  # samples live in git; keep each one small

# Support-system FAQ exports: one row per question, exactly the two columns the exporter writes.
FAQ_EN = [
    ("How do I reset the controller of my Kestrel K4?",
     "Hold the power button and the return-home button together for 8 seconds until the LED blinks blue."),
    ("How long is the warranty on a Tessarine drone?",
     "Every Tessarine drone comes with a 24-month warranty from the date of delivery."),
    ("Can the Heron H2 fly in the rain?",
     "Yes. The Heron H2 is rated IP54 and can fly in light rain."),
    ("How long does delivery take within Europe?",
     "Standard shipping within Europe takes 3 to 5 working days."),
    ("Is there a discount for students?",
     "Students and universities get 15 percent off the Wren W1 with a valid academic email address."),
    ("What is the control range of the Kestrel K4?",
     "The Kestrel K4 has a control range of 11 kilometres."),
    ("How do I update the firmware of my drone?",
     "Open the SkyLedger app and go to Settings > Fleet > Firmware."),
    ("Which payment methods do you accept?",
     "Tessarine accepts bank transfer, Visa and Mastercard; business customers can also pay by invoice."),
    ("Can I return a drone I do not want?",
     "Unused drones can be returned within 30 days of delivery for a full refund."),
    ("How long is the SkyLedger free trial?",
     "The SkyLedger free trial lasts 21 days and needs no credit card."),
    ("In what temperatures can the Kestrel K4 fly?",
     "The Kestrel K4 operates between -20 °C and 45 °C."),
]

FAQ_ZH = [
    ("红隼K4无人机的保修期是多久？", "红隼K4无人机自交货之日起保修24个月。"),
    ("特萨林深圳办事处在哪里？", "特萨林深圳办事处位于南山区科苑路88号云帆大厦12楼。"),
    ("中文客服热线是多少？", "中文客服热线是400-820-7316，工作日9:00至18:00有人接听。"),
    ("如何申请发票？", "在HangarDesk支持门户提交订单号即可申请增值税发票，3个工作日内开具。"),
    ("鹭H2可以在雨中飞行吗？", "可以。鹭H2的防护等级为IP54，可在小雨中飞行。"),
    ("FjordCell电池可以托运吗？", "FjordCell电池不能托运，只能随身携带，每位旅客最多携带两块。"),
    ("学生购买有优惠吗？", "高校师生凭学校邮箱购买鹪鹩W1可享受八五折优惠。"),
    ("国内订单多久能送到？", "国内订单从深圳仓库发货，一般2到4个工作日送达。"),
    ("固件怎么升级？", "在SkyLedger应用中依次进入“设置 > 机队 > 固件”即可升级。"),
    ("不满意可以退货吗？", "未使用的无人机在签收后30天内可申请全额退款。"),
]


def parse_markdown(text: str) -> list[tuple[int, str]]:
    """The small Markdown subset the sources use: (level, text), level 0 for a paragraph."""
    blocks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", line)
        blocks.append((len(heading.group(1)), heading.group(2)) if heading else (0, line))
    return blocks


def normalise_zip(data: bytes, path: Path) -> None:
    """Rewrite an OOXML zip with fixed entry times and fixed core-property dates (both default to now)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            blob = src.read(name)
            if name == "docProps/core.xml":
                blob = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*", rb"\g<1>" + FIXED_ISO.encode(), blob)
            dst.writestr(zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME), blob, zipfile.ZIP_DEFLATED)
    path.write_bytes(out.getvalue())


def wrap(text: str, font: str, size: float, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and pymupdf.get_text_length(candidate, fontname=font, fontsize=size) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line]


def make_pdf(source: Path, target: Path) -> None:
    # Base-14 Helvetica placed line by line, not insert_htmlbox: the HTML engine embeds a font (bigger
    # file) and writes ligature glyphs, so "flight" would come back from extraction as "\ufb02ight".
    styles = {0: ("helv", 11, 6), 1: ("hebo", 18, 10), 2: ("hebo", 14, 4)}  # level: font, size, space before
    margin, width, height = 56, 595 - 2 * 56, 842  # A4 in points
    blocks = parse_markdown(source.read_text(encoding="utf-8"))
    doc = pymupdf.open()
    page, y = doc.new_page(width=595, height=height), margin
    for level, text in blocks:
        font, size, space = styles[min(level, 2)]
        y += space
        for line in wrap(text, font, size, width):
            if y + size > height - margin:
                page, y = doc.new_page(width=595, height=height), margin
            y += size * 1.3
            page.insert_text((margin, y), line, fontname=font, fontsize=size)
    doc.set_metadata({"title": blocks[0][1], "author": "Tessarine Aerial Robotics", "producer": "make_samples.py",
                      "creator": "make_samples.py", "creationDate": FIXED_PDF_DATE, "modDate": FIXED_PDF_DATE})
    target.write_bytes(doc.tobytes(garbage=3, deflate=True, no_new_id=True))


def make_docx(source: Path, target: Path, author: str) -> None:
    document = docx.Document()
    for level, text in parse_markdown(source.read_text(encoding="utf-8")):
        if level:
            document.add_heading(text, level=level)
        else:
            document.add_paragraph(text)
    document.core_properties.author = author
    document.core_properties.title = parse_markdown(source.read_text(encoding="utf-8"))[0][1]
    buffer = io.BytesIO()
    document.save(buffer)
    normalise_zip(buffer.getvalue(), target)


def make_faq_xlsx(rows: list[tuple[str, str]], target: Path) -> None:
    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "FAQ export"
    sheet.append(["Question", "Answer"])
    for row in rows:
        sheet.append(list(row))
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.column_dimensions["A"].width = 50
    sheet.column_dimensions["B"].width = 90
    for row in sheet.iter_rows(min_row=2):
        for cell in row:
            cell.alignment = Alignment(wrap_text=True, vertical="top")
    buffer = io.BytesIO()
    workbook.save(buffer)
    normalise_zip(buffer.getvalue(), target)


def make_faq_csv(rows: list[tuple[str, str]], target: Path) -> None:
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["问题", "答案"])
        writer.writerows(rows)


def make_gbk_text(source: Path, target: Path) -> None:
    # Saved as GBK on purpose: ingestion must detect the encoding instead of assuming UTF-8.
    target.write_bytes(source.read_text(encoding="utf-8").encode("gbk"))


def main() -> None:
    outputs = {
        DOCS / "products" / "price_sheet_2025.pdf": lambda t: make_pdf(SRC / "price_sheet_2025.md", t),
        DOCS / "policies" / "travel_policy.docx": lambda t: make_docx(
            SRC / "travel_policy.md", t, "Tessarine People & Culture"),
        DOCS / "zh" / "员工手册_节选.docx": lambda t: make_docx(SRC / "zh" / "员工手册_节选.md", t, "特萨林深圳办事处"),
        DOCS / "zh" / "售后政策_gbk.txt": lambda t: make_gbk_text(SRC / "zh" / "售后政策.txt", t),
        DOCS / "faq" / "support_faq_export.xlsx": lambda t: make_faq_xlsx(FAQ_EN, t),
        DOCS / "faq" / "常见问题_导出.csv": lambda t: make_faq_csv(FAQ_ZH, t),
    }
    for target, build in outputs.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        build(target)
        size = target.stat().st_size
        if size > MAX_BYTES:
            raise ValueError(f"{target}: {size} bytes is over the {MAX_BYTES}-byte limit for committed samples")
        print(f"{target.relative_to(HERE)}  {size} bytes")


if __name__ == "__main__":
    main()
