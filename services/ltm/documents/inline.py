"""Markdown's inline markup dropped in linear time: images, links, code spans and emphasis keep their text only.

The rules are those of the regular expressions the chunker used before (kept here as the docstrings of the
functions that replace them), with the same output, but each match is found without rescanning the line: where
a pattern such as ``(\\*\\*|\\*|~~)(?=\\S)(.+?)(?<=\\S)\\1`` looks for its closing marker, the engine scans to the
end of the line from every opening marker that has none (``"*a " * n``: quadratic, hours for a 1 MiB document,
with the event loop and the GIL held). Here the closing positions of each kind are listed once (a linear pass)
and every opening marker finds its closer by bisection.
"""

from __future__ import annotations

import re
from bisect import bisect_left

_CODE = re.compile(r"`+([^`]*)`+")  # linear: an unclosed run scans to the next backtick only
_EMPHASIS_STARTS = re.compile(r"[*~_]")
# where a closing marker may stand: after a non-space (and for _ and __, before no word character)
_CLOSERS = {
    "**": re.compile(r"(?<=\S)(?=\*\*)"),
    "*": re.compile(r"(?<=\S)(?=\*)"),
    "~~": re.compile(r"(?<=\S)(?=~~)"),
    "__": re.compile(r"(?<=\S)(?=__(?!\w))"),
    "_": re.compile(r"(?<=\S)(?=_(?!\w))"),
}


class _Positions:
    """Sorted positions of one thing in a text; :meth:`next` is the first at or after a position (None: none)."""

    __slots__ = ("at",)

    def __init__(self, at: list[int]) -> None:
        self.at = at

    @classmethod
    def of_char(cls, text: str, char: str) -> _Positions:
        out, i = [], text.find(char)
        while i >= 0:
            out.append(i)
            i = text.find(char, i + 1)
        return cls(out)

    def next(self, start: int) -> int | None:
        k = bisect_left(self.at, start)
        return self.at[k] if k < len(self.at) else None


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # the regular expressions' \w on str


def images(text: str) -> str:
    r"""``!\[([^\]]*)\]\([^)]*\)`` replaced by its text (group 1)."""
    return _strip_bracketed(text, "![", min_body=0, refs=False) if "![" in text else text


def links(text: str) -> str:
    r"""``\[([^\]]+)\]\([^)]*\)|\[([^\]]+)\]\[[^\]]*\]`` replaced by its text (group 1 or 2)."""
    return _strip_bracketed(text, "[", min_body=1, refs=True) if "[" in text else text


def _strip_bracketed(text: str, opener: str, *, min_body: int, refs: bool) -> str:
    """Each ``opener``body``](...)`` (with ``refs`` also ``opener``body``][...]``) replaced by its body, which
    holds no ``]`` and at least ``min_body`` characters; leftmost first, scanning on past each replacement, each
    closer found by bisection (linear in all)."""
    close, paren = _Positions.of_char(text, "]"), _Positions.of_char(text, ")")
    out: list[str] = []
    width = len(opener)
    pos, i = 0, text.find(opener)
    while i >= 0:
        k = close.next(i + width)  # the body stops at the first ]
        e: int | None = None
        if k is not None and k - (i + width) >= min_body:
            if text.startswith("(", k + 1):
                e = paren.next(k + 2)
            elif refs and text.startswith("[", k + 1):
                e = close.next(k + 2)
        if e is not None:
            out.append(text[pos:i])
            out.append(text[i + width:k])
            pos = e + 1
            i = text.find(opener, pos)
        else:
            i = text.find(opener, i + 1)
    out.append(text[pos:])
    return "".join(out)


def code(text: str) -> str:
    return _CODE.sub(r"\1", text) if "`" in text else text


def emphasis(text: str) -> str:
    r"""``(\*\*|\*|~~)(?=\S)(.+?)(?<=\S)\1|(?<!\w)(__|_)(?=\S)(.+?)(?<=\S)\3(?!\w)`` replaced by its text (group 2
    or 4), leftmost first, each marker tried in that order: the body is the shortest run up to a closer, on one
    line."""
    if not _EMPHASIS_STARTS.search(text):
        return text
    closers = {m: _Positions([x.start() for x in p.finditer(text)]) for m, p in _CLOSERS.items()}
    last = max((c.at[-1] for c in closers.values() if c.at), default=0)  # no marker after it opens anything
    newlines = _Positions.of_char(text, "\n")
    n = len(text)
    out: list[str] = []
    pos = 0
    for start in _EMPHASIS_STARTS.finditer(text, 0, last):
        i = start.start()
        if i < pos:  # inside the last match
            continue
        ch = text[i]
        if ch == "_":
            if i > 0 and _is_word(text[i - 1]):
                continue
            markers: tuple[str, ...] = ("__", "_")
        else:
            markers = ("**", "*") if ch == "*" else ("~~",)
        for marker in markers:
            body = i + len(marker)
            if not text.startswith(marker, i) or body >= n or text[body].isspace():
                continue
            j = closers[marker].next(body + 1)
            if j is None:
                continue
            line_end = newlines.next(body)  # the body (.+?) holds no newline
            if line_end is not None and j > line_end:
                continue
            out.append(text[pos:i])
            out.append(text[body:j])
            pos = j + len(marker)
            break
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def strip_inline(text: str) -> str:
    """Images, links, code spans and emphasis (two levels: ``***x***``) as their text."""
    text = links(images(text))
    text = code(text)
    for _ in range(2):
        text = emphasis(text)
    return text


def atx_name(rest: str | None) -> str:
    """The text of an ATX heading from what follows its ``#`` run and the blank after it, without the closing
    sequence (`` ##``) and trailing blanks: what ``(.*?)(?:[ \\t]+#+)?[ \\t]*$`` leaves in the lazy group (its
    shortest prefix that such a tail can follow), found without trying every prefix (quadratic in a run of
    blanks inside the heading)."""
    if not rest:
        return ""
    body = rest.rstrip(" \t")
    hashes = body.rstrip("#")
    if len(hashes) < len(body) and hashes and hashes[-1] in " \t":
        return hashes.rstrip(" \t")
    return body
