"""Write the binary documents of the Lumenholm Ferries corpus (docx, pdf, pptx, eml) from the text held here.

    .venv/bin/python bench/corpora/lumen/make_files.py

The Markdown, HTML, CSV and Chinese files next to them are plain text, written by hand. Every file here is
rewritten with fixed dates (document properties, zip members, PDF metadata, mail headers), so running the
script again gives the same bytes with the same library versions (python-docx, python-pptx, pymupdf).
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from email.message import EmailMessage
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "docs"
FIXED = dt.datetime(2026, 1, 14, 9, 0, 0)

# ---------------------------------------------------------------- policy (.docx)

POLICY_TITLE = "Lumenholm Ferries Fare and Refund Policy"
POLICY = [
    ("Scope", [
        "This fare and refund policy was approved by the Lumenholm board on 12 February 2026.",
        "The fare and refund policy is owned by the head of customer experience, Priya Vandersloot.",
    ]),
    ("Cancellations", [
        "Passengers who cancel more than 48 hours before departure receive a full refund.",
        "Passengers who cancel between 48 and 6 hours before departure receive a refund of 50 percent.",
        "Tickets cancelled less than 6 hours before departure are not refunded.",
        "Changing the departure date of a Lumenholm ticket costs a fee of 9 euros.",
    ]),
    ("Disruption", [
        "When a Lumenholm crossing is cancelled because of weather, passengers may travel free on any of "
        "the next 3 departures.",
        "A delay of more than 90 minutes entitles every passenger on the crossing to a voucher worth 25 percent "
        "of the fare.",
        "Lumenholm processes refund requests within 10 working days.",
    ]),
    ("Children", [
        "Children under 4 years travel free on all Lumenholm routes.",
    ]),
]

# ---------------------------------------------------------------- timetable and fares (.pdf)

PDF_TITLE = "Lumenholm Ferries Winter Timetable and Fares 2026/27"
PDF_INTRO = [
    "This winter timetable is valid from 2 November 2026 to 28 March 2027.",
    "All Lumenholm departures from Aldermouth leave from Pier 3.",
]
TIMETABLE_HEADING = "Departures from Aldermouth (daily)"
TIMETABLE = [
    ["Destination", "First sailing", "Last sailing", "Crossing", "Vessel"],
    ["Brisk Isle", "06:10", "21:40", "35 minutes", "MV Solvig"],
    ["Tollan", "07:25", "19:05", "1 hour 20 minutes", "MV Harrowgate"],
    ["Merrow Island", "08:00", "16:30", "2 hours 5 minutes", "MV Corrin Bay"],
    ["Quillhaven", "09:15", "17:45", "1 hour 50 minutes", "MV Pellow"],
]
FARES_HEADING = "Fares from Aldermouth (euros, single journey)"
FARES = [
    ["Destination", "Adult", "Child", "Car with driver", "Bicycle"],
    ["Brisk Isle", "7.60", "3.80", "31.00", "2.50"],
    ["Tollan", "14.80", "7.40", "58.00", "4.00"],
    ["Merrow Island", "23.60", "11.80", "87.50", "5.50"],
    ["Quillhaven", "19.20", "9.60", "71.00", "4.50"],
]
# Both tables on one column grid. markitdown reads a PDF table from word positions (not from the ruling):
# it pools the column starts of every table on the page, and it takes a row longer than 60 characters that
# spans over 55% of the page width for a paragraph, so the rows (the header too) are kept short.
COLUMN_WIDTHS = [130, 95, 95, 110, 100]
PDF_NOTES = [
    "Fares are the same in both directions.",
    "Children aged 4 to 15 pay the child fare.",
    "Holders of a Lumenholm Islander Card pay 40 percent less than the fares shown.",
    "On 25 December 2026 only the Brisk Isle route operates.",
]

# ---------------------------------------------------------------- fleet briefing (.pptx)

DECK_TITLE = "Lumenholm Ferries Fleet Briefing 2026"
DECK_SUBTITLE = "Tobias Quenell, managing director - 14 January 2026"
DECK_BULLETS_TITLE = "2025 results and 2026 plans"
DECK_BULLETS = [
    "Lumenholm Ferries carried 1.24 million passengers in 2025.",
    "The Lumenholm passenger target for 2026 is 1.4 million.",
    "The electric ferry MV Aurelie enters service in May 2026.",
    "MV Aurelie carries 280 passengers and 48 cars.",
    "MV Aurelie takes over the Brisk Isle route from MV Solvig.",
]
DECK_NOTES = "The charging station for MV Aurelie at Pier 5 cost 3.2 million euros."
DECK_TABLE_TITLE = "The fleet today"
DECK_TABLE = [
    ["Vessel", "Built", "Passengers", "Cars"],
    ["MV Solvig", "2009", "320", "40"],
    ["MV Harrowgate", "1998", "450", "70"],
    ["MV Corrin Bay", "2014", "600", "95"],
    ["MV Pellow", "2003", "150", "12"],
]

# ---------------------------------------------------------------- dry dock notice (.eml with a .txt)

MAIL_SUBJECT = "MV Harrowgate dry dock, January 2027"
MAIL_BODY = """Hello all,

MV Harrowgate goes into dry dock at the Fennick shipyard on 11 January 2027.

The dry dock period for MV Harrowgate lasts 19 days.

While MV Harrowgate is away, the chartered vessel MV Saltreed covers the Tollan route.

The refit budget for MV Harrowgate is 740,000 euros.

The refit checklist is attached.

Regards,
Nils Ambry
Harbour operations manager, Lumenholm Ferries
"""
MAIL_ATTACHMENT = ("refit_checklist.txt", """MV Harrowgate refit checklist

The refit replaces both main engines of MV Harrowgate with two 1,850 kW engines.

