"""Who writes the reply: the configured LLM, or the offline responder, which says what it is."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.chat_ai.prompt import BlockPassage, BlockTurn, MemoryBlock, date_label
from shared.contracts.messages import DEFAULT_MAX_CONTENT_BYTES, OFFLINE_MODEL, OFFLINE_REPLY_PREFIX
from shared.runtime.llm import ChatModel
from shared.runtime.stm import Stm
from shared.runtime.text import is_question

OFFLINE_PREFIX = f"{OFFLINE_REPLY_PREFIX} no language model is configured; I can only repeat what I remember]"
_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE = re.compile(r"[^.!?;]+(?:[.!?;]+|$)")
_STOP_WORDS = (
    "a an the and or but if of to in on at for with by from about as is are was were be been being do does did have "
    "has had i me my mine you your we our they them their he she his her it its this that these those what which who "
    "whom where when why how can could would should will shall may might must not no so than too very just also any "
    "some there here again ever")
_STOP = frozenset(_STOP_WORDS.split())


@dataclass(slots=True)
class Reply:
    text: str
    model: str


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def quotable(turn: BlockTurn) -> bool:
    """The user's own statements: not the assistant's words, not questions, never an offline reply."""
    return (turn.speaker != "assistant" and not is_question(turn.content)
            and not turn.content.lstrip().startswith(OFFLINE_REPLY_PREFIX))


def pick_quotes(block: MemoryBlock, query: str, max_quotes: int = 3) -> list[BlockTurn]:
    """From the block, best entry first, the user statement of each entry that shares most words with the query
    (the result itself wins a tie); at most one per entry, ``max_quotes`` in all."""
    asked = _words(query)
    out: list[BlockTurn] = []
    for entry in block.entries:
        candidates = [t for t in entry.turns if quotable(t)]
        if not candidates:
            continue
        best = max(candidates, key=lambda t: (len(asked & _words(t.content)), t.anchor))
        out.append(best)
        if len(out) >= max_quotes:
            break
    return out


ELLIPSIS = "\u2026"
Line = tuple[str, str, str]  # a line of a reply: its text before a quote, the quote ("" for none), the text after


def clip_utf8(text: str, max_bytes: int) -> str:
    """``text`` when its UTF-8 fits ``max_bytes``; else its longest start that fits with an ellipsis after it, cut on
    a character boundary ("" when not even the ellipsis fits)."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    room = max_bytes - len(ELLIPSIS.encode("utf-8"))
    if room < 0:
        return ""
    return raw[:room].decode("utf-8", "ignore") + ELLIPSIS  # "ignore" drops only a character cut in two at the end


def _shares(sizes: list[int], room: int) -> list[int]:
    """Byte budgets of quotes of these sizes sharing ``room``: the smaller ones whole while they are under an equal
    share, what they leave over shared among the larger ones."""
    budgets = [0] * len(sizes)
    left = max(room, 0)
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    for k, i in enumerate(order):
        budgets[i] = min(sizes[i], left // (len(sizes) - k))
        left -= budgets[i]
    return budgets


def fit_lines(lines: list[Line], max_bytes: int) -> str:
    """The lines joined by newlines within ``max_bytes`` of UTF-8 (the bus's content limit): the quotes are trimmed
    (:func:`clip_utf8`) to share what the rest of the text leaves; if the rest alone is over (a passage's very long
    label), the text is cut at the end."""
    def size(text: str) -> int:
        return len(text.encode("utf-8"))

    fixed = sum(size(before) + size(after) for before, _, after in lines) + len(lines) - 1
    budgets = _shares([size(quote) for _, quote, _ in lines], max_bytes - fixed)
    text = "\n".join(before + clip_utf8(quote, n) + after
                     for (before, quote, after), n in zip(lines, budgets, strict=True))
    return clip_utf8(text, max_bytes)


@dataclass(slots=True)
class Citation:
    passage: BlockPassage
    sentence: str  # the passage's sentence that shares most words with the question
    overlap: int  # how many of the question's words the passage shares

    def line(self) -> str:
        return "".join(self.parts())

    def parts(self) -> Line:
        return f"According to {self.passage.label} ({self.passage.source}): \"", self.sentence, '"'


def pick_passage(block: MemoryBlock, query: str) -> Citation | None:
    """The passage of the block that shares most words with the query (the better ranked on a tie) and its sentence
    that shares most; None when no passage shares a word."""
    asked = _words(query)
    best: Citation | None = None
    for p in block.passages:
        overlap = len(asked & _words(f"{p.label} {p.content}"))
        if overlap and (best is None or overlap > best.overlap):
            sentences = [t.strip() for t in _SENTENCE.findall(p.content) if t.strip()] or [p.content]
            sentence = max(sentences, key=lambda t: len(asked & _words(t)))  # the first on a tie
            best = Citation(p, sentence, overlap)
    return best


def offline_reply(user_text: str, block: MemoryBlock, stm: Stm, current_message_id: str = "",
                  max_bytes: int = DEFAULT_MAX_CONTENT_BYTES) -> Reply:
    """An honest, deterministic answer built only from the block (memories and document passages) and the STM.

    Memories are quoted as before; a document passage is cited with where it comes from ("According to ...").
    When the block has both, each is given only if it shares a word with the question, the one sharing more
    first (memories on a tie); sharing none, the memories are quoted as when there are no passages.
    The reply fits ``max_bytes`` of UTF-8 (the bus's content limit, which the AIResponse enforces) whatever it
    quotes: quotes too long for it (the user's own 32 KiB message, say) are trimmed, with an ellipsis."""
    lines: list[Line] = [(OFFLINE_PREFIX, "", "")]
    quoted = pick_quotes(block, user_text)
    cited = pick_passage(block, user_text)
    if cited is not None:
        asked = _words(user_text)
        mem_overlap = max((len(asked & _words(t.content)) for t in quoted), default=0)
        if quoted and mem_overlap == 0:
            quoted = []  # the passage answers; memories sharing no word with the question would only distract
        if cited.overlap > mem_overlap:
            lines.append(cited.parts())
            cited = None
    if quoted:
        lines.append(("From our earlier conversations I remember that you said:", "", ""))
        lines.extend((f'- ({date_label(t.timestamp)}) "', t.content, '"') for t in quoted)
    if cited is not None:
        lines.append(cited.parts())
    from_block = len(lines) > 1
    if not from_block:
        lines.append(("Earlier in this conversation: ", stm.summary, "") if stm.summary
                     else ("I have nothing stored that relates to this yet.", "", ""))
    previous = [t for t in stm.turns if t.role == "user" and t.message_id != current_message_id]
    if previous and not from_block:
        lines.append(('Your last message before this one was: "', previous[-1].content, '"'))
    lines.append(('You just said: "', user_text, '"'))
    return Reply(text=fit_lines(lines, max_bytes), model=OFFLINE_MODEL)


async def llm_reply(model: ChatModel, messages: list[dict[str, str]], max_tokens: int) -> Reply:
    text = await model.complete(messages, max_tokens=max_tokens)
    return Reply(text=text.strip(), model=model.name)
