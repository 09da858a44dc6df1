"""The rules' lexicon and the spaCy token helpers they share (services/ltm/extraction/sentence.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

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
PERSONAL = {"i", "we", "he", "she", "they", "it", "this", "that"}
INSTRUCTION_START = re.compile(r"^(?:please,? |always |never (?!mind)|from now on,? |don't |do not |make sure )")
_PRONOUNS = {"i": "{S}", "me": "{S}", "my": "{S}'s", "mine": "{S}'s", "myself": "{S}"}
_VERB_FIX = {"'m": "is", "am": "is", "'ve": "has", "'ll": "will", "'d": "would", "was": "was"}


class ParsedDoc(Protocol):
    sents: Any
    ents: Any


def third_person(tokens: Sequence[Any], speaker: str) -> str:
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


def clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip(" ,;:-")
    return re.sub(r"[.!?]+$", "", text).strip()


def subtree(tok: Any, exclude: set[int] | None = None) -> list[Any]:
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


def strip_discourse(tokens: list[Any]) -> list[Any]:
    """Drop interjections and connectives before a clause ("Oh, btw, I had..." -> "I had...")."""
    i = 0
    while i < len(tokens) and (tokens[i].is_punct or tokens[i].dep_ in ("intj", "cc", "mark")
                               or tokens[i].text.lower() in DISCOURSE):
        i += 1
    return tokens[i:] if i < len(tokens) else tokens


def first_person_subject(verb: Any) -> bool:
    subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
    if subjects:
        return any(c.text.lower() in _FIRST for c in subjects)
    if verb.dep_ in ("conj", "xcomp") and verb.head is not verb:
        return first_person_subject(verb.head)
    return False


def negated(verb: Any) -> bool:
    return any(c.dep_ == "neg" or c.text.lower() in ("never", "not", "n't") for c in verb.children)


def auxiliaries(verb: Any) -> set[str]:
    return {c.text.lower() for c in verb.children if c.dep_ in ("aux", "auxpass")}


def prep_object(verb: Any, preps: tuple[str, ...]) -> Any | None:
    for c in verb.children:
        if c.dep_ == "prep" and c.text.lower() in preps:
            objs = [g for g in c.children if g.dep_ == "pobj"]
            if objs:
                return objs[0]
    return None
