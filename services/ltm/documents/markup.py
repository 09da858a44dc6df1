"""HTML made safe for the standard library's parser, in one linear pass.

``html.parser`` (Python 3.11) rescans the rest of the document from every ``<`` that opens a tag it cannot close
(``"<a " * n``: 51 s at 80 KB, hours at LTM_DOC_MAX_BYTES, with the GIL held), and raises AssertionError on some
declarations (``"<!["``, ``"<!x"``): an ``internal`` reply for the user's bad input. :func:`wellformed` hands it
only what it reads in one pass:

- a start tag whose quoted values hold no ``<`` and an end tag, each closed by ``>`` before the next ``<``: kept;
- a comment, a declaration (``<!DOCTYPE ...>``) or a processing instruction: dropped (they hold no text). An
  unclosed comment runs to the end of the document, as a browser reads it;
- a CDATA section: its text, escaped;
- any other ``<``: text (``&lt;``), as a browser shows it.

Each ``<`` is looked at once, and a tag's match cannot pass the next ``<``: linear in the document's size. A tag
with a ``<`` inside a quoted value (rare; a browser would read it as a tag) is kept as text.
"""

from __future__ import annotations

import html
import re

# possessive: no backtracking; nothing in it matches '<', so a match ends before the next one
_TAG = re.compile(r"""[A-Za-z][^<>"']*+(?:(?:"[^"<]*+"|'[^'<]*+')[^<>"']*+)*+>|/[A-Za-z][^<>]*+>""")


def wellformed(text: str) -> str:
    out: list[str] = []
    n, i = len(text), 0
    # where the last of each closer is: a search from past it is known to fail without scanning (so "<!--" * n and
    # "<!" * n, each opener searching to the end for a closer that is not there, stay linear)
    last = {closer: text.rfind(closer) for closer in ("-->", "]]>", ">")}

    def after(closer: str, start: int) -> int:
        return -1 if last[closer] < start else text.find(closer, start)

    while i < n:
        j = text.find("<", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        if text.startswith("<!--", j):
            end = after("-->", j + 4)
            if end < 0:  # an unclosed comment runs to the end
                break
            i = end + 3
        elif text.startswith("<![CDATA[", j):
            end = after("]]>", j + 9)
            out.append(html.escape(text[j + 9:n if end < 0 else end], quote=False))
            if end < 0:
                break
            i = end + 3
        elif text.startswith(("<!", "<?"), j):
            end = after(">", j + 2)
            if end < 0:
                out.append("&lt;")
                i = j + 1
            else:
                i = end + 1
        else:
            m = _TAG.match(text, j + 1)
            if m is None:
                out.append("&lt;")
                i = j + 1
            else:
                out.append(text[j:m.end()])
                i = m.end()
    return "".join(out)
