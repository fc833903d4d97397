"""Markdown tables, written and read the one same way: ingest writes every table it finds (sheets, slides,
Word, PDF and HTML tables) as a Markdown table, and fact extraction reads each row back with its header."""

from __future__ import annotations

import re

_SEPARATOR_CELL = re.compile(r":?-+:?")
_TABLE_RUN = re.compile(r"(?:^[ \t]*\|.*\|[ \t]*(?:\n|\Z))+", re.MULTILINE)


def cells(line: str) -> list[str]:
    """A Markdown table row's cells, unescaped ('\\|' is a bar, '<br>' a line break), spaces collapsed."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [" ".join(c.replace("\\|", "|").replace("<br>", " ").split()) for c in re.split(r"(?<!\\)\|", inner)]


def is_separator(row: list[str]) -> bool:
    return bool(row) and all(_SEPARATOR_CELL.fullmatch(c) for c in row)


def markdown_table(rows: list[list[str]]) -> str:
    """Rows (the first is the header) as a Markdown table: one space around each cell, bars escaped."""
    width = max(len(r) for r in rows)
    esc = [[c.replace("|", "\\|").replace("\n", "<br>") for c in r] + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + " --- |" * width]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def tidy_tables(text: str) -> str:
    """Every well-formed Markdown table in `text` written the one way (converters pad cells to align
    columns) and set apart by blank lines (PDF text runs into its tables)."""
    def one(m: re.Match) -> str:
        rows = [cells(line) for line in m.group().strip("\n").split("\n")]
        if len(rows) < 2 or not is_separator(rows[1]):
            return m.group()
        return "\n\n" + markdown_table([rows[0], *rows[2:]]) + "\n\n"

    return _TABLE_RUN.sub(one, text)
