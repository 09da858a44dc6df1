"""Dead-letter streams: ``<name>:dead`` keeps each rejected message with its reason."""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from shared.contracts.names import Names

DEAD_LETTER_MAXLEN = 100_000
KEEP_BYTES = 256 * 1024  # an oversize payload is kept truncated, and says so


def dead_letter_fields(raw: str | bytes | None, reason: str, message: str, **extra: str) -> dict[str, str]:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
    fields = {
        "data": text[:KEEP_BYTES],
        "reason": reason,
        "error": message,
        "dead_at": repr(time.time()),
        **extra,
    }
    if len(text) > KEEP_BYTES:
        fields["truncated_from"] = str(len(text))
        fields.update(_owner(text))  # the ids may lie past the cut: kept beside it, so a deletion finds the entry
    return fields


def _owner(text: str) -> dict[str, str]:
    """``user_id`` and ``session_id`` of a message, where it parses and names them."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    data = doc.get("data")
    sources = (doc, data) if isinstance(data, dict) else (doc,)  # a request's session id is in its data
    return {k: v for src in sources for k in ("user_id", "session_id")
            if isinstance(v := src.get(k), str) and len(v) <= 1024}


async def dead_letter(redis: aioredis.Redis, name: str, raw: str | bytes | None, reason: str, message: str,
                      **extra: str) -> None:
    await redis.xadd(Names.dead(name), dead_letter_fields(raw, reason, message, **extra),  # type: ignore[arg-type]
                     maxlen=DEAD_LETTER_MAXLEN, approximate=True)
