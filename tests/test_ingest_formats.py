"""Documents as companies keep them: slide decks with speaker notes, Excel 97-2003 sheets, e-books,
OpenDocument text, old Word files and saved e-mails with attachments, each made here by the tools people
make them with (python-pptx, xlwt, a mail library) and read back through discover and ingest."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from pathlib import Path

import docx
import pymupdf
import xlwt
from pptx import Presentation
from pptx.util import Inches

from doctune.settings import IngestSettings
from tests.test_ingest import ingest_one

SETTINGS = IngestSettings()


def make_deck(path: Path) -> Path:
    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Kestrel pricing 2026"
    slide.placeholders[1].text = "The Kestrel K4 costs 8,950 EUR.\nDelivery takes 5 working days."
    slide.notes_slide.notes_text_frame.text = "Mention that the K4 warranty is 3 years."
    slide = deck.slides.add_slide(deck.slide_layouts[5])
    slide.shapes.title.text = "Price table"
    table = slide.shapes.add_table(3, 3, Inches(1), Inches(2), Inches(6), Inches(1.5)).table
    for r, row in enumerate([["Model", "Price", "Range"], ["Kestrel K4", "8,950 EUR", "120 km"],
                             ["Kestrel K5", "11,200 EUR", "160 km"]]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    deck.save(path)
    return path


def test_a_slide_deck_keeps_titles_tables_and_speaker_notes(tmp_path):
    (doc,) = ingest_one(make_deck(tmp_path / "pricing.pptx")).documents
    assert doc.format == "pptx" and doc.title == "Kestrel pricing 2026"
    assert "# Kestrel pricing 2026" in doc.text and "# Price table" in doc.text
    assert "The Kestrel K4 costs 8,950 EUR." in doc.text
    assert "Speaker notes:\nMention that the K4 warranty is 3 years." in doc.text
    assert "| Kestrel K5 | 11,200 EUR | 160 km |" in doc.text  # the table's rows keep their columns
    assert "Slide number" not in doc.text


def test_an_excel_97_workbook_reads_like_xlsx_faq_sheets_become_pairs(tmp_path):
    book = xlwt.Workbook()
    faq = book.add_sheet("FAQ")
    for r, row in enumerate([["Question", "Answer"], ["How long is the K4 warranty?", "Three years."],
                             ["Where is the service centre?", "In Lyon, at 4 rue Garibaldi."]]):
        for c, value in enumerate(row):
            faq.write(r, c, value)
    prices = book.add_sheet("Prices")
    for r, row in enumerate([["Model", "Price EUR", "Launched"], ["Kestrel K4", 8950, "2024"],
                             ["Kestrel K5", 11200, "2026"]]):
        for c, value in enumerate(row):
            prices.write(r, c, value)
    book.save(str(tmp_path / "export.xls"))
    result = ingest_one(tmp_path / "export.xls")
    assert [(p.question, p.answer, p.source) for p in result.pairs] == [
        ("How long is the K4 warranty?", "Three years.", "faq"),
        ("Where is the service centre?", "In Lyon, at 4 rue Garibaldi.", "faq")]
    (doc,) = result.documents
    assert doc.format == "xls" and "| Kestrel K4 | 8950 | 2024 |" in doc.text  # 8950.0 read as the integer it is


def epub_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        z.writestr("META-INF/container.xml", '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:'
                   'tc:opendocument:xmlns:container"><rootfiles><rootfile full-path="OEBPS/content.opf" '
                   'media-type="application/oebps-package+xml"/></rootfiles></container>')
        z.writestr("OEBPS/content.opf", '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" '
                   'version="3.0" unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
                   '<dc:title>Kestrel owner manual</dc:title><dc:identifier id="id">k4</dc:identifier>'
                   '<dc:language>en</dc:language></metadata><manifest>'
                   '<item id="c1" href="c1.xhtml" media-type="application/xhtml+xml"/>'
                   '<item id="c2" href="c2.xhtml" media-type="application/xhtml+xml"/></manifest>'
                   '<spine><itemref idref="c1"/><itemref idref="c2"/></spine></package>')
        for name, body in (("c1", "<h1>Charging</h1><p>The Kestrel K4 battery charges in 4 hours.</p>"),
                           ("c2", "<h1>Care</h1><p>Clean the frame with a dry cloth only.</p>")):
            z.writestr(f"OEBPS/{name}.xhtml", '<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml">'
                       f"<head><title>{name}</title></head><body>{body}</body></html>")
    return buf.getvalue()


def test_an_ebook_is_read_in_spine_order_with_its_title(tmp_path):
    (tmp_path / "manual.epub").write_bytes(epub_bytes())
    (doc,) = ingest_one(tmp_path / "manual.epub").documents
    assert doc.format == "epub" and doc.title == "Kestrel owner manual"
    assert doc.text.index("charges in 4 hours") < doc.text.index("dry cloth only")
    assert "**Identifier:**" not in doc.text


def odt_bytes() -> bytes:
    content = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" '
        'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" office:version="1.3"><office:body><office:text>'
        '<text:h text:outline-level="1">Travel policy</text:h>'
        '<text:p>Economy flights up to<text:s/>800 EUR are approved<text:note><text:note-body><text:p>internal'
        '</text:p></text:note-body></text:note> without a manager.</text:p>'
        '<text:h text:outline-level="2">Hotels</text:h>'
        '<text:list><text:list-item><text:p>Paris: 180 EUR a night.</text:p></text:list-item>'
        '<text:list-item><text:p>Lyon: 120 EUR a night.</text:p></text:list-item></text:list>'
        '<table:table table:name="Per diem"><table:table-row><table:table-cell><text:p>City</text:p></table:table-cell>'
        '<table:table-cell><text:p>Per diem</text:p></table:table-cell></table:table-row><table:table-row>'
        '<table:table-cell><text:p>Paris</text:p></table:table-cell><table:table-cell><text:p>60 EUR</text:p>'
        '</table:table-cell></table:table-row></table:table>'
        '</office:text></office:body></office:document-content>')
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mimetype", "application/vnd.oasis.opendocument.text", compress_type=zipfile.ZIP_STORED)
        z.writestr("content.xml", content)
        z.writestr("META-INF/manifest.xml", '<?xml version="1.0"?><manifest:manifest xmlns:manifest="urn:oasis:'
                   'names:tc:opendocument:xmlns:manifest:1.0"/>')
    return buf.getvalue()


def test_an_opendocument_text_keeps_headings_lists_and_tables(tmp_path):
    (tmp_path / "travel.odt").write_bytes(odt_bytes())
    (doc,) = ingest_one(tmp_path / "travel.odt").documents
    assert doc.format == "odt" and doc.title == "Travel policy"
    assert "# Travel policy" in doc.text and "## Hotels" in doc.text
    assert "Economy flights up to 800 EUR are approved without a manager." in doc.text  # the note left out
    assert "- Paris: 180 EUR a night." in doc.text
    assert "| Paris | 60 EUR |" in doc.text


def test_an_old_word_file_names_what_to_install_when_antiword_is_missing(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "contract.doc").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 2000)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    (skip,) = ingest_one(tmp_path / "contract.doc").skipped
    assert "apt-get install antiword" in skip.reason and "save it as .docx" in skip.reason
    (tmp_path / "fake.doc").write_bytes(b"PK\x03\x04 a zip, not a .doc")
    assert "not a .doc" in ingest_one(tmp_path / "fake.doc").skipped[0].reason


def make_mail(path: Path, tmp_path: Path) -> Path:
    msg = EmailMessage()
    msg["From"] = "Ines Moreau <ines@tessarine.example>"
    msg["To"] = "sales@tessarine.example"
    msg["Date"] = "Tue, 03 Nov 2026 09:12:00 +0100"
    msg["Subject"] = "New service centre in Lyon"
    msg.set_content("Hello all,\n\nFrom 1 December our service centre moves to 4 rue Garibaldi, Lyon.\n"
                    "It opens from 8:00 to 18:00 on weekdays.\n\nInes")
    pdf = pymupdf.open()
    pdf.new_page().insert_text((72, 72), "The Lyon centre repairs a K4 frame within 6 working days.", fontsize=11)
    msg.add_attachment(pdf.tobytes(), maintype="application", subtype="pdf", filename="repairs.pdf")
    d = docx.Document()
    d.add_heading("Opening hours", 1)
    d.add_paragraph("On Saturdays the Lyon centre opens from 9:00 to 12:00.")
    buf = io.BytesIO()
    d.save(buf)
    msg.add_attachment(buf.getvalue(), maintype="application",
                       subtype="vnd.openxmlformats-officedocument.wordprocessingml.document", filename="hours.docx")
    msg.add_attachment(b"MZ\x90\x00 not a document", maintype="application", subtype="octet-stream",
                       filename="setup.exe")
    path.write_bytes(bytes(msg))
    return path


def test_a_mail_is_a_document_and_its_attachments_are_documents_of_their_own(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    result = ingest_one(make_mail(folder / "lyon.eml", tmp_path))
    by_path = {d.path: d for d in result.documents}
    assert list(by_path) == ["lyon.eml", "lyon.eml/repairs.pdf", "lyon.eml/hours.docx"]
    mail = by_path["lyon.eml"]
    assert mail.format == "eml" and mail.title == "New service centre in Lyon"
    assert mail.text.startswith("# New service centre in Lyon\n\nFrom: Ines Moreau <ines@tessarine.example>")
    assert "4 rue Garibaldi, Lyon" in mail.text and "Date: Tue, 03 Nov 2026" in mail.text
    assert "within 6 working days" in by_path["lyon.eml/repairs.pdf"].text
    assert by_path["lyon.eml/hours.docx"].format == "docx" and "9:00 to 12:00" in by_path["lyon.eml/hours.docx"].text
    assert [(s.path, s.reason) for s in result.skipped] == [
        ("lyon.eml/setup.exe", "attachment not read: unsupported extension .exe")]


def test_a_file_that_is_no_mail_says_so(tmp_path):
    (tmp_path / "notes.eml").write_text("just some words, no headers at all\n")
    (skip,) = ingest_one(tmp_path / "notes.eml").skipped
    assert "not an e-mail" in skip.reason


PRICE_ROWS = [["Model", "Price", "Flight time"], ["Kestrel K4", "8,950 EUR", "52 minutes"],
              ["Heron H2", "12,400 EUR", "38 minutes"]]
PRICE_FACTS = {"The price of Kestrel K4 is 8,950 EUR.", "The flight time of Kestrel K4 is 52 minutes.",
               "The price of Heron H2 is 12,400 EUR.", "The flight time of Heron H2 is 38 minutes."}


def ruled_table_pdf(path: Path) -> Path:
    """A PDF page with a paragraph, a table drawn with cell borders, and a closing line."""
    pdf = pymupdf.open()
    page = pdf.new_page()
    page.insert_text((72, 72), "All prices are in euros and exclude VAT.", fontsize=11)
    for r, row in enumerate(PRICE_ROWS):
        for c, value in enumerate(row):
            cell = pymupdf.Rect(72 + 150 * c, 100 + 22 * r, 222 + 150 * c, 122 + 22 * r)
            page.draw_rect(cell, color=(0, 0, 0), width=0.8)
            page.insert_text((cell.x0 + 4, cell.y1 - 7), value, fontsize=10)
    page.insert_text((72, 200), "Orders of five or more drones receive a 7 percent discount.", fontsize=11)
    pdf.save(path)
    return path


def word_table(path: Path) -> Path:
    d = docx.Document()
    d.add_paragraph("All prices are in euros and exclude VAT.")
    table = d.add_table(rows=len(PRICE_ROWS), cols=3)
    for r, row in enumerate(PRICE_ROWS):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.save(path)
    return path


def test_tables_in_pdf_docx_html_and_pptx_reach_the_chunks_as_tables_and_their_rows_as_facts(tmp_path):
    from doctune.settings import ChunkSettings
    from tasks.chunk import chunk_document
    from tasks.synthesize import extract_facts

    html = "<html><body><p>All prices are in euros.</p><table>" + "".join(
        "<tr>" + "".join(f"<{'th' if r == 0 else 'td'}>{v}</{'th' if r == 0 else 'td'}>" for v in row) + "</tr>"
        for r, row in enumerate(PRICE_ROWS)) + "</table></body></html>"
    (tmp_path / "prices.html").write_text(html)
    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[5])
    slide.shapes.title.text = "Prices"
    table = slide.shapes.add_table(3, 3, Inches(1), Inches(2), Inches(6), Inches(1.5)).table
    for r, row in enumerate(PRICE_ROWS):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    deck.save(tmp_path / "prices.pptx")
    for path in (ruled_table_pdf(tmp_path / "prices.pdf"), word_table(tmp_path / "prices.docx"),
                 tmp_path / "prices.html", tmp_path / "prices.pptx"):
        (doc,) = ingest_one(path).documents
        assert "| Model | Price | Flight time |\n| --- | --- | --- |\n| Kestrel K4 | 8,950 EUR | 52 minutes |" in \
            doc.text, (path.name, doc.text)
        facts = {f for c in chunk_document(doc, ChunkSettings()) for f in extract_facts(c)}
        # The slide's title is the table's caption; the other formats have a sentence above it, no caption.
        caption = "Prices: " if path.suffix == ".pptx" else ""
        assert {caption + f[0].lower() + f[1:] if caption else f for f in PRICE_FACTS} <= facts, (path.name, facts)
