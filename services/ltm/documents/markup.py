"""HTML made safe for the standard library's parser, in one linear pass.

``html.parser`` (Python 3.11) rescans the rest of the document from every ``<`` that opens a tag it cannot close
(``"<a " * n``: 51 s at 80 KB, hours at LTM_DOC_MAX_BYTES, with the GIL held), and raises AssertionError on some
declarations (``"<!["``, ``"<!x"``): an ``internal`` reply for the user's bad input. :func:`wellformed` reads the
markup the way a browser's tokenizer does (WHATWG HTML, simplified: the sectioning of a document needs tag names
and text only) and hands the parser nothing it could stumble on:

- a start or end tag (``<`` or ``</`` and a letter) runs to the first ``>`` outside a quoted attribute value (a
  value quoted after ``=`` runs to its closing quote, ``<`` and ``>`` included); it is passed on as ``<name>`` or
  ``</name>``, without its attributes (nothing downstream reads them). A tag the document ends inside is dropped
  with the rest, as a browser drops it;
- the text of ``script`` and ``style`` runs to their end tag (``</script`` then a space, ``/`` or ``>``): dropped,
  as the sections never hold it; an unclosed one takes the rest of the document;
- a comment (``<!--`` to ``-->``; ``<!-->`` and ``<!--->`` are empty), a declaration or CDATA section (``<!`` to
  ``>``), a processing instruction (``<?`` to ``>``) and ``</`` without a letter (to ``>``): dropped, they show no
  text. Unclosed, they run to the end of the document, as in a browser;
- any other ``<`` is text (``&lt;``).

Each step consumes what it scanned (a search that finds no closer ends the pass) and no pattern backtracks:
linear in the document's size.
"""

from __future__ import annotations

import re

# a tag's name, then its attributes to the closing '>': a quoted value after '=' may hold '>' (and runs to the end
# of the document when its quote never closes); every other character, quotes included, is part of the tag.
# Possessive throughout: a tag is read once
_TAG = re.compile(r"""([A-Za-z][^\s/>]*+)(?:[^>=]++|=\s*+(?:"[^"]*+"?|'[^']*+'?)?)*+>""")
_RAW_END = {name: re.compile(rf"</{name}(?=[\s/>])", re.IGNORECASE) for name in ("script", "style")}


def wellformed(text: str) -> str:
    out: list[str] = []
    n, i = len(text), 0
    while i < n:
        j = text.find("<", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        end_tag = text.startswith("</", j)
        tag = _TAG.match(text, j + 2 if end_tag else j + 1)
        if tag is not None:
            name = tag.group(1).lower()
            out.append(f"</{name}>" if end_tag else f"<{name}>")
            i = tag.end()
            raw = None if end_tag else _RAW_END.get(name)
            if raw is not None:  # script or style: its text runs to its end tag, which comes next
                closing = raw.search(text, i)
                if closing is None:
                    break
                i = closing.start()
            continue
        letter = j + (2 if end_tag else 1)
        if letter < n and text[letter].isascii() and text[letter].isalpha():
            break  # a tag the document ends inside: dropped with the rest
        if text.startswith("<!--", j):
            if text.startswith(">", j + 4) or text.startswith("->", j + 4):  # <!--> and <!--->: empty comments
                i = j + (5 if text[j + 4] == ">" else 6)
                continue
            end = text.find("-->", j + 4)
            if end < 0:  # an unclosed comment runs to the end
                break
            i = end + 3
        elif end_tag or text.startswith(("<!", "<?"), j):  # to the next '>': no text in it
            end = text.find(">", j + 2)
            if end < 0:
                break
            i = end + 1
        else:
            out.append("&lt;")
            i = j + 1
    return "".join(out)
