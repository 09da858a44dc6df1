"""The dependency-pattern rules applied to one sentence (see the package docstring for what they extract)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

from services.ltm.extraction.dates import DateRef, apply_dates, ground_dates
from services.ltm.extraction.grammar import (
    ASSISTANT_TERMS,
    COMMIT_MODALS,
    COMMIT_VERBS,
    DIRECTIVE_VERBS,
    INSTRUCTION_MARKERS,
    INSTRUCTION_START,
    NOT_SLOTS,
    PERSONAL,
    PREFERENCE_VERBS,
    TRIVIAL_VERBS,
    auxiliaries,
    clean,
    first_person_subject,
    negated,
    prep_object,
    strip_discourse,
    subtree,
    third_person,
)
from services.ltm.extraction.types import Extracted, Kind, Turn


class Sentence:
    """The rules applied to one sentence."""

    def __init__(self, sent: Any, turn: Turn, refs: list[DateRef], ents: list[tuple[str, str]]) -> None:
        self.sent, self.turn, self.refs, self.ents = sent, turn, refs, ents
        self.S = turn.speaker
        self.lower = sent.text.lower()

    def say(self, tokens: Sequence[Any]) -> str:
        text = clean(third_person(tokens, self.S))
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
            if tok.pos_ in ("VERB", "AUX") and first_person_subject(tok):
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
        if root.lemma_.lower() != "remind" or root.tag_ != "VB" or negated(root) or not me:
            return []
        what = next((c for c in root.children if c.dep_ in ("xcomp", "ccomp")), None) or prep_object(
            root, ("about", "of"))
        if what is None:
            return []
        to = "to " if what.dep_ in ("xcomp", "ccomp") and what.tag_ == "VB" else "about "
        body = self.say(subtree(what, {t.i for t in what.children if t.dep_ == "aux" and t.text.lower() == "to"}))
        return [self.commit(f"Remind {self.S} {to}{body}")]

    # "Always answer in French", "Call me Sam", "Please don't use emojis"
    def instruction(self) -> list[Extracted]:
        """Only what tells the assistant how to treat or answer the speaker: the sentence must be about the
        speaker (me/my) or about answers ("answer in French", "use metric units from now on"), so that
        encouragement between people ("Don't give up on your dreams!") is not an instruction."""
        root = self.sent.root
        words = set(re.findall(r"[a-z']+", self.lower))
        if "let's" in words or any(t.dep_ in ("nsubj", "nsubjpass") and t.text.lower() in PERSONAL
                                   for t in self.sent):
            return []
        if not (words & {"me", "my", "mine", "myself"} or words & ASSISTANT_TERMS or "from now on" in self.lower):
            return []
        if INSTRUCTION_START.match(self.lower):
            content = self.say(list(self.sent))
            if len(content.split()) >= 3:
                return [self.make("instruction", f"{self.S} instructs: {content[0].upper()}{content[1:]}", 0.8)]
        if root.tag_ != "VB" or any(c.dep_ in ("nsubj", "nsubjpass", "aux") and c.text.lower() != "do"
                                    for c in root.children):
            you = [c for c in root.children if c.dep_ == "nsubj" and c.text.lower() == "you"]
            modal = auxiliaries(root) & {"should", "must"}
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
            value = clean(" ".join(t.text for t in name.subtree))
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
        lemma, aux = v.lemma_.lower(), auxiliaries(v)
        out: list[Extracted] = []
        if lemma in PREFERENCE_VERBS and not aux & {"would", "'d", "will", "'ll"} and v.tag_ != "VBD":
            out.extend(self.preference(v, lemma))
        elif lemma == "stand" and aux & {"ca", "can", "cannot"} and negated(v):
            out.extend(self.preference(v, "hate"))
        elif lemma in ("study", "major") and v.tag_ in ("VBP", "VBG") and not aux & {"will", "'ll", "would"}:
            obj = next((c for c in v.children if c.dep_ == "dobj"), None) or prep_object(v, ("in",))
            if obj is not None:
                value = self.say(subtree(obj))
                at = prep_object(v, ("at",))
                where = f" at {self.say(subtree(at))}" if at is not None else ""
                out.append(self.make("fact", f"{self.S} studies {value}{where}", 0.8, predicate="studies", obj=value))
        elif lemma == "work" and not aux & {"will", "'ll", "would"}:
            out.extend(self.work(v))
        elif (lemma in ("live", "move", "relocate") and not aux & {"will", "'ll", "going", "must"}) or (
                lemma in ("be", "come") and prep_object(v, ("from",))):
            out.extend(self.place(v, lemma))
        elif lemma == "bear" and prep_object(v, ("in",)) is not None:
            place = prep_object(v, ("in",))
            value = self.say(subtree(place))
            out.append(self.make("fact", f"{self.S} was born in {value}", 0.85, predicate="born_in", obj=value,
                                 slot="birthplace"))
        elif lemma == "be" and v.dep_ == "ROOT":
            out.extend(self.identity(v))
        if out:
            return out
        commit = self.commitment(v, lemma, aux)
        if commit:
            return commit
        if lemma == "have" and v.tag_ in ("VBP", "VBZ") and not aux and not negated(v):
            obj = next((c for c in v.children if c.dep_ == "dobj"), None)
            if obj is not None and obj.lemma_.lower() not in ("time", "fun", "question", "idea", "feeling", "chance"):
                value = self.say(subtree(obj))
                return [self.make("fact", self.with_dates(f"{self.S} has {value}"), 0.7, predicate="has", obj=value)]
        return []

    def preference(self, v: Any, lemma: str) -> list[Extracted]:
        obj = next((c for c in v.children if c.dep_ in ("dobj", "xcomp")), None)
        if obj is None:
            obj = prep_object(v, ("of",))
        vague = {"it", "that", "this", "them", "you", "those", "these", "him", "her", "what", "which", "who"}
        if obj is None or obj.text.lower() in vague:
            return []
        content_words = [t for t in subtree(obj) if not (t.is_stop or t.is_punct) and t.i != obj.i]
        if obj.dep_ == "xcomp" and not content_words and any(t.text.lower() in vague for t in obj.subtree):
            return []  # "I like holding them": about what?
        value = self.say(subtree(obj))
        if not value:
            return []
        verb3, predicate = PREFERENCE_VERBS[lemma]
        if negated(v):
            content, predicate = f"{self.S} does not {lemma} {value}", "dislikes" if predicate == "likes" else "likes"
        else:
            content = f"{self.S} {verb3} {value}"
        return [self.make("preference", content, 0.85, predicate=predicate, obj=value)]

    def work(self, v: Any) -> list[Extracted]:
        out = []
        past = v.tag_ == "VBD" or "used" in self.lower
        at = prep_object(v, ("at", "for"))
        if at is not None:
            value = self.say(subtree(at))
            verb = "worked at" if past else "works at"
            out.append(self.make("fact", self.with_dates(f"{self.S} {verb} {value}"), 0.85, predicate="works_at",
                                 obj=value, slot=None if past else "employer"))
        as_ = prep_object(v, ("as",))
        if as_ is not None:
            value = self.say(subtree(as_))
            verb = "worked as" if past else "works as"
            out.append(self.make("fact", self.with_dates(f"{self.S} {verb} {value}"), 0.85, predicate="works_as",
                                 obj=value, slot=None if past else "occupation"))
        in_ = prep_object(v, ("in", "on"))
        if in_ is not None and not out and in_.pos_ != "PRON" and in_.text.lower() != "one":
            value = self.say(subtree(in_))
            prep = in_.head.text.lower()
            out.append(self.make("fact", self.with_dates(f"{self.S} works {prep} {value}"), 0.7,
                                 predicate=f"works_{prep}",
                                 obj=value))
        return out

    def place(self, v: Any, lemma: str) -> list[Extracted]:
        if lemma in ("be", "come"):
            src = prep_object(v, ("from",))
            if src is None or negated(v) or v.tag_ == "VBD":
                return []
            value = self.say(subtree(src))
            return [self.make("fact", f"{self.S} is from {value}", 0.8, predicate="from", obj=value, slot="origin")]
        if negated(v):
            return []
        target = prep_object(v, ("in",)) if lemma == "live" else prep_object(v, ("to",))
        if target is None:
            return []
        value = self.say(subtree(target))
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
        if negated(v) or v.tag_ == "VBD":
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
        if attr.lemma_.lower() == "fan" and prep_object(attr, ("of",)) is not None:
            value = self.say(subtree(prep_object(attr, ("of",))))
            return [self.make("preference", f"{self.S} is a fan of {value}", 0.8, predicate="likes", obj=value)]
        if not dets & {"a", "an"} or attr.pos_ not in ("NOUN", "PROPN"):
            return []
        value = self.say(subtree(attr))
        return [self.make("fact", f"{self.S} is {value}", 0.7, predicate="is_a", obj=value)]

    def commitment(self, v: Any, lemma: str, aux: set[str]) -> list[Extracted]:
        if negated(v):
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
            body = self.say([t for t in subtree(v, subj | auxes)])
            return [self.commit(f"{self.S} {modal} {body}")]
        if lemma == "go" and v.tag_ == "VBG" and xcomp is not None and aux & {"'m", "am", "was"}:
            body = self.say(subtree(xcomp, {t.i for t in xcomp.children if t.dep_ == "aux"}))
            return [self.commit(f"{self.S} is going to {body}")]
        if lemma in COMMIT_VERBS and xcomp is not None and (v.tag_ in ("VBP", "VB") or (
                v.tag_ == "VBD" and lemma == "promise")):  # "I had to shut it down" is done, not due
            if lemma in ("want", "hope"):
                return []
            phrase = COMMIT_VERBS[lemma]
            body = self.say(subtree(xcomp, {t.i for t in xcomp.children if t.dep_ == "aux"}))
            return [self.commit(f"{self.S} {phrase} {body}")]
        return []

    def commit(self, content: str) -> Extracted:
        hedged = bool(set(re.findall(r"[a-z]+", self.lower)) & {"maybe", "perhaps", "might", "probably"})
        return self.make("commitment", self.with_dates(content), 0.5 if hedged else 0.8)

    # "my favourite colour is teal", "my name is Ada", "my sister is a nurse"
    def my_x_is(self, noun: Any) -> list[Extracted]:
        head = noun.head
        if head.lemma_.lower() != "be" or head.tag_ not in ("VBZ", "VBP") or negated(head):
            return []
        value_tok = next((c for c in head.children if c.dep_ in ("attr", "acomp", "oprd")), None)
        if value_tok is None:
            return []
        value = self.say(subtree(value_tok))
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
        # what the thing is ("a nurse") and how it is now ("sick") are two slots: a state never supersedes an identity
        state = value_tok.pos_ == "ADJ"
        return [self.make("fact", self.with_dates(f"{self.S}'s {key} is {value}"), 0.7, predicate=key, obj=value,
                          slot=f"my {key} (state)" if state else f"my {key}")]

    # "I adopted a puppy two weeks ago", "I went to the support group yesterday"
    def event(self) -> list[Extracted]:
        verbs = [self.sent.root, *(t for t in self.sent if t.dep_ in ("ccomp", "conj", "advcl") and t.pos_ == "VERB")]
        for v in verbs:
            if not first_person_subject(v) or v.lemma_.lower() in TRIVIAL_VERBS - {"get", "have", "do"}:
                continue
            if negated(v) or v.text.lower() in ("'s", "is"):
                continue
            past = v.tag_ == "VBD" or (v.tag_ == "VBN" and bool(auxiliaries(v) & {"got", "was", "have", "'ve"}))
            ongoing = v.tag_ == "VBG" and bool(auxiliaries(v) & {"'m", "am"})
            has_object = any(c.dep_ in ("dobj", "prep", "xcomp", "dative", "prt") for c in v.children)
            future = [r for r in self.refs if r.iso > self.today()]
            clause = strip_discourse(list(self.sent) if v is self.sent.root else subtree(v))
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
