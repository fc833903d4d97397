"""Ingest: every format in, every bad file out with a reason. Files are built in tmp_path with the
same libraries people's tools use (python-docx, pymupdf, openpyxl), never checked-in fixtures."""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from pathlib import Path
from types import SimpleNamespace

import docx
import openpyxl
import pymupdf
import pytest

from doctune.prefect_utils import CACHE
from doctune.settings import IngestSettings
from tasks.ingest import (
    FileRef,
    IngestResult,
    decode_text,
    detect_language,
    discover,
    ingest_file,
    ingest_file_task,
    ingest_folder,
    is_excluded,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = IngestSettings()
ZH_TEXT = "# 员工手册\n\n员工每年享有十五天带薪年假。\n\n病假需提供医院证明，报销须在三十天内提交。"


# ---------------------------------------------------------------- builders


def make_pdf(path: Path, lines: list[str]) -> Path:
    doc = pymupdf.open()
    page = doc.new_page()
    for i, line in enumerate(lines):
        page.insert_text((72, 72 + 24 * i), line, fontsize=12)
    doc.save(path)
    return path


def make_docx(path: Path) -> Path:
    d = docx.Document()
    d.add_heading("Leave Policy", 1)
    d.add_paragraph("Staff get 25 days of paid leave per year.")
    d.add_heading("Sick leave", 2)
    d.add_paragraph("Sick leave needs a doctor's note after three days.")
    d.save(path)
    return path


def make_xlsx(path: Path, sheets: dict[str, list[list]]) -> Path:
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, rows in sheets.items():
        ws = wb.create_sheet(name)
        for row in rows:
            ws.append(row)
    wb.save(path)
    return path


def docx_bytes(tmp_path: Path) -> bytes:
    return make_docx(tmp_path / "_real.docx").read_bytes()


def ingest_one(path: Path, settings: IngestSettings = SETTINGS) -> IngestResult:
    """Ingest a single file through discover, as the flow does."""
    refs = {r.relpath: r for r in discover(path.parent, settings)}
    return ingest_file(path.parent, refs[path.name], settings)


def only_doc(result: IngestResult):
    assert not result.skipped, result.skipped
    assert len(result.documents) == 1, result
    return result.documents[0]


# ---------------------------------------------------------------- documents


def test_pdf_text_extracted(tmp_path):
    path = make_pdf(tmp_path / "travel.pdf", ["Travel Policy", "Economy flights up to 800 EUR are approved."])
    doc = only_doc(ingest_one(path))
    assert "Economy flights up to 800 EUR are approved." in doc.text
    assert doc.format == "pdf" and doc.path == "travel.pdf" and doc.language == "en"
    assert doc.doc_id == doc.sha256[:16] and len(doc.sha256) == 64
    assert doc.title == "travel"  # pdfminer text has no Markdown headings: the stem


def test_docx_keeps_headings(tmp_path):
    doc = only_doc(ingest_one(make_docx(tmp_path / "leave.docx")))
    assert "# Leave Policy" in doc.text and "## Sick leave" in doc.text
    assert "25 days of paid leave" in doc.text
    assert doc.title == "Leave Policy" and doc.format == "docx"


def test_markdown_title_and_blank_lines_collapsed(tmp_path):
    path = tmp_path / "guide.markdown"
    path.write_text("Intro line\n\n\n\n\n## Setup   \r\nRun the installer.\n", encoding="utf-8")
    doc = only_doc(ingest_one(path))
    assert doc.text == "Intro line\n\n## Setup\nRun the installer."
    assert doc.title == "Setup" and doc.format == "md"


def test_setext_heading_is_a_title(tmp_path):
    assert only_doc(ingest_one(_write(tmp_path / "a.txt", "Returns Policy\n==============\n\nText."))).title == \
        "Returns Policy"
    assert only_doc(ingest_one(_write(tmp_path / "b.txt", "Plain words.\n\nMore words."))).title == "b"


def test_html_drops_page_chrome_keeps_content(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Site</title><style>.x{color:red}</style><script>var tracking=1;</script></head>"
        "<body><header><a href='/'>ACME Home</a></header>"
        "<nav><ul><li>Products</li><li>Careers</li></ul></nav>"
        "<main><article><header><h1>Expense Rules</h1></header>"
        "<p>Receipts are due within 30 days.</p></article></main>"
        "<aside>Related links</aside><footer>Copyright ACME 2024 | Privacy</footer></body></html>",
        encoding="utf-8",
    )
    doc = only_doc(ingest_one(path))
    assert "# Expense Rules" in doc.text and "Receipts are due within 30 days." in doc.text
    for chrome in ("ACME Home", "Products", "Careers", "Copyright", "Related links", "tracking", "color:red"):
        assert chrome not in doc.text
    assert doc.title == "Expense Rules" and doc.format == "html"


def test_txt_utf8_with_bom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbfCaf\xc3\xa9 opens at 8am.")
    assert only_doc(ingest_one(path)).text == "Café opens at 8am."


@pytest.mark.parametrize("encoding", ["gbk", "gb18030"])
def test_txt_chinese_legacy_encoding_recovered_exactly(tmp_path, encoding):
    path = tmp_path / "手册.txt"
    path.write_bytes(ZH_TEXT.encode(encoding))
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")  # so the test really exercises detection
    doc = only_doc(ingest_one(path))
    assert doc.text == ZH_TEXT
    assert doc.language == "zh" and doc.title == "员工手册"


def test_language_detection():
    assert detect_language("员工每年享有十五天带薪年假，使用 SAP 系统申请。") == "zh"
    assert detect_language("Use the SAP portal to request leave (请假).") == "en"
    assert detect_language("") == "en"


# ---------------------------------------------------------------- tables


def test_csv_faq_english_becomes_pairs(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("Question,Answer,Category\n"
                    "How many leave days do I get?,25 days per year.,HR\n"
                    "\n"
                    "Where is the office?,\"Main Street 1, Berlin\",Facilities\n"
                    "Who approves travel?,,Travel\n", encoding="utf-8")
    result = ingest_one(path)
    assert not result.documents
    assert [(p.question, p.answer) for p in result.pairs] == [
        ("How many leave days do I get?", "25 days per year."),
        ("Where is the office?", "Main Street 1, Berlin"),
    ]
    p = result.pairs[0]
    assert (p.source, p.path, p.language) == ("faq", "faq.csv", "en") and p.doc_id and p.pair_id
    # The half-filled row is reported, the good rows are kept.
    assert len(result.skipped) == 1 and "1 of 3 FAQ rows" in result.skipped[0].reason
    assert "row 5" in result.skipped[0].reason


def test_xlsx_faq_chinese_columns(tmp_path):
    path = make_xlsx(tmp_path / "常见问题.xlsx", {"FAQ": [
        ["问题", "答案"],
        ["年假有多少天？", "每年十五天带薪年假。"],
        ["报销需要多久提交？", "三十天内提交。"],
    ]})
    result = ingest_one(path)
    assert not result.skipped and not result.documents
    assert [(p.question, p.answer) for p in result.pairs] == [
        ("年假有多少天？", "每年十五天带薪年假。"), ("报销需要多久提交？", "三十天内提交。")]
    assert all(p.language == "zh" and p.source == "faq" for p in result.pairs)


def test_tables_without_qa_columns_become_markdown(tmp_path):
    csv_doc = only_doc(ingest_one(_write(tmp_path / "prices.csv", "Item;Price\nPen;2.5\nDesk|lamp;40\n")))
    assert csv_doc.text == "| Item | Price |\n| --- | --- |\n| Pen | 2.5 |\n| Desk\\|lamp | 40 |"
    assert csv_doc.format == "csv" and csv_doc.title == "prices"

    path = make_xlsx(tmp_path / "book.xlsx", {
        "Staff": [["Name", "Room"], ["Ana", 101], ["Bo", 102.0]],
        "FAQ": [["Q", "A"], ["Where is HR?", "Room 101."]],
    })
    result = ingest_one(path)
    assert [(p.question, p.answer) for p in result.pairs] == [("Where is HR?", "Room 101.")]
    doc = only_doc(IngestResult(documents=result.documents))
    assert doc.text == "## Staff\n\n| Name | Room |\n| --- | --- |\n| Ana | 101 |\n| Bo | 102 |"
    assert doc.title == "book" and doc.format == "xlsx"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# ---------------------------------------------------------------- instruction data


def test_alpaca_json(tmp_path):
    path = _write(tmp_path / "alpaca.json", json.dumps([
        {"instruction": "Summarise the leave policy.", "input": "", "output": "25 days a year."},
        {"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Empty answer", "input": "", "output": ""},
    ]))
    result = ingest_one(path)
    assert [(p.question, p.answer) for p in result.pairs] == [
        ("Summarise the leave policy.", "25 days a year."),
        ("Translate to French\n\nGood morning", "Bonjour"),
    ]
    assert all(p.source == "instruction" and p.path == "alpaca.json" for p in result.pairs)
    assert len(result.skipped) == 1 and "1 of 3 records" in result.skipped[0].reason
    assert "record 3" in result.skipped[0].reason


def test_sharegpt_jsonl_turns_and_system(tmp_path):
    rows = [
        {"conversations": [
            {"from": "system", "value": "You are the HR bot."},
            {"from": "human", "value": "How many leave days?"},
            {"from": "gpt", "value": "25."},
            {"from": "human", "value": "And sick days?"},
            {"from": "gpt", "value": "10."},
        ]},
        {"conversations": [{"from": "human", "value": "年假有多少天？"}, {"from": "gpt", "value": "十五天。"}]},
    ]
    path = _write(tmp_path / "chats.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    result = ingest_one(path)
    assert not result.skipped
    assert [(p.question, p.answer, p.system, p.language) for p in result.pairs] == [
        ("How many leave days?", "25.", "You are the HR bot.", "en"),
        ("And sick days?", "10.", "You are the HR bot.", "en"),
        ("年假有多少天？", "十五天。", None, "zh"),
    ]


def test_openai_messages_jsonl_with_malformed_line(tmp_path):
    good = lambda q, a: json.dumps({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": q}]},
        {"role": "assistant", "content": a}]})
    lines = [good("Where is HR?", "Room 101."), good("Who signs invoices?", "The CFO."),
             '{"messages": [{"role": "user", "content": "truncated', "", good("When is payday?", "The 25th.")]
    path = _write(tmp_path / "openai.jsonl", "\n".join(lines) + "\n")
    result = ingest_one(path)
    assert [p.question for p in result.pairs] == ["Where is HR?", "Who signs invoices?", "When is payday?"]
    assert all(p.system == "Be brief." for p in result.pairs)
    assert len(result.skipped) == 1
    skipped = result.skipped[0]
    assert skipped.path == "openai.jsonl"
    assert skipped.reason.startswith("1 of 4 lines unreadable (first at line 3: Unterminated string")


def test_unknown_json_shape_lists_accepted_shapes(tmp_path):
    result = ingest_one(_write(tmp_path / "data.json", json.dumps({"rows": [1, 2]})))
    assert not result.pairs and len(result.skipped) == 1
    reason = result.skipped[0].reason
    assert "unknown JSON shape" in reason and "['rows']" in reason
    assert "Alpaca" in reason and "ShareGPT" in reason and "OpenAI" in reason


def test_jsonl_named_json_and_invalid_json(tmp_path):
    lines = [json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) for i in range(3)]
    result = ingest_one(_write(tmp_path / "lines.json", "\n".join(lines)))
    assert [p.answer for p in result.pairs] == ["A0", "A1", "A2"] and not result.skipped

    result = ingest_one(_write(tmp_path / "broken.json", '[{"instruction": "Q", "output": "A"},\n'))
    assert not result.pairs
    assert result.skipped[0].reason.startswith("invalid JSON (line 2")


# ---------------------------------------------------------------- a folder with everything


def test_robustness_folder(tmp_path):
    folder = tmp_path / "docs"
    (folder / "hr" / "deep").mkdir(parents=True)
    good = {
        "hr/leave.docx": make_docx(folder / "hr" / "leave.docx"),
        "hr/deep/travel.pdf": make_pdf(folder / "hr" / "deep" / "travel.pdf", ["Travel", "Book economy."]),
        "readme.md": _write(folder / "readme.md", "# Readme\n\nHello."),
        "zh.txt": _write(folder / "zh.txt", ZH_TEXT, "gbk"),
        "faq.csv": _write(folder / "faq.csv", "q,a\nWhat?,That.\n"),
    }
    rng = random.Random(0)  # seeded: the junk is the same on every run
    bad = {  # relpath → words the reason must contain
        "corrupt.pdf": (rng.randbytes(4096), ["not a PDF", "damaged"]),
        "report.pdf": (docx_bytes(tmp_path), ["not a PDF", "b'PK'", "is it a .docx?"]),
        "archive.pdf": (_zip_bytes(), ["not a PDF", "b'PK'", "zip archive"]),
        "truncated.pdf": (make_pdf(tmp_path / "t.pdf", ["x" * 50] * 20).read_bytes()[:300], ["PDF could not be parsed"]),
        "scan.pdf": (_blank_pdf(), ["no text", "OCR"]),
        "locked.pdf": (_encrypted_pdf(), ["password-protected", "without the password"]),
        "fake.docx": (b"%PDF-1.7 not really", ["not a .docx", "is it a .pdf?"]),
        "sheet.docx": (_xlsx_bytes(tmp_path), ["not a .docx", "word/document.xml", "is it a .xlsx?"]),
        "old.xlsx": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600), ["not a .xlsx", "old binary Office"]),
        "empty.md": (b"", ["empty"]),
        "blank.txt": (b"  \n\t\n  ", ["empty"]),
        "junk.txt": (rng.randbytes(4096), ["binary"]),
        "nul-free-junk.txt": (bytes(b for b in rng.randbytes(8192) if b), ["binary"]),
        "slides.ppt": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600),
                       ["unsupported extension .ppt", "save it as .pptx or PDF", "supported: .pdf"]),
        "slides.pptx": (b"PK\x03\x04", ["a damaged zip archive", "save it again"]),
        "Makefile": (b"all:\n\techo hi\n", ["unsupported extension (none)"]),
        "big.md": (b"# Big\n" + b"word " * 40_000, ["0.2 MB is over ingest.max_file_mb=0.1", "raise ingest.max_file_mb"]),
        "odd.json": (b'{"hello": "world"}', ["unknown JSON shape", "accepted shapes"]),
        "half.csv": (b"question,answer\n,only an answer\n", ["1 of 1 FAQ rows", "row 2", "fill in both"]),
    }
    for relpath, (data, _) in bad.items():
        (folder / relpath).write_bytes(data)

    # A tiny limit stands in for a huge file; the docx (~36 KB) stays under it.
    result = ingest_folder(folder, IngestSettings(max_file_mb=0.1))

    found = {d.path for d in result.documents} | {p.path for p in result.pairs}
    assert found == set(good), found
    reasons = {s.path: s.reason for s in result.skipped}
    assert set(reasons) == set(bad), reasons
    for relpath, (_, words) in bad.items():
        for word in words:
            assert word in reasons[relpath], (relpath, reasons[relpath])


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "hello")
    return buf.getvalue()


