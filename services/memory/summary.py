"""Rolling summaries of the turns that left the STM window, kept under ``STM_MAX_TOKENS``.

Summaries are progressive: :meth:`Summariser.fold` takes the current :class:`SummaryState` and the
turns that just left the window and returns the next state; nothing is rebuilt from the whole
conversation. Two summarisers:

* :class:`ExtractiveSummariser` (offline, the default): it keeps *sentences people actually said*,
  chosen by a salience score (content words, named things and numbers, first-person statements), plus
  a line of the entities seen so far. It does not paraphrase, and its text says so
  (``kind=extractive``). A sentence once dropped for the budget is not brought back; scores decay a
  little with every fold so the summary drifts towards recent material.
* :class:`LlmSummariser`, when ``chat_model(...)`` gives a model: the model rewrites the previous
  summary with the new turns (``kind=llm:<model>``). Its output is cut to the budget by whole
  sentences; on any model failure the fold falls back to the extractive one, and says so in ``kind``.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.memory.tokens import TokenCounter
from shared.runtime.llm import ChatModel
from shared.runtime.logging import get_logger
from shared.runtime.stm import Turn

log = get_logger(__name__)

EXTRACTIVE = "extractive"
DECAY = 0.98  # per folded turn, the part of a sentence's salience that ages
FLOOR = 0.5  # the part that does not: what was salient stays half as salient however old
REDUNDANCY = 0.8  # how much a sentence's score drops when its words repeat an already chosen sentence's
MAX_SENTENCE_CHARS = 320
MAX_ENTITIES = 12
SUMMARY_ROLE = "summary"  # a sentence inherited from a non-extractive summary text


def _class_of(categories: frozenset[str]) -> str:
    """A regex character class's body: the Basic Multilingual Plane's characters of these Unicode categories, as
    ranges (``re`` has no ``\\p{...}``)."""
    ranges: list[tuple[int, int]] = []
    for cp in range(0x10000):
        if unicodedata.category(chr(cp)) in categories:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


# Words in any script. Letters are Unicode letters; combining marks (Devanagari's vowel signs, Hebrew's points, a
# decomposed accent) continue a word. Scripts written without spaces (Chinese, Japanese kana) have no words to find
# by shape: each ideograph or kana is a word of its own, and a Han or katakana character is a content word.
_MARKS = _class_of(frozenset({"Mn", "Mc", "Me"}))
_UPPER = _class_of(frozenset({"Lu", "Lt"}))
_IDEOGRAPHS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CONTENT_IDEOGRAPH = re.compile("[\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_LETTER = rf"[^\W\d_{_IDEOGRAPHS}]"
_NAME_CHAR = rf"(?:{_LETTER}|[{_MARKS}'\u2019-])"  # letters, marks, apostrophes (straight and typographic), hyphens
_WORD = re.compile(rf"[{_IDEOGRAPHS}]|{_LETTER}{_NAME_CHAR}*|\d[\d,.:/-]*")
_CAPITALISED = re.compile(rf"\b[{_UPPER}]{_NAME_CHAR}+(?:\s+(?:[{_UPPER}]{_NAME_CHAR}+|of|de|da|van|von))*")
# A sentence ends at . ! ? … (Arabic's question mark and full stop, Devanagari's danda too) before a space, at a
# Chinese or Japanese full stop, exclamation or question mark (no space follows those, but maybe a closing quote or
# bracket, which stays with its sentence), or at a line break.
_CJK_ENDS = r"\u3002\uff01\uff1f"
_SENTENCE_END = re.compile(rf"(?<=[.!?…\u061f\u06d4\u0964])\s+|(?<=[{_CJK_ENDS}])(?![{_CJK_ENDS}\u300d\u300f\uff09])\s*"
                           r"|\n+")
_QUESTION_MARKS = ("?", "\uff1f", "\u061f", "\u037e")  # Latin, full-width, Arabic, Greek
_NUMBER = re.compile(r"\b\d[\d,.:/-]*(?:\s?(?:%|am|pm|km|kg|years?|days?|hours?|minutes?))?")
_FIRST_PERSON = re.compile(r"\b(?:I|I'm|I've|I'd|I'll|my|mine|me|we|our)\b", re.IGNORECASE)
_STOPWORD_TEXT = (
    "a an the and or but if then so of to in on at by for with from as is are was were be been being am do does did "
    "have has had i you he she it we they me him her us them my your his its our their this that these those what "
    "which who whom when where why how not no yes just very really can could would should will shall may might must "
    "there here about into over after before up down out off again also too than only own same such more most some "
    "any all each few other both nor ok okay hi hello hey thanks thank please sure well like get got know think want"
    " 的 了 是 在 和 也 就 都 吗 呢 吧 啊 着 个 这 那 们"  # Chinese function characters (each is a word of its own)
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_NOT_ENTITY_TEXT = (
    "I I'm I've I'd I'll The A An My Your Our It This That These Those What When Where Why How Who Which Yes No "
    "Hello Hi Hey Thanks Thank Please Sure Well Ok Okay And But Or So If Then Also From You We They He She "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday"
)
_NOT_ENTITIES = frozenset(_NOT_ENTITY_TEXT.split())


@dataclass(slots=True)
class Sentence:
    text: str
    role: str
    score: float
    timestamp: float
    tokens: int
    born: int = 0  # how many turns had been folded when it came in: its age is measured from here

    def to_json(self) -> list[Any]:
        return [self.text, self.role, round(self.score, 4), self.timestamp, self.tokens, self.born]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> Sentence:
        return cls(str(raw[0]), str(raw[1]), float(raw[2]), float(raw[3]), int(raw[4]),
                   int(raw[5]) if len(raw) > 5 else 0)

    def weight(self, turns: int) -> float:
        """Salience, aged: it decays towards FLOOR of itself, so a strong old fact outlives weak new chatter."""
        return self.score * (FLOOR + (1.0 - FLOOR) * DECAY ** max(turns - self.born, 0))


@dataclass(slots=True)
class SummaryState:
    """Everything a fold needs; stored in Redis (summary hash) and PostgreSQL (conversation_sessions)."""

    text: str = ""
    kind: str = ""
    tokens: int = 0
    turns: int = 0  # turns folded in so far
    covered_until: float = 0.0  # timestamp of the newest folded turn (shown to readers; folding goes by index)
    sentences: list[Sentence] = field(default_factory=list)
    entities: dict[str, float] = field(default_factory=dict)  # name -> weight, decayed like sentences
    # Which turns are folded in, by the session's message_index (assigned under the session's row lock, so in
    # commit order): every index up to ``folded_through`` except those in ``not_folded`` (turns still in the window
    # when a later-indexed turn with an older timestamp was folded: an import into a live session, two writers
    # racing, a client's clock; at most about a window of them). None: a state written before this was kept, which
    # covered every turn up to ``covered_until`` (ConversationStore.fold_point_of converts it).
    folded_through: int | None = -1
    not_folded: list[int] = field(default_factory=list)

    def state_json(self) -> dict[str, Any]:
        """The non-text part, for ``conversation_sessions.summary_state``."""
        out = {"kind": self.kind, "tokens": self.tokens, "turns": self.turns, "covered_until": self.covered_until,
               "sentences": [s.to_json() for s in self.sentences],
               "entities": {k: round(v, 4) for k, v in self.entities.items()}}
        if self.folded_through is not None:
            out["folded_through"], out["not_folded"] = self.folded_through, self.not_folded
        return out

    @classmethod
    def from_parts(cls, text: str | None, state: dict[str, Any] | None) -> SummaryState:
        s = state or {}
        turns = int(s.get("turns", 0))
        return cls(
            text=text or "", kind=str(s.get("kind", "")), tokens=int(s.get("tokens", 0)),
            turns=turns, covered_until=float(s.get("covered_until", 0.0)),
            sentences=[Sentence.from_json(x) for x in s.get("sentences", [])],
            entities={str(k): float(v) for k, v in (s.get("entities") or {}).items()},
            folded_through=int(s["folded_through"]) if "folded_through" in s else (None if turns else -1),
            not_folded=[int(i) for i in s.get("not_folded", [])],
        )

    def folding(self, indexes: Iterable[int]) -> tuple[int, list[int]]:
        """(folded_through, not_folded) once the turns of these message indexes are folded in too (needs a known
        fold point): the indexes skipped on the way up to the highest one are the turns still in the window."""
        assert self.folded_through is not None, "a state from before fold points: convert it first (fold_point_of)"
        new = set(indexes)
        top = max(self.folded_through, *new) if new else self.folded_through
        return top, sorted(({*self.not_folded} | set(range(self.folded_through + 1, top + 1))) - new)

    def redis_mapping(self, now: float) -> dict[str, str]:
        return {"text": self.text, "kind": self.kind, "tokens": str(self.tokens), "turns": str(self.turns),
                "covered_until": repr(self.covered_until), "updated_at": repr(now),
                "state": json.dumps(self.state_json(), separators=(",", ":"), ensure_ascii=False)}

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> SummaryState | None:
        if not raw or b"state" not in raw:
            return None
        return cls.from_parts(raw.get(b"text", b"").decode(), json.loads(raw[b"state"]))


class Summariser(Protocol):
    max_tokens: int

    async def fold(self, state: SummaryState, turns: Sequence[Turn],
                   scores: Mapping[str, float] | None = None) -> SummaryState: ...


UNKNOWN_SALIENCE = 0.5  # a turn the model has not scored (yet): the middle of the scale


def salience_factor(model_salience: float | None, weight: float) -> float:
    """How much a turn's salience (0-1, the ltm salience model's score: how likely a later turn needs it) scales
    its sentences' scores: ``1 + weight x salience``; 1 with ``weight`` 0."""
    if weight <= 0:
        return 1.0
    s = UNKNOWN_SALIENCE if model_salience is None else min(max(model_salience, 0.0), 1.0)
    return 1.0 + weight * s


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def entities_of(sentence: str) -> list[str]:
    """Named things by shape: capitalised runs not at the sentence start (or several words long), and numbers."""
    found = []
    for m in _CAPITALISED.finditer(sentence):
        name = m.group(0).strip()
        words = name.split()
        if m.start() == 0 and len(words) == 1:
            continue  # a capital at the start of a sentence says nothing
        while words and words[0] in _NOT_ENTITIES:
            words = words[1:]
        while words and words[-1] in ("of", "de", "da", "van", "von"):
            words = words[:-1]
        if words and not (len(words) == 1 and words[0] in _NOT_ENTITIES):
            found.append(" ".join(words))
    for m in _NUMBER.finditer(sentence):
        number = m.group(0).strip().rstrip(".,:/-")
        if " " in number or number.endswith("%") or any(c in number for c in ":/-") or len(number) >= 3:
            found.append(number)  # a quantity, a date, a time or a year; not a bare small count
    return found


