"""What extraction produces: :class:`Turn` in, :class:`Extracted` memories out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


def dedupe(items: list[Extracted]) -> list[Extracted]:
    seen: set[tuple[str, str]] = set()
    out = []
    for it in items:
        key = (it.type, it.content.lower())
        if key not in seen and it.content:
            seen.add(key)
            out.append(it)
    return out