def _xlsx_bytes(tmp_path: Path) -> bytes:
    return make_xlsx(tmp_path / "_real.xlsx", {"S": [["a", "b"], [1, 2]]}).read_bytes()


def _blank_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page()
    return doc.tobytes()


def _encrypted_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "Salaries for 2025", fontsize=12)
    return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")


def test_50mb_file_skipped_by_size_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.txt"
    line = b"The quick brown fox jumps over the lazy dog.\n"
    with path.open("wb") as f:
        f.write(line * (50 * 1024 * 1024 // len(line) + 1))
    ref = discover(tmp_path, SETTINGS)[0]
    assert ref.size > 50 * 1024 * 1024

    read_bytes = Path.read_bytes

    def no_reading(self):
        if self.name == "huge.txt":
            raise AssertionError("a file over max_file_mb must be refused before it is read")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    result = ingest_file(tmp_path, ref, SETTINGS)  # default max_file_mb=20
    assert not result.documents
    assert result.skipped[0].reason.startswith("50.0 MB is over ingest.max_file_mb=20")

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    doc = only_doc(ingest_file(tmp_path, ref, IngestSettings(max_file_mb=60)))
    assert doc.text.startswith("The quick brown fox") and len(doc.text) > 50_000_000


def test_changed_after_discover_is_not_ingested_under_the_old_hash(tmp_path):
    path = _write(tmp_path / "a.md", "# One")
    ref = discover(tmp_path, SETTINGS)[0]
    path.write_text("# Two", encoding="utf-8")
    result = ingest_file(tmp_path, ref, SETTINGS)
    assert not result.documents and "changed since it was discovered" in result.skipped[0].reason


def test_decode_text_rejects_binary():
    with pytest.raises(Exception, match="binary"):
        decode_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert decode_text("naïve".encode("utf-16")) == "naïve"


# ---------------------------------------------------------------- discover


def test_discover_excludes_sorts_and_hashes(tmp_path):
    for rel in ["b.md", "a/z.txt", "a/b.txt", "gold/eval.jsonl", "gold/sub/more.jsonl", ".hidden",
                "a/.git/config", "a/~$lock.docx", "drafts/old.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"content of {rel}", encoding="utf-8")

    refs = discover(tmp_path, SETTINGS)
    assert [r.relpath for r in refs] == ["a/b.txt", "a/z.txt", "b.md", "drafts/old.md"]
    assert refs[2].size == len("content of b.md")

    custom = IngestSettings(exclude=["gold/**", "drafts/*", "**/*.txt"])
    assert [r.relpath for r in discover(tmp_path, custom)] == [".hidden", "a/.git/config", "a/~$lock.docx", "b.md"]

    before = {r.relpath: r.sha256 for r in refs}
    (tmp_path / "b.md").write_text("content changed", encoding="utf-8")
    after = {r.relpath: r.sha256 for r in discover(tmp_path, SETTINGS)}
    assert after["b.md"] != before["b.md"]
    assert after["a/b.txt"] == before["a/b.txt"]


def test_is_excluded_patterns():
    assert is_excluded("gold/x.jsonl", ["gold/**"]) and is_excluded("gold/a/b/c.md", ["gold/**"])
    assert not is_excluded("golden/x.md", ["gold/**"]) and not is_excluded("docs/gold/x.md", ["gold/**"])
    assert is_excluded("docs/gold/x.md", ["**/gold/**"])
    assert is_excluded(".env", ["**/.*"]) and is_excluded("a/.cache/b/c.txt", ["**/.*"])
    assert not is_excluded("a/file.txt", ["*.txt"]) and is_excluded("a/file.txt", ["**/*.txt"])
    assert is_excluded("~$budget.xlsx", ["**/~$*"]) and is_excluded("a/d[1].md", ["a/d[0-9].md"]) is False
    assert is_excluded("a/d1.md", ["a/d[0-9].md"]) and not is_excluded("a/d1.md", ["a/d[!0-9].md"])


def test_discover_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        discover(tmp_path / "nope", SETTINGS)


# ---------------------------------------------------------------- Prefect task


def test_task_fn_and_cache_key_follows_content(tmp_path):
    _write(tmp_path / "a.md", "# A\n\nText.")
    ref = discover(tmp_path, SETTINGS)[0]
    result = ingest_file_task.fn(str(tmp_path), ref, SETTINGS)
    assert only_doc(result).title == "A"

    def key(r: FileRef) -> str:
        inputs = {"folder": str(tmp_path), "ref": r, "settings": SETTINGS}
        return CACHE.compute_key(task_ctx=SimpleNamespace(task=ingest_file_task), inputs=inputs, flow_parameters={})

    assert key(ref) == key(FileRef(**ref.model_dump()))
    assert key(ref) != key(ref.model_copy(update={"sha256": "0" * 64}))
    assert ingest_file_task.task_run_name.format(ref=ref) == "ingest a.md"


def test_ingest_never_leaves_the_folder_and_lists_what_it_does_not_read(tmp_path):
    from tasks.ingest import discover_all, fs_path

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# A\n\nThe Brekke office opens at 7:45.\n")
    outside = tmp_path / "keys.txt"
    outside.write_text("AWS_SECRET=abc\n")
    os.symlink(outside, folder / "keys.txt")  # out of the folder: not read
    os.symlink(folder / "a.md", folder / "sub" / "alias.md")  # inside the folder: read
    os.symlink(tmp_path, folder / "up")  # a linked folder: not followed
    os.mkfifo(folder / "queue.md")
    refs, skipped = discover_all(folder, IngestSettings())
    assert [r.relpath for r in refs] == ["a.md", "sub/alias.md"]
    reasons = {s.path: s.reason for s in skipped}
    assert set(reasons) == {"keys.txt", "up/", "queue.md"}
    assert "outside the folder" in reasons["keys.txt"] and str(outside) in reasons["keys.txt"]
    # A link swapped in after discovery is refused when the file is read.
    os.remove(folder / "sub" / "alias.md")
    os.symlink(outside, folder / "sub" / "alias.md")
    result = ingest_file(folder, refs[1], IngestSettings())
    assert not result.documents and "outside the folder" in result.skipped[0].reason
    assert fs_path(folder, refs[0]) == folder / "a.md"


def test_a_name_that_is_not_utf8_is_read_and_carried_escaped(tmp_path):
    from tasks.ingest import discover_all, fs_path

    folder = tmp_path / "docs"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.md"), "wb") as f:
        f.write(b"# Cafe\n\nThe cafe sells 140 coffees a day.\n")
    (ref,), _ = discover_all(folder, IngestSettings())
    assert ref.relpath == "caf\\xe9.md" and ref.fs_name == os.fsencode("caf\udce9.md").hex()
    assert fs_path(folder, ref).exists()
    result = ingest_file(folder, ref, IngestSettings())
    assert result.documents[0].path == "caf\\xe9.md" and "140 coffees" in result.documents[0].text
    json.dumps(result.model_dump(), ensure_ascii=False).encode("utf-8")  # every output can carry it


def test_a_zip_bomb_is_refused_before_any_parser_opens_it(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    path = folder / "bomb.docx"  # a docx whose document.xml unpacks 40 MB of zeros from a few KB
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        with z.open("word/document.xml", "w") as member:
            for _ in range(40):
                member.write(b"\0" * 2**20)
    assert path.stat().st_size < 200_000
    (ref,) = discover(folder, SETTINGS)
    result = ingest_file(folder, ref, SETTINGS)
    assert not result.documents and "possible zip bomb" in result.skipped[0].reason
    assert "40 MB" in result.skipped[0].reason
    # Under the ratio's floor the size limit, 25x ingest.max_file_mb, still holds.
    small = IngestSettings(max_file_mb=1)
    reason = ingest_file(folder, ref, small).skipped[0].reason
    assert "the limits are 25 MB, 25x ingest.max_file_mb" in reason
