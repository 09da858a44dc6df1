"""Extraction through an OpenAI-compatible model: a JSON schema, validation, retries, then the rules."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.ltm.extraction.dates import apply_dates, ground_dates
from services.ltm.extraction.grammar import clean
from services.ltm.extraction.rules import RuleExtractor
from services.ltm.extraction.types import Extracted, Kind, Turn, dedupe
from shared.runtime.llm import ChatModel
from shared.runtime.logging import get_logger

log = get_logger(__name__)


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
    "'favourite <thing>', 'my <relation or thing>' for what it is, as 'my sister' for 'my sister is a nurse', and "
    "'my <relation or thing> (state)' for how it is now, as 'my sister (state)' for 'my sister is sick'). "
    "Questions and small talk yield no memories. Answer with JSON only, matching this schema: "
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
                    m = m.model_copy(update={"object": clean(m.content), "object_type": m.object_type or "thing"})
                ents = [(m.object, m.object_type)] if m.object and m.object_type else []
                out[item.index].append(Extracted(
                    m.type, clean(content), m.confidence, predicate=m.predicate, object=m.object,
                    object_type=m.object_type or ("thing" if m.object else None), slot=m.slot, entities=ents,
                    event_date=m.event_date, method="llm"))
        return [dedupe(x) for x in out]


def _json_body(raw: str) -> str:
    """The JSON object in a reply (models sometimes wrap it in a code fence)."""
    start, end = raw.find("{"), raw.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the reply")
    return raw[start:end + 1]