def salience(sentence: str, role: str, entities: list[str] | None = None) -> float:
    """How much a sentence is worth keeping (``entities``: its :func:`entities_of`, when known already)."""
    words = [w.lower() for w in _WORD.findall(sentence)]
    content_words = {w for w in words if _is_content(w)}
    names = entities_of(sentence) if entities is None else entities
    if len(words) < 3 and not names:
        return 0.0  # "ok", "thanks!" and the like
    score = min(len(content_words), 12) / 12
    score += 0.4 * min(len(names), 3)
    if role == "user" and _FIRST_PERSON.search(sentence):
        score += 0.6  # what users say about themselves is what a later turn most often needs
    if sentence.endswith(_QUESTION_MARKS):
        score -= 0.3
    if role == "ai":
        score *= 0.6  # replies mostly restate; the user's own words carry the facts
    return max(score, 0.0)


def _is_content(word: str) -> bool:
    """A lower-cased word that carries content: not a stopword, and longer than two letters or a Han or katakana
    character (a word of its own in a script without spaces)."""
    return word not in _STOPWORDS and (len(word) > 2 or _CONTENT_IDEOGRAPH.match(word) is not None)


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in (x.lower() for x in _WORD.findall(text)) if _is_content(w))


def _overlap(words: frozenset[str], chosen: list[frozenset[str]]) -> float:
    """Largest Jaccard similarity with an already chosen sentence."""
    if not words or not chosen:
        return 0.0
    return max(len(words & c) / len(words | c) for c in chosen)