The MV Harrowgate refit is supervised by chief engineer Oona Feldgate.

The sea trial of MV Harrowgate after the refit is scheduled for 2 February 2027.
""")


# ---------------------------------------------------------------- writers


def fixed_zip(data: bytes) -> bytes:
    """The same Office file with every member dated FIXED, so reruns give the same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=FIXED.timetuple()[:6])
            member.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(member, src.read(info.filename))
    return out.getvalue()


def write_docx(path: Path) -> None:
    import docx

    doc = docx.Document()
    doc.core_properties.created = doc.core_properties.modified = FIXED
    doc.core_properties.author = "Lumenholm Ferries"
    doc.core_properties.title = POLICY_TITLE
    doc.add_heading(POLICY_TITLE, level=1)
    for heading, paragraphs in POLICY:
        doc.add_heading(heading, level=2)
        for text in paragraphs:
            doc.add_paragraph(text)
    buffer = io.BytesIO()
    doc.save(buffer)
    path.write_bytes(fixed_zip(buffer.getvalue()))


def _ruled_table(page, rows: list[list[str]], widths: list[int], x: float, y: float, row_h: float = 20) -> float:
    """A table with every cell's border drawn; the header row in bold. Returns the y below it."""
    for r, row in enumerate(rows):
        cx = x
        for text, w in zip(row, widths):
            page.draw_rect((cx, y, cx + w, y + row_h), color=(0, 0, 0), width=0.6)
            page.insert_text((cx + 4, y + row_h - 6), text, fontsize=9.5, fontname="hebo" if r == 0 else "helv")
            cx += w
        y += row_h
    return y


def write_pdf(path: Path) -> None:
    import pymupdf

    pdf = pymupdf.open()
    page = pdf.new_page(width=595, height=842)  # A4
    x, y = 40, 60
    page.insert_text((x, y), PDF_TITLE, fontsize=16, fontname="hebo")
    y += 30
    for line in PDF_INTRO:
        page.insert_text((x, y), line, fontsize=10.5)
        y += 16
    y += 14
    page.insert_text((x, y), TIMETABLE_HEADING, fontsize=12, fontname="hebo")
    y = _ruled_table(page, TIMETABLE, COLUMN_WIDTHS, x, y + 8) + 28
    page.insert_text((x, y), FARES_HEADING, fontsize=12, fontname="hebo")
    y = _ruled_table(page, FARES, COLUMN_WIDTHS, x, y + 8) + 22
    for line in PDF_NOTES:
        page.insert_text((x, y), line, fontsize=10.5)
        y += 16
    stamp = "D:20260114090000Z"
    pdf.set_metadata({"title": PDF_TITLE, "author": "Lumenholm Ferries", "creationDate": stamp, "modDate": stamp,
                      "producer": "make_files.py", "creator": "make_files.py"})
    path.write_bytes(pdf.tobytes(garbage=3, deflate=True, no_new_id=True))


def write_pptx(path: Path) -> None:
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    deck.core_properties.created = deck.core_properties.modified = FIXED
    deck.core_properties.author = "Lumenholm Ferries"
    deck.core_properties.title = DECK_TITLE
    deck.core_properties.last_printed = FIXED
    deck.core_properties.revision = 1

    title = deck.slides.add_slide(deck.slide_layouts[0])
    title.shapes.title.text = DECK_TITLE
    title.placeholders[1].text = DECK_SUBTITLE

    bullets = deck.slides.add_slide(deck.slide_layouts[1])
    bullets.shapes.title.text = DECK_BULLETS_TITLE
    body = bullets.placeholders[1].text_frame
    body.text = DECK_BULLETS[0]
    for text in DECK_BULLETS[1:]:
        body.add_paragraph().text = text
    bullets.notes_slide.notes_text_frame.text = DECK_NOTES

    table_slide = deck.slides.add_slide(deck.slide_layouts[5])  # title only
    table_slide.shapes.title.text = DECK_TABLE_TITLE
    rows, cols = len(DECK_TABLE), len(DECK_TABLE[0])
    table = table_slide.shapes.add_table(rows, cols, Inches(0.8), Inches(1.8), Inches(8.4), Inches(0.45 * rows)).table
    for r, row in enumerate(DECK_TABLE):
        for c, text in enumerate(row):
            table.cell(r, c).text = text

    buffer = io.BytesIO()
    deck.save(buffer)
    path.write_bytes(fixed_zip(buffer.getvalue()))


def write_eml(path: Path) -> None:
    msg = EmailMessage()
    msg["From"] = "Nils Ambry <ops@lumenholm.example>"
    msg["To"] = "All crew <crew@lumenholm.example>"
    msg["Date"] = "Mon, 07 Dec 2026 08:12:00 +0000"
    msg["Subject"] = MAIL_SUBJECT
    msg["Message-ID"] = "<drydock-2027@lumenholm.example>"
    msg.set_content(MAIL_BODY)
    name, text = MAIL_ATTACHMENT
    msg.add_attachment(text.encode("utf-8"), maintype="text", subtype="plain", filename=name)
    # A fixed boundary: EmailMessage draws a random one, which would change the bytes on every run.
    msg.set_boundary("lumenholm-drydock-boundary")
    path.write_bytes(msg.as_bytes())


def main() -> None:
    outputs = {
        DOCS / "policies" / "fare_and_refund_policy.docx": write_docx,
        DOCS / "timetable" / "winter_timetable_2026.pdf": write_pdf,
        DOCS / "sales" / "fleet_briefing_2026.pptx": write_pptx,
        DOCS / "mail" / "harrowgate_dry_dock.eml": write_eml,
    }
    for path, write in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        print(f"wrote {path.relative_to(DOCS.parent)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
