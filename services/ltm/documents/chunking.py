"""Documents into chunks: sections under their headings, then whole sentences up to a token budget.

1. **Sections** by format (:func:`sections`), each a heading path (outermost first) and its paragraphs:
   - ``text``: paragraphs are separated by blank lines, the lines of one paragraph joined; no headings.
   - ``markdown``: ATX (``#`` .. ``######``) and setext (``===`` / ``---`` underlined) headings set the path; a
     list item, a table row or a fenced code block is a paragraph of its own (a ``#`` inside a fence is no
     heading); links, images, emphasis and inline code keep their text only.
   - ``html`` (the standard library's ``html.parser``): ``script``, ``style``, ``noscript``, ``template``, ``svg``,
     ``nav``, ``footer`` and the ``head`` (but its ``title``) are dropped; ``h1``-``h6`` set the path; a block
     element (``p``, ``li``, ``tr``, ``div``, ...) ends a paragraph; the cells of a table row are joined by `` | ``.
2. **Sentences** (:func:`sentences`): a paragraph is cut after ``.``, ``!`` or ``?`` followed by a space and a
   capital, a digit or an opening quote, except after a known abbreviation or an initial. A sentence over the budget
   is cut at ``;`` and ``:``, then between words.
3. **Chunks** (:func:`chunk`): the sentences of one section in order, as many as fit in ``max_tokens``
   (all-MiniLM-L6-v2 WordPiece tokens, the mesh's unit); the next chunk of the section starts with the last
   sentences of the one before, up to ``overlap`` tokens. A chunk never spans two sections.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePosixPath

from services.ltm.documents.inline import atx_name
from services.ltm.documents.inline import strip_inline as _inline
from services.ltm.documents.markup import wellformed
from shared.contracts.messages import DocFormat
from shared.runtime.tokens import wordpiece


@dataclass(slots=True)
class Section:
    heading: list[str]
    paragraphs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Chunk:
    heading: list[str]
    text: str
    tokens: int


@dataclass(slots=True)
class Parsed:
    title: str | None  # the document's own title (markdown's first h1, html's <title> or first h1, text's first line)
    sections: list[Section]


_MIME = {"text/markdown": "markdown", "text/x-markdown": "markdown", "text/html": "html",
         "application/xhtml+xml": "html", "text/plain": "text"}
_EXT = {".md": "markdown", ".markdown": "markdown", ".mdown": "markdown", ".html": "html", ".htm": "html",
        ".xhtml": "html"}


def detect_format(source: str, mime: str | None = None, fmt: DocFormat | None = None) -> DocFormat:
    """The format given, else the mime type's, else the source's extension's, else text."""
    if fmt is not None:
        return fmt
    if mime:
        found = _MIME.get(mime.split(";")[0].strip().lower())
        if found:
            return found  # type: ignore[return-value]
    suffix = PurePosixPath(source.replace("\\", "/").split("?")[0]).suffix.lower()
    return _EXT.get(suffix, "text")  # type: ignore[return-value]


def default_title(source: str) -> str:
    """A title from the source when the document has none: its file name without the extension."""
    name = PurePosixPath(source.replace("\\", "/").rstrip("/").split("?")[0]).name or source
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return stem.replace("_", " ").replace("-", " ").strip() or source


_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _add(sections: list[Section], heading: list[str], paragraph: str) -> None:
    paragraph = _clean(paragraph)
    if not paragraph:
        return
    if not sections or sections[-1].heading != heading:
        sections.append(Section(list(heading)))
    sections[-1].paragraphs.append(paragraph)


# --------------------------------------------------------------------------- text
def parse_text(text: str) -> Parsed:
    sections: list[Section] = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        _add(sections, [], block)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    title = first if first and len(first) <= 100 and first[-1] not in ".!?:;," else None
    return Parsed(title, sections)


# --------------------------------------------------------------------------- markdown
# Every pattern here is linear in the line: none can rescan the rest of a long line from each of its positions (a
# 1 MiB document is one request, and a regular expression holds the event loop and the GIL). Headings' closing
# sequences and inline markup are found by services/ltm/documents/inline.py.
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*))?$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])[ \t]+")
_RULE = re.compile(r"^ {0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$")
_TABLE_SEP = re.compile(r"\|?\s*:?-{2,}:?\s*(?:\|\s*:?-{2,}:?\s*)*\|?")  # of the stripped line (fullmatch)


