"""Chunking of documents (services/ltm/documents/chunking.py): headings kept as paths, markup dropped, whole
sentences within the token budget, a small overlap, and the doc_* request models."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from services.ltm.documents.chunking import chunk, default_title, detect_format, parse_html, parse_markdown, sentences
from shared.contracts import LTM_REQUEST, DecodeError, decode
from shared.contracts.messages import DocPassage, doc_label
from shared.runtime.tokens import count_tokens

MARKDOWN = """# Field guide

Intro line one
continues here.

## Birds

### Owls

Owls hunt at night. They *fly* silently thanks to [soft feathers](https://example.org).

- Barn owl
- Tawny owl

```
# not a heading inside a fence
```

Waders
------

Herons stand still. | col | col |

## Mammals

Foxes are clever.
"""

HTML = """<html><head><title>Guide page</title><style>.x { color: red }</style>
<script>var secret = "do not index";</script></head>
<body><nav><a href="/">Home</a> | <a href="/b">Menu item</a></nav>
<h1>Guide</h1><p>Welcome &amp; hello.</p>
<h2>Trees</h2><h3>Oaks</h3><p>Oaks live long.<br>Acorns feed jays.</p>
<h2>Rivers</h2><table><tr><th>River</th><th>Length</th></tr><tr><td>Rhine</td><td>1,230 km</td></tr></table>
<ul><li>First point</li><li>Second point</li></ul>
<noscript>Enable scripts</noscript><footer>Copyright line</footer>
</body></html>"""


def test_markdown_sections_keep_the_heading_path() -> None:
    parsed = parse_markdown(MARKDOWN)
    assert parsed.title == "Field guide"
    by_heading = {tuple(s.heading): s.paragraphs for s in parsed.sections}
    assert by_heading[("Field guide",)] == ["Intro line one continues here."]
    owls = by_heading[("Field guide", "Birds", "Owls")]
    assert owls[0] == "Owls hunt at night. They fly silently thanks to soft feathers."  # links, emphasis: text only
    assert "Barn owl" in owls and "Tawny owl" in owls  # list items are paragraphs of their own
    assert "# not a heading inside a fence" in owls  # a fence's lines are text
    assert ("Field guide", "Birds", "Waders") not in by_heading  # setext "------" is a level-2 heading
    assert by_heading[("Field guide", "Waders")] == ["Herons stand still. | col | col |"]
    assert by_heading[("Field guide", "Mammals")] == ["Foxes are clever."]


def test_html_drops_scripts_styles_navigation_and_keeps_headings() -> None:
    parsed = parse_html(HTML)
    assert parsed.title == "Guide page"
    text = json.dumps([(s.heading, s.paragraphs) for s in parsed.sections])
    for dropped in ("secret", "color: red", "Menu item", "Enable scripts", "Copyright"):
        assert dropped not in text
    by_heading = {tuple(s.heading): s.paragraphs for s in parsed.sections}
    assert by_heading[("Guide",)] == ["Welcome & hello."]
    assert by_heading[("Guide", "Trees", "Oaks")] == ["Oaks live long.", "Acorns feed jays."]
    assert by_heading[("Guide", "Rivers")] == ["River | Length", "Rhine | 1,230 km", "First point", "Second point"]


def test_html_is_read_as_a_browser_tokenizes_it() -> None:
    """What the linear pass before html.parser keeps (markup.py): tags to the first '>' outside a quoted value,
    script and style text to their end tag, no text from comments or declarations, any other '<' as text."""
    parsed = parse_html('<!DOCTYPE html><!-- a note --><?xml-stylesheet x?><h1>Cats</h1>'
                        '<p title="a > b">Tom &lt; Jerry <3 and 1 < 2<![CDATA[ <raw> ]]></p>'
                        '<p>fine<![if gte mso 9]>word</p><script>var a = "<!--"; if (a<!b) f();</script>'
                        '<div data-x="<b>Hi</b>" class=x>Shown</div><a href="x"">Link</a> <p title=don\'t>Dont</p>'
                        '<!-->empty<!--->comments<STYLE>p { x: "</p>" }</style ><p>last<!-- never closed <p>lost</p>')
    by_heading = {tuple(s.heading): s.paragraphs for s in parsed.sections}
    assert by_heading == {("Cats",): ["Tom < Jerry <3 and 1 < 2 ]]>", "fineword", "Shown", "Link", "Dont",
                                      "emptycomments", "last"]}, by_heading


# Markup on which Python 3.11's html.parser rescanned the rest of the document from every "<" (quadratic: 51 s at
# 80 KB, hours at LTM_DOC_MAX_BYTES) or raised AssertionError (an "internal" reply for the user's bad input).
PATHOLOGICAL_HTML = ["<a ", "<a b=\"", "<a b='", "<a b=c ", "</", "<?", "<!x", "<![", "<!--", "<![CDATA[", "< a",
                     "<script><a "]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit", PATHOLOGICAL_HTML)
def test_pathological_html_parses_in_linear_time(unit: str) -> None:
    text = unit * ((1 << 18) // len(unit))
    started = time.perf_counter()
    parse_html(text)
    assert time.perf_counter() - started < 3.0, unit  # linear: about 0.3 s here; quadratic: minutes


def test_chunks_are_whole_sentences_within_the_budget_with_overlap() -> None:
    sentence = "The lighthouse keeper wound the clockwork number {} before the evening tide came in."
    text = "# Log\n\n## Nights\n\n" + " ".join(sentence.format(i) for i in range(60)) + "\n\n## Days\n\nShort day."
    title, chunks = chunk(text, "markdown", max_tokens=120, overlap=30)
    assert title == "Log"
    nights = [c for c in chunks if c.heading == ["Log", "Nights"]]
    assert len(nights) > 3
    for c in chunks:
        assert c.tokens <= 120 and count_tokens(c.text) == c.tokens
        assert c.text.endswith(".")  # whole sentences
    for before, after in itertools.pairwise(nights):
        last = sentences(before.text)[-1]
        assert after.text.startswith(last)  # the tail of one chunk opens the next
    assert chunks[-1].heading == ["Log", "Days"] and chunks[-1].text == "Short day."  # never across sections
    numbers = {int(w) for c in nights for w in c.text.replace(".", " ").split() if w.isdigit()}
    assert numbers == set(range(60))  # nothing lost


def test_a_sentence_over_the_budget_is_cut_between_words() -> None:
    long = " ".join(f"word{i}" for i in range(400)) + "."
    _, chunks = chunk(long, "text", max_tokens=60, overlap=0)
    assert len(chunks) > 3 and all(c.tokens <= 60 for c in chunks)
    assert " ".join(c.text for c in chunks).split() == long.split()


def test_sentences_skip_abbreviations_and_initials() -> None:
    assert sentences("Dr. Smith met J. Watson. They spoke, e.g. about bees. Done!") == [
        "Dr. Smith met J. Watson.", "They spoke, e.g. about bees.", "Done!"]


def test_format_and_title_fallbacks() -> None:
    assert detect_format("notes/a.MD") == "markdown"
    assert detect_format("https://x.org/page.html?x=1") == "html"
    assert detect_format("a.txt", mime="text/html; charset=utf-8") == "html"
    assert detect_format("a.md", fmt="text") == "text"
    assert detect_format("README") == "text"
    assert default_title("/docs/harbour-line_faq.html") == "harbour line faq"
    title, chunks = chunk("Plain heading line\n\nSome text here. More text.", "text")
    assert title == "Plain heading line" and chunks[0].heading == []
    assert doc_label("Guide", ["Guide", "Trees"]) == "Guide \u203a Trees"
    assert DocPassage(doc_id="d", chunk_id="c", chunk=0, source="s", title="T", heading=["A"], text="x").label == \
        "T \u203a A"


@pytest.mark.parametrize("data", [{}, {"doc_id": "d1", "all": True}, {"all": False}])
def test_doc_delete_needs_one_doc_id_or_all(data: dict[str, object]) -> None:
    raw = json.dumps({"request_id": "r1", "type": "doc_delete", "user_id": "u1", "data": data})
    with pytest.raises(DecodeError):
        decode(LTM_REQUEST, raw)


def test_doc_add_text_has_its_own_limit() -> None:
    raw = json.dumps({"request_id": "r1", "type": "doc_add", "user_id": "u1",
                      "data": {"source": "big.txt", "text": "x " * 40_000}})
    assert decode(LTM_REQUEST, raw, max_payload_bytes=1 << 20).data.text  # type: ignore[union-attr]
    with pytest.raises(DecodeError) as err:
        decode(LTM_REQUEST, raw, max_payload_bytes=1 << 20, context={"max_document_bytes": 50_000})
    assert err.value.reason.value == "too_large"


@pytest.mark.parametrize(("markdown", "text"), [
    ("They *fly* **very** ***far*** ~~never~~ _low_ __loud__ today.",
     "They fly very far never low loud today."),
    ("**bold *and italic* bold** and *a **b** c*", "bold and italic bold and a b c"),
    ("snake_case_name and _emph_ and 2*3*4 and a * b * c", "snake_case_name and emph and 234 and a * b * c"),
    ("An ![owl](img/owl.png \"Owl\") and [a link](https://x.org/a_(b)) and [ref][1] and [x] and [](y)",
     "An owl and a link) and ref and [x] and [](y)"),
    ("`code *not* here` and a * b", "code not here and a * b"),
    ("an unclosed *star, [bracket, (paren, ![image and ~~strike stay",
     "an unclosed *star, [bracket, (paren, ![image and ~~strike stay"),
    ("*unclosed **still", "unclosed *still"),  # as before: the first closing * after a non-blank ends it
])
def test_markdown_inline_markup_keeps_its_text(markdown: str, text: str) -> None:
    parsed = parse_markdown(markdown)
    assert parsed.sections[0].paragraphs == [text]


def test_markdown_heading_closing_sequences() -> None:
    parsed = parse_markdown("# Title #\n\n## Sub ##   \n\nx\n\n### C# in #3 ###\n\ny\n\n#### ##\n\nz\n\n####### seven")
    assert parsed.title == "Title"
    assert [s.heading for s in parsed.sections] == [
        ["Title", "Sub"], ["Title", "Sub", "C# in #3"], ["Title", "Sub", "C# in #3", "##"]]
    assert parsed.sections[-1].paragraphs == ["z", "####### seven"]


# Lines on which the former patterns rescanned the rest of the line from every position (quadratic: minutes at these
# sizes, hours at LTM_DOC_MAX_BYTES, with the event loop and the GIL held): inline markup never closed, blanks inside
# a heading or a table separator, runs of sentence marks.
PATHOLOGICAL = {
    "emphasis": lambda n: "*a " * (n // 3),
    "strong": lambda n: "**a " * (n // 4),
    "strike": lambda n: "~~a " * (n // 4),
    "underscore": lambda n: "_a " * (n // 3),
    "image": lambda n: "![" * (n // 2),
    "image url": lambda n: "![](" * (n // 4),
    "link": lambda n: "[" * n,
    "link url": lambda n: "[a](" * (n // 4),
    "heading blanks": lambda n: "# a" + " \t" * (n // 2) + "b",
    "table blanks": lambda n: " " * n + "x",
    "table tail": lambda n: "--" + " " * n + ":",
    "marks": lambda n: "." * n,
}


@pytest.mark.timeout(30)  # the former patterns: this long each, not hours
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_a_pathological_markdown_line_parses_in_linear_time(name: str) -> None:
    line = PATHOLOGICAL[name](1 << 18)
    started = time.perf_counter()
    parse_markdown(line)
    sentences(line)
    assert time.perf_counter() - started < 3.0, name  # linear: about 0.1 s here; quadratic: minutes


@pytest.mark.timeout(120)
def test_a_one_mib_line_of_unclosed_emphasis_chunks_in_seconds() -> None:
    line = "*a " * ((1 << 20) // 3)
    started = time.perf_counter()
    title, chunks = chunk(line, "markdown")
    assert time.perf_counter() - started < 30.0  # a few seconds, most of them tokenizing; it took hours
    assert title is None and len(chunks) > 1000 and chunks[0].text.startswith("*a *a")
