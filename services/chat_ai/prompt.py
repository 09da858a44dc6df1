"""Prompt assembly: system, one memory block, STM summary, recent turns, the input.

The **memory block** is what long-term memory delivers to the model, so it is built and bounded here,
in one place (:func:`memory_block`), and the offline responder quotes from the same block:

- results best first, each with its context turns (the neighbouring turns ltm returns) in time order;
- every turn on its own line, labelled with its date and speaker (``user``, ``assistant`` or a name);
- no turn twice (by message id and by normalised text), however many results carry it;
- within ``max_tokens`` all-MiniLM-L6-v2 WordPiece tokens for the whole block, header and labels included
  (``LTM_PROMPT_TOKENS``); a turn longer than ``turn_tokens`` is cut at a word boundary and marked ``…``.

``MEMORY_HEADER`` starts the block's system message, and :func:`contains_turn` says whether a stored
turn made it into a block: evaluations (``mesh eval longmemeval``) use both, so what they measure is
exactly what the model reads.

With ``ENABLE_RAG``, :func:`prompt_block` adds the passages of the user's documents after the memories, under
``DOCS_HEADER``, in the same block and the same budget: the memories of the user first (within ``max_tokens`` less
``reserve`` when passages were found), then the passages, best first, each labelled with where it comes from
(``[doc: title > heading > subheading]``), in what is left (at least ``reserve``); a passage is cut like a turn.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any

from shared.contracts import Memory
from shared.contracts.messages import DocPassage
from shared.runtime.stm import Stm
from shared.runtime.tokens import count_tokens, wordpiece

MEMORY_HEADER = "Memories from earlier conversations with this user (best match first; date, speaker: words):"
DOCS_HEADER = ("Passages from the user's documents (best match first; [doc: where it comes from] words; name the "
               "document when you use one):")
CUT = " …"
_WS = re.compile(r"\s+")


def norm(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def speaker_label(speaker: str | None) -> str:
    if speaker in (None, "", "user", "human"):
        return "user"
    if speaker in ("ai", "assistant"):
        return "assistant"
    return speaker


def date_label(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d (%a)") if ts else "undated"


@dataclass(slots=True)
class BlockTurn:
    """One line of the block: a stored turn (or an extracted memory) with its label."""

    content: str
    speaker: str  # user | assistant | a name
    timestamp: float | None
    message_id: str | None
    anchor: bool  # the result itself (not a context turn)
    kind: str = "episodic"  # the memory type of a result; context turns are episodic
    cut: bool = False
    tokens: int | None = None  # of content, as ltm counted them (None: counted here)

    def line(self, text: str | None = None) -> str:
        body = self.content if text is None else text
        kind = "" if self.kind == "episodic" else f" [{self.kind}]"
        return f"{'-' if self.anchor else ' '} {date_label(self.timestamp)}, {self.speaker}{kind}: {body}"


@dataclass(slots=True)
class MemoryEntry:
    """One result with its context turns, in time order."""

    score: float
    turns: list[BlockTurn] = field(default_factory=list)


@dataclass(slots=True)
class BlockPassage:
    """One passage of a document in the block."""

    label: str  # title > heading > subheading
    source: str
    doc_id: str
    content: str
    score: float
    cut: bool = False

    def line(self, text: str | None = None) -> str:
        return f"- [doc: {self.label}] {self.content if text is None else text}"


@dataclass(slots=True)
class MemoryBlock:
    entries: list[MemoryEntry]
    text: str  # "" when nothing fits or nothing was found
    tokens: int
    passages: list[BlockPassage] = field(default_factory=list)  # after the memories (ENABLE_RAG)

    @property
    def turns(self) -> list[BlockTurn]:
        return [t for e in self.entries for t in e.turns]


HEAD_CHARS_PER_TOKEN = 6  # a long text is first tokenized only this far (English averages 4-5 per token)


class Cutter:
    """Texts cut to a number of WordPiece tokens, each text tokenized once however often it is cut.

    :meth:`cut` gives the longest head of a text within a number of tokens, cut at a word boundary (and marked
    ``…``), with the head's token count. A long text is first tokenized only as far as its head of
    ``HEAD_CHARS_PER_TOKEN * tokens`` characters, ended at a space (the tokenizer splits words at whitespace, so the
    head's tokens are the text's first tokens): the whole text only when that head is short of ``tokens``. Long
    assistant turns cost their head, not their length.

    The count needs no second tokenization: BERT's pre-tokenizer splits at whitespace and every normalisation it
    does is per character, so no token spans whitespace, and the tokens of a text are those of its whitespace-
    separated parts, concatenated. A head cut at whitespace has exactly the text's tokens that end inside it, and
    a labelled line (``label: text``) has the label's tokens plus the text's. Only a head cut inside a word (a text
    with no space before the limit) is counted again.
    """

    __slots__ = ("_encodings",)

    def __init__(self) -> None:
        self._encodings: dict[str, tuple[Any, bool]] = {}  # text -> (its encoding or its head's, whole text?)

    def _encoding(self, text: str, tokens: int) -> Any:
        known = self._encodings.get(text)
        if known is not None and (known[1] or len(known[0].ids) > tokens):
            return known[0]
        limit = HEAD_CHARS_PER_TOKEN * max(tokens, 1)
        if len(text) > limit:
            space = text.rfind(" ", 0, limit)
            if space > 0:
                head = wordpiece().encode(text[:space], add_special_tokens=False)
                if len(head.ids) > tokens:
                    self._encodings[text] = (head, False)
                    return head
        whole = wordpiece().encode(text, add_special_tokens=False)
        self._encodings[text] = (whole, True)
        return whole

    def cut(self, text: str, tokens: int, known: int | None = None) -> tuple[str, int]:
        """``text`` within ``tokens`` tokens (cut at a word boundary and marked ``…`` when longer) and its count.
        ``known``: the text's count as its sender gave it (ltm counts every turn it returns); a text known to fit
        is not tokenized at all."""
        if known is not None and known <= tokens:
            return text, known
        enc = self._encoding(text, tokens)
        if len(enc.ids) <= tokens:
            return text, len(enc.ids)
        end = enc.offsets[max(tokens - 1, 0)][1]
        head = text[:end]
        inside_word = end < len(text) and not text[end].isspace()
        if inside_word and " " in head:
            head, inside_word = head.rsplit(" ", 1)[0], False
        head = head.rstrip()
        if inside_word:  # no space to cut at: the head's last word may split into other pieces on its own
            return head + CUT, count_tokens(head) + _cut_tokens()
        return head + CUT, bisect_right(enc.offsets, len(head), key=lambda o: o[1]) + _cut_tokens()


@cache
def _cut_tokens() -> int:
    return count_tokens(CUT)


@lru_cache(maxsize=4096)
def _label_tokens(label: str) -> int:
    """Tokens of a line's label (date, speaker, kind or a passage's place): the same few labels recur."""
    return count_tokens(label)


def memory_block(memories: Sequence[Memory], max_tokens: int, turn_tokens: int) -> MemoryBlock:
    """Results and their context turns as one labelled block within ``max_tokens`` (module docstring)."""
    seen_ids: set[str] = set()
    seen_text: set[str] = set()
    normed: dict[str, str] = {}
    cutter = Cutter()
    entries: list[MemoryEntry] = []
    lines: list[str] = [MEMORY_HEADER]
    used = tokens = _label_tokens(MEMORY_HEADER)  # used: + 1 a line for the newlines (a margin); tokens: exact

    def norm_of(content: str) -> str:
        key = normed.get(content)
        if key is None:
            key = normed[content] = norm(content)
        return key

    def fresh(message_id: str | None, content: str) -> bool:
        return not ((message_id and message_id in seen_ids) or norm_of(content) in seen_text)

    for m in memories:
        anchor = BlockTurn(m.content, speaker_label(m.source.speaker), m.source.timestamp, m.source.message_id,
                           anchor=True, kind=m.type, tokens=m.tokens)
        context = [BlockTurn(c.content, speaker_label(c.speaker), c.timestamp, c.message_id, anchor=False,
                             tokens=c.tokens) for c in m.context]
        source = next((c for c in context if m.type != "episodic" and c.message_id
                       and c.message_id == m.source.message_id), None)
        if source is not None:  # a fact read from a turn: the turn's own words stand for it
            context.remove(source)
            anchor = BlockTurn(source.content, source.speaker, source.timestamp, source.message_id, anchor=True,
                               tokens=source.tokens)
        if not fresh(anchor.message_id, anchor.content):
            continue
        entry = MemoryEntry(score=m.score)
        # the result first, then its context turns nearest in time first; printed in time order
        ranked = [anchor, *sorted(context, key=lambda t: abs((t.timestamp or 0.0) - (anchor.timestamp or 0.0)))]
        chosen: list[tuple[BlockTurn, str]] = []
        entry_tokens = 0
        for turn in ranked:
            if not fresh(turn.message_id, turn.content) or any(t is turn for t, _ in chosen):
                continue
            label = _label_tokens(turn.line(""))
            text, size = cutter.cut(turn.content, turn_tokens, turn.tokens)
            if used + label + size + 1 > max_tokens:  # + 1: the newline
                room = max_tokens - used - label - 1
                if turn.anchor and room >= 24:
                    text, size = cutter.cut(turn.content, room, turn.tokens)
                if used + label + size + 1 > max_tokens:
                    if turn.anchor:
                        break  # the result itself does not fit: none of its context goes in (nor spends the budget)
                    continue  # a context turn that does not fit is left out; the next may be shorter
            turn.cut = text != turn.content
            chosen.append((turn, text))
            used += label + size + 1
            entry_tokens += label + size
            if turn.message_id:
                seen_ids.add(turn.message_id)
            seen_text.add(norm_of(turn.content))
        if not chosen:
            continue  # the result itself did not fit: its context alone would mislead
        chosen.sort(key=lambda pair: pair[0].timestamp or 0.0)
        tokens += entry_tokens
        entry.turns = [t for t, _ in chosen]
        entries.append(entry)
        lines.extend(t.line(text) for t, text in chosen)
        if used >= max_tokens - 24:
            break
    if not entries:
        return MemoryBlock([], "", 0)
    return MemoryBlock(entries, "\n".join(lines), tokens)


def prompt_block(memories: Sequence[Memory], passages: Sequence[DocPassage], max_tokens: int, turn_tokens: int,
                 reserve: int = 0) -> MemoryBlock:
    """The memories, then the document passages, in one block within ``max_tokens`` (module docstring)."""
    if not passages:
        return memory_block(memories, max_tokens, turn_tokens)
    mem = memory_block(memories, max(max_tokens - min(reserve, max_tokens), 0), turn_tokens) if memories \
        else MemoryBlock([], "", 0)
    used = mem.tokens + _label_tokens(DOCS_HEADER) + 1
    tokens = used - 1  # exact: the block's text is the memories', the header and the lines, joined by newlines
    cutter = Cutter()
    lines: list[str] = [DOCS_HEADER]
    chosen: list[BlockPassage] = []
    seen: set[str] = {norm(t.content) for t in mem.turns}
    for p in passages:
        content = _WS.sub(" ", p.text).strip()
        if not content or norm(content) in seen:
            continue
        item = BlockPassage(p.label, p.source, p.doc_id, content, p.score)
        label = _label_tokens(item.line(""))
        text, size = cutter.cut(content, turn_tokens)
        if used + label + size + 1 > max_tokens:
            room = max_tokens - used - label - 1
            if room < 24:
                continue  # a shorter passage further down may still fit
            text, size = cutter.cut(content, room)
            if used + label + size + 1 > max_tokens:
                continue
        item.cut = text != content
        chosen.append(item)
        lines.append(item.line(text))
        seen.add(norm(content))
        used += label + size + 1
        tokens += label + size
    if not chosen:
        return mem
    text = "\n".join([*([mem.text] if mem.text else []), *lines])
    return MemoryBlock(mem.entries, text, tokens, chosen)


def contains_turn(block_text: str, content: str, prefix_chars: int = 200) -> bool:
    """Whether a stored turn is inside a block: its text (or, for a turn cut to fit, its first
    ``prefix_chars`` characters) appears there, compared with whitespace and case normalised."""
    if not block_text or not content.strip():
        return False
    haystack, needle = norm(block_text), norm(content)
    return needle in haystack or (len(needle) > prefix_chars and needle[:prefix_chars] in haystack)


def build_messages(system: str, block: MemoryBlock, stm: Stm, user_text: str,
                   current_message_id: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    if block.text:
        messages.append({"role": "system", "content": block.text})
    if stm.summary:
        messages.append({"role": "system", "content": "Summary of the conversation so far:\n" + stm.summary})
    for turn in stm.turns:
        if turn.message_id == current_message_id:
            continue  # the memory service may already have stored this very input
        messages.append({"role": "user" if turn.role == "user" else "assistant", "content": turn.content})
    messages.append({"role": "user", "content": user_text})
    return messages