def parse_markdown(text: str) -> Parsed:
    sections: list[Section] = []
    path: dict[int, str] = {}
    title: str | None = None
    para: list[str] = []
    fence: str | None = None

    def heading() -> list[str]:
        return [path[k] for k in sorted(path)]

    def flush() -> None:
        if para:
            _add(sections, heading(), " ".join(para))
            para.clear()

    def set_heading(level: int, name: str) -> None:
        nonlocal title
        name = _clean(_inline(name))
        if not name:
            return
        for k in [k for k in path if k >= level]:
            del path[k]
        path[level] = name
        if level == 1 and title is None:
            title = name

    for line in text.replace("\r\n", "\n").split("\n"):
        if fence is not None:  # inside a fenced code block: its lines are text, never headings
            if line.strip().startswith(fence):
                fence = None
                flush()
            else:
                para.append(line)
            continue
        if (m := _FENCE.match(line)) is not None:
            flush()
            fence = m.group(1)[0] * 3
            continue
        if not line.strip():
            flush()
            continue
        if (m := _ATX.match(line)) is not None:
            flush()
            set_heading(len(m.group(1)), atx_name(m.group(2)))
            continue
        if para and len(para) == 1 and (m := _SETEXT.match(line)) is not None and not _ITEM.match(para[0]):
            name = para.pop()
            set_heading(1 if m.group(1)[0] == "=" else 2, name)
            continue
        if _RULE.match(line) or _TABLE_SEP.fullmatch(line.strip()):
            flush()
            continue
        stripped = line.strip()
        if stripped.startswith(">"):
            stripped = stripped.lstrip("> ").strip()
        if _ITEM.match(line) or stripped.startswith("|"):
            flush()  # a list item or a table row: a paragraph of its own
            stripped = _ITEM.sub("", line).strip() if _ITEM.match(line) else " | ".join(
                c.strip() for c in stripped.strip("|").split("|"))
        para.append(_inline(stripped))
    flush()
    return Parsed(title, sections)


# --------------------------------------------------------------------------- html
_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "nav", "footer", "iframe", "object"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                   "wbr"})
_BLOCK = frozenset({"p", "div", "li", "tr", "table", "thead", "tbody", "tfoot", "ul", "ol", "dl", "dt", "dd", "pre",
                    "blockquote", "section", "article", "main", "header", "aside", "figure", "figcaption",
                    "caption", "address", "form", "fieldset", "details", "summary", "hr", "br", "html"})
_HEADINGS = {f"h{i}": i for i in range(1, 7)}


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.path: dict[int, str] = {}
        self.title: str | None = None
        self.first_h1: str | None = None
        self._skip = 0
        self._head = False  # inside <head> (its end tag may be left out: <body> ends it too)
        self._in_title = False
        self._title: list[str] = []
        self._heading: int | None = None
        self._heading_text: list[str] = []
        self._buf: list[str] = []
        self._cells = 0  # cells of the table row being read

    def _flush(self) -> None:
        _add(self.sections, [self.path[k] for k in sorted(self.path)], "".join(self._buf))
        self._buf.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
            return
        if tag in ("head", "body"):
            self._head = tag == "head"
            return
        if tag in _SKIP:
            if tag not in _VOID:
                self._skip += 1
            return
        if self._skip:
            return
        if tag in _HEADINGS:
            self._flush()
            self._heading, self._heading_text = _HEADINGS[tag], []
        elif tag in ("td", "th"):
            if self._cells:
                self._buf.append(" | ")
            self._cells += 1
        elif tag in _BLOCK:
            self._flush()
            if tag == "tr":
                self._cells = 0

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            if self.title is None and _clean("".join(self._title)):
                self.title = _clean("".join(self._title))
            return
        if tag == "head":
            self._head = False
            return
        if tag in _SKIP:
            if self._skip and tag not in _VOID:
                self._skip -= 1
            return
        if self._skip:
            return
        if tag in _HEADINGS and self._heading is not None:
            level, name = self._heading, _clean("".join(self._heading_text))
            self._heading = None
            if name:
                for k in [k for k in self.path if k >= level]:
                    del self.path[k]
                self.path[level] = name
                if level == 1 and self.first_h1 is None:
                    self.first_h1 = name
        elif tag in _BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        elif self._skip or self._head:
            return
        elif self._heading is not None:
            self._heading_text.append(data)
        else:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def parse_html(text: str) -> Parsed:
    parser = _HtmlText()
    parser.feed(wellformed(text))  # what html.parser reads in one pass (markup.py)
    parser.close()
    return Parsed(parser.title or parser.first_h1, parser.sections)


def parse(text: str, fmt: DocFormat) -> Parsed:
    if fmt == "markdown":
        return parse_markdown(text)
    if fmt == "html":
        return parse_html(text)
    return parse_text(text)


# --------------------------------------------------------------------------- sentences
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "ft", "no", "nos", "vs", "etc", "eg", "e.g", "ie", "i.e", "fig",
    "figs", "approx", "jr", "sr", "inc", "ltd", "co", "corp", "dept", "est", "vol", "vols", "ed", "eds", "p", "pp",
    "cf", "al", "ca", "gen", "gov", "sen", "rep", "rev", "u.s", "a.d", "b.c", "a.m", "p.m", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