def _strongest(weights: dict[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(weights.items(), key=lambda kv: -kv[1])[:n]


def _normal(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _clip(sentence: str) -> str:
    return sentence if len(sentence) <= MAX_SENTENCE_CHARS else sentence[: MAX_SENTENCE_CHARS - 1].rstrip() + "…"


class ExtractiveSummariser:
    def __init__(self, counter: TokenCounter, max_tokens: int, salience_weight: float = 0.0) -> None:
        """``salience_weight`` (STM_SALIENCE_WEIGHT): how much the turns' model salience weighs in what is kept."""
        self.counter, self.max_tokens, self.salience_weight = counter, max_tokens, salience_weight
        self._prefix_cache: dict[str, int] = {}

    async def fold(self, state: SummaryState, turns: Sequence[Turn],
                   scores: Mapping[str, float] | None = None) -> SummaryState:
        # In a thread: a fold of a burst of turns is several ms of CPU, which would otherwise stall the
        # event loop and with it every store waiting on I/O.
        return await asyncio.to_thread(self.fold_sync, state, turns, scores)

    def fold_sync(self, state: SummaryState, turns: Sequence[Turn],
                  scores: Mapping[str, float] | None = None) -> SummaryState:
        """``scores``: message_id -> the salience model's score of the turn (missing: unknown). ``turns``: turns not
        folded in before (the caller's fold point says which; a turn given twice would count twice)."""
        new = list(turns)
        if not new:
            return state
        decay = DECAY ** len(new)
        pool = {_normal(s.text): s for s in self._inherited(state)}
        entities = {k: v * decay for k, v in state.entities.items()}
        for n, turn in enumerate(sorted(new, key=lambda t: t.timestamp)):
            factor = salience_factor((scores or {}).get(turn.message_id), self.salience_weight)
            for raw in split_sentences(turn.content):
                if raw.startswith("[offline responder"):
                    continue  # the offline responder's disclaimer is not conversation
                names = entities_of(raw)
                for name in names:
                    entities[name] = entities.get(name, 0.0) + 1.0
                text = _clip(raw)
                key = _normal(text)
                score = salience(text, turn.role, names) * factor
                if score <= 0 or not key:
                    continue
                previous = pool.pop(key, None)  # said again: it is current; keep one copy at its best score
                # the kept text is the new one, which may differ in what the key ignores (punctuation, case): its
                # own count, or the summary could run over its budget while its tokens say otherwise
                tokens = previous.tokens if previous is not None and previous.text == text else self.counter.count(text)
                pool[key] = Sentence(text, turn.role, max(score, previous.score if previous else 0.0),
                                     turn.timestamp, tokens, born=state.turns + n)
        result = SummaryState(kind=EXTRACTIVE, turns=state.turns + len(new),
                              covered_until=max(state.covered_until, max(t.timestamp for t in new)),
                              entities=dict(_strongest(entities, 4 * MAX_ENTITIES)),
                              folded_through=state.folded_through, not_folded=state.not_folded)  # the caller's
        return self._fit(result, list(pool.values()))

    def _inherited(self, state: SummaryState) -> list[Sentence]:
        """The previous sentences; a summary written by an LLM is carried over sentence by sentence."""
        if state.sentences or not state.text:
            return list(state.sentences)
        lines = [line for line in state.text.splitlines() if line.strip()]
        if state.kind == EXTRACTIVE:  # our own rendering: a header line, maybe an entity line, then "- who: text"
            lines = [line.split(": ", 1)[-1] for line in lines if line.startswith("- ")]
        body = [line.removeprefix("- ") for line in lines]
        clipped = [_clip(s) for line in body for s in split_sentences(line)]
        return [Sentence(s, SUMMARY_ROLE, 1.0, state.covered_until, self.counter.count(s), born=state.turns)
                for s in clipped]

    def _render(self, turns: int, entities: list[str], chosen: list[Sentence]) -> str:
        lines = [self._header(turns)]
        if entities:
            lines.append(self._entity_line(entities))
        lines.extend(f"{_PREFIX[s.role]}{s.text}" for s in chosen)
        return "\n".join(lines)

    @staticmethod
    def _header(turns: int) -> str:
        return f"Extractive summary of {turns} earlier turns (sentences quoted as said, not a paraphrase)."

    @staticmethod
    def _entity_line(entities: list[str]) -> str:
        return "Mentioned: " + ", ".join(entities)

    def _fit(self, state: SummaryState, pool: list[Sentence]) -> SummaryState:
        """Greedy by salience under the budget, shown in the order it was said.

        WordPiece (and the regex fallback) split on whitespace first, so the count of the rendered
        text is exactly the sum of its lines' counts: each sentence is counted once, when it enters.
        """
        entities = [e for e, _ in _strongest(state.entities, MAX_ENTITIES)]
        budget = self.max_tokens - self.counter.count(self._header(state.turns))
        entity_tokens = self.counter.count(self._entity_line(entities)) if entities else 0
        while entities and entity_tokens > budget // 4:
            entities.pop()
            entity_tokens = self.counter.count(self._entity_line(entities)) if entities else 0
        budget -= entity_tokens
        chosen: list[Sentence] = []
        chosen_words: list[frozenset[str]] = []
        # Maximal marginal relevance: aged salience, discounted by word overlap with what is already in,
        # so that ten variations of one remark do not crowd out a different fact. Lazy greedy: a
        # candidate's value only falls as more is chosen, so a stale value is an upper bound and only
        # the top of the heap is ever re-evaluated.
        words = [_content_words(s.text) for s in pool]
        overlap = [0.0] * len(pool)  # largest overlap with the chosen sentences seen so far, per candidate
        heap = [(-s.weight(state.turns), i, 0) for i, s in enumerate(pool)]
        heapq.heapify(heap)
        while heap and budget > 0:
            _, i, seen = heapq.heappop(heap)
            if seen < len(chosen):
                overlap[i] = max(overlap[i], _overlap(words[i], chosen_words[seen:]))
                value = pool[i].weight(state.turns) * (1.0 - REDUNDANCY * overlap[i])
                heapq.heappush(heap, (-value, i, len(chosen)))
                continue
            cost = pool[i].tokens + self._prefix_tokens(pool[i].role)
            if cost <= budget:
                chosen.append(pool[i])
                chosen_words.append(words[i])
                budget -= cost
        chosen.sort(key=lambda s: s.timestamp)
        state.sentences, state.text = chosen, self._render(state.turns, entities, chosen)
        state.tokens = self.max_tokens - budget
        return state

    def _prefix_tokens(self, role: str) -> int:
        if role not in self._prefix_cache:
            self._prefix_cache[role] = self.counter.count(_PREFIX[role])
        return self._prefix_cache[role]


_PREFIX = defaultdict(lambda: "- earlier summary: ", {"user": "- user: ", "ai": "- assistant: "})


LLM_INSTRUCTIONS = (
    "You maintain the running summary of a conversation between a user and an assistant. Rewrite the summary so "
    "that it also covers the new turns. Keep what a later reply may need: facts the user stated about themselves, "
    "names, numbers, dates, decisions, open questions and tasks. Drop small talk. Write plain sentences, no "
    "headings. Stay under {words} words. Reply with the summary only."
)
MAX_LLM_INPUT_CHARS = 24_000  # the running summary and the turns of one call, together
MIN_LLM_CHUNK_CHARS = 4_000  # the turns of one call however long the running summary is
MIN_LLM_PART_CHARS = 500  # a turn too long for any call starts in the one before when that has this much room left
# A larger backlog (a big import, a rebuild of a long session) is folded extractively at once: its calls, one after
# another under the session's lock (120 s), could outlive the lock; the next folds are the model's again
MAX_LLM_BACKLOG_CHARS = 100_000


class LlmSummariser:
    """Folds the turns in calls that each fit MAX_LLM_INPUT_CHARS: a backlog larger than that (an import, a
    rebuild) is folded chunk by chunk, each call rewriting the summary the one before wrote, so every turn reaches
    the model, once. A turn longer than a call's room on its own is sent in parts, in successive calls."""

    def __init__(self, model: ChatModel, counter: TokenCounter, max_tokens: int,
                 fallback: ExtractiveSummariser | None = None) -> None:
        self.model, self.counter, self.max_tokens = model, counter, max_tokens
        self.fallback = fallback or ExtractiveSummariser(counter, max_tokens)  # its salience weight, if any

    async def fold(self, state: SummaryState, turns: Sequence[Turn],
                   scores: Mapping[str, float] | None = None) -> SummaryState:
        new = sorted(turns, key=lambda t: t.timestamp)
        if not new:
            return state
        pending = [("user" if t.role == "user" else "assistant", t.content) for t in new]
        if sum(len(content) for _, content in pending) > MAX_LLM_BACKLOG_CHARS:
            log.info("memory.summary_llm_backlog", turns=len(new), limit_chars=MAX_LLM_BACKLOG_CHARS)
            return await self.fallback.fold(state, new, scores)
        text, tokens = state.text, state.tokens
        while pending:
            transcript = _take_chunk(pending, max(MAX_LLM_INPUT_CHARS - len(text), MIN_LLM_CHUNK_CHARS))
            messages = [
                {"role": "system", "content": LLM_INSTRUCTIONS.format(words=int(self.max_tokens * 0.6))},
                {"role": "user", "content": f"Current summary:\n{text or '(none yet)'}\n\nNew turns:\n{transcript}"},
            ]
            try:
                written = (await self.model.complete(messages, max_tokens=self.max_tokens, temperature=0.2)).strip()
            except Exception as exc:  # noqa: BLE001 - a failing model must not lose the turns: fold extractively
                log.warning("memory.summary_llm_failed", error=f"{type(exc).__name__}: {exc}")
                return await self.fallback.fold(state, new, scores)  # all of them: a part may be folded already
            if not written:
                return await self.fallback.fold(state, new, scores)
            text, tokens = self._cut(written)
        return SummaryState(text=text, kind=f"llm:{self.model.name}", tokens=tokens, turns=state.turns + len(new),
                            covered_until=max(state.covered_until, new[-1].timestamp), entities=state.entities,
                            folded_through=state.folded_through, not_folded=state.not_folded)

    def _cut(self, text: str) -> tuple[str, int]:
        """Whole sentences, from the start, while they fit the budget (models overrun word limits)."""
        tokens = self.counter.count(text)
        if tokens <= self.max_tokens:
            return text, tokens
        kept: list[str] = []
        for sentence in split_sentences(text):
            candidate = " ".join([*kept, sentence])
            if self.counter.count(candidate) > self.max_tokens:
                break
            kept.append(sentence)
        out = " ".join(kept)
        if not out:  # one sentence longer than the whole budget: cut it by words
            words = text.split()
            n = len(words)
            while n > 0 and self.counter.count(" ".join(words[:n]) + " …") > self.max_tokens:
                n = int(n * 0.9)
            out = " ".join(words[:n]) + " …"
        return out, self.counter.count(out)


def _take_chunk(pending: list[tuple[str, str]], room: int) -> str:
    """The transcript of the next call, taken off the front of ``pending`` ((speaker, text), oldest first): whole
    turns, one a line, while they fit ``room`` characters; a turn longer than ``room`` on its own is taken in part
    to fill the call (cut at a space near the end when there is one), the rest left first in ``pending``, marked as
    continued."""
    lines: list[str] = []
    used = 0
    while pending:
        speaker, body = pending[0]
        line = f"{speaker}: {body}"
        cost = len(line) + (1 if lines else 0)
        if used + cost <= room:
            lines.append(line)
            used += cost
            del pending[0]
            continue
        left = room - used - (1 if lines else 0) - len(speaker) - 2  # for a part of its text in this call
        if len(line) > room and (left >= MIN_LLM_PART_CHARS or not lines):
            cut = max(left, 1)
            space = body.rfind(" ", cut * 3 // 4, cut)
            cut = space + 1 if space > 0 else cut
            lines.append(f"{speaker}: {body[:cut]}")
            pending[0] = (speaker if speaker.endswith(" (continued)") else f"{speaker} (continued)", body[cut:])
        break
    return "\n".join(lines)