_CLOSE, _OPEN = "\"'\u201d\u2019)\\]", "\"'\u201c\u2018(\\["  # closing and opening quotes and brackets
# from the first mark of a run only, and nothing given back (no shorter run, CLOSE or space run can match instead):
# a run of n marks is read once, not n times
_BREAK = re.compile(f"(?<![.!?\u2026])[.!?\u2026]++[{_CLOSE}]*+\\s++(?=[{_OPEN}]?[A-Z0-9\u00c0-\u00dd])")
_CLAUSE = re.compile(r"(?<=[;:])\s+")


def sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph (module docstring, step 2)."""
    out: list[str] = []
    start = 0
    for m in _BREAK.finditer(paragraph):
        head = paragraph[start:m.start()]
        word = head.rsplit(None, 1)[-1].lower().strip(_OPEN.replace("\\", "")) if head.strip() else ""
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue  # "Dr. Smith", "J. Smith", "e.g. This"
        end = m.end()
        piece = paragraph[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    rest = paragraph[start:].strip()
    if rest:
        out.append(rest)
    return out


def _counts(texts: Sequence[str]) -> list[int]:
    if not texts:
        return []
    return [len(e.ids) for e in wordpiece().encode_batch(list(texts), add_special_tokens=False)]


def _cut_words(text: str, max_tokens: int) -> list[str]:
    """``text`` in pieces of at most ``max_tokens`` tokens, cut between words where a word boundary is near."""
    # the encoding's lists once: each read of .ids or .offsets builds the whole list again (a 1 MiB sentence was
    # read once per piece: quadratic)
    offsets = wordpiece().encode(text, add_special_tokens=False).offsets
    n = len(offsets)
    pieces: list[str] = []
    first = 0  # index of the first token of the current piece
    while first < n:
        last = min(first + max_tokens, n) - 1
        start, end = offsets[first][0], offsets[last][1]
        if last < n - 1:
            space = text.rfind(" ", start, end + 1)
            if space > start:
                end = space
                while last > first and offsets[last][0] >= end:
                    last -= 1
        pieces.append(text[start:end].strip())
        first = last + 1
    return [p for p in pieces if p]


def _units(paragraph: str, max_tokens: int) -> list[tuple[str, int]]:
    """The paragraph's sentences with their token counts, long ones cut to fit (step 2)."""
    out: list[tuple[str, int]] = []
    found = sentences(paragraph)
    for sentence, n in zip(found, _counts(found), strict=True):
        if n <= max_tokens:
            out.append((sentence, n))
            continue
        clauses = _CLAUSE.split(sentence)
        for clause, c in zip(clauses, _counts(clauses), strict=True):
            pieces = [clause] if c <= max_tokens else _cut_words(clause, max_tokens)
            counts = [c] if c <= max_tokens else _counts(pieces)
            out.extend(zip(pieces, counts, strict=True))
    return out


# --------------------------------------------------------------------------- chunks
def _pack(units: list[tuple[str, int, bool]], heading: list[str], max_tokens: int, overlap: int) -> list[Chunk]:
    """Consecutive units within ``max_tokens``, each chunk after the first starting with up to ``overlap`` tokens
    of the one before; units are (text, tokens, ends a paragraph)."""
    chunks: list[Chunk] = []
    i, n = 0, len(units)
    while i < n:
        j, used = i, 0
        while j < n and (j == i or used + units[j][1] <= max_tokens):
            used += units[j][1]
            j += 1
        parts: list[str] = []
        for k in range(i, j):
            parts.append(units[k][0])
            if k < j - 1:
                parts.append("\n" if units[k][2] else " ")
        chunks.append(Chunk(list(heading), "".join(parts), used))
        if j >= n:
            break
        back, carried = j, 0  # the next chunk repeats the tail of this one, within overlap and leaving it room
        while back - 1 > i and carried + units[back - 1][1] <= overlap \
                and carried + units[back - 1][1] + units[j][1] <= max_tokens:
            back -= 1
            carried += units[back][1]
        i = back
    return chunks


def chunk_sections(parts: Iterable[Section], max_tokens: int = 200, overlap: int = 30) -> list[Chunk]:
    out: list[Chunk] = []
    for section in parts:
        units: list[tuple[str, int, bool]] = []
        for paragraph in section.paragraphs:
            found = _units(paragraph, max_tokens)
            units.extend((t, c, k == len(found) - 1) for k, (t, c) in enumerate(found))
        out.extend(_pack(units, section.heading, max_tokens, overlap))
    return out


def chunk(text: str, fmt: DocFormat, max_tokens: int = 200, overlap: int = 30) -> tuple[str | None, list[Chunk]]:
    """The document's own title (None when it has none) and its chunks (module docstring)."""
    parsed = parse(text, fmt)
    return parsed.title, chunk_sections(parsed.sections, max_tokens, overlap)
