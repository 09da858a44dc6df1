"""What a user's deletion does on the bus: stream entries and keys that carry the user's id or text.

Streams keep what crossed them for ``STREAM_RETENTION_S`` (dead letters up to their MAXLEN): a deleted user's
turns would sit there, readable by anyone with the stream, after every table forgot them. :func:`erase_entries`
reads each stream once (XRANGE in pages) and XDELs every entry that belongs to the user: its message (or, for
a dead letter, the raw text it kept) names the user's ``user_id``, or one of the user's sessions. An entry a
consumer group still has pending is deleted too: the consumers treat an entry deleted while pending as done
(shared/runtime/streams.py), which is what a deletion wants (it is never ingested or answered afterwards).

A dead letter's raw text may not be JSON at all; it is matched by the JSON spelling of the id
(``"user_id": "<id>"``), never by a bare substring (a short id would match everything).

:func:`delete_matching` removes keys by a SCAN pattern, with the id's glob characters escaped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable
from typing import Any

import redis.asyncio as aioredis

from shared.contracts.names import Names

PAGE = 1000
FIELD = "data"


def user_hash(user_id: str) -> str:
    """What a deletion record keeps of the user: a SHA-256 of the id (an operator who knows the id can check that
    it was deleted; the record itself names no one)."""
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def mesh_streams(names: Names) -> list[str]:
    """Every stream the mesh writes that can carry a user's message: the three streams and every dead letter."""
    streams = [names.user_input, names.ai_responses, names.memory_updates]
    return streams + [Names.dead(n) for n in (*names.all_bus_names(), names.ltm_warm, names.memory_forget)]


def ltm_streams(names: Names) -> list[str]:
    """The streams ltm may write (its Redis user's rights, mesh/acl.py): memory_updates and ltm's dead letters."""
    return [names.memory_updates, *(Names.dead(n) for n in (names.memory_updates, names.ltm_requests, names.ltm_warm))]


class _Matcher:
    def __init__(self, user_id: str, sessions: Collection[str]) -> None:
        self.user_id, self.sessions = user_id, set(sessions)
        ids = [user_id, *self.sessions]
        spellings = {json.dumps(i, ensure_ascii=a)[1:-1] for i in ids for a in (True, False)}
        spelled = "|".join(re.escape(s) for s in sorted(spellings))
        self._raw = re.compile(r'"(?:user_id|session_id)"\s*:\s*"(?:' + spelled + r')"')

    def named_in(self, fields: dict[Any, Any]) -> bool:
        """Whether a dead letter's own ``user_id``/``session_id`` fields (kept beside a truncated ``data``) name the
        user or one of the sessions."""
        def field(name: str) -> str | None:
            value = fields.get(name, fields.get(name.encode()))
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

        return field("user_id") == self.user_id or (bool(self.sessions) and field("session_id") in self.sessions)

    def owns(self, raw: Any) -> bool:
        if raw is None:
            return False
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser (a dead letter of such input)
            doc = None
        if isinstance(doc, dict):
            if doc.get("user_id") == self.user_id or (self.sessions and doc.get("session_id") in self.sessions):
                return True
            for key in ("users", "forget"):  # ltm_index_warm's users and forget, memory_forget's forget
                listed = doc.get(key)
                if isinstance(listed, list) and self.user_id in listed:
                    return True
        return bool(self._raw.search(text))


async def erase_entries(redis: aioredis.Redis, streams: Iterable[str], user_id: str,
                        sessions: Collection[str] = ()) -> dict[str, int]:
    """XDEL every entry of ``streams`` that belongs to ``user_id`` (or names one of ``sessions``); counts by stream
    (streams with none left out)."""
    match = _Matcher(user_id, sessions)
    removed: dict[str, int] = {}
    for stream in streams:
        start, doomed = "-", []
        while True:
            page: list[Any] = list(await redis.xrange(stream, min=start, max="+", count=PAGE) or [])
            last = ""
            for entry_id, fields in page:
                last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                raw = (fields or {}).get(FIELD, (fields or {}).get(FIELD.encode()))
                if match.owns(raw) or match.named_in(fields or {}):
                    doomed.append(last)
            if len(page) < PAGE:
                break
            start = "(" + last
        for i in range(0, len(doomed), PAGE):
            await redis.xdel(stream, *doomed[i:i + PAGE])
        if doomed:
            removed[stream] = len(doomed)
    return removed


async def delete_matching(redis: aioredis.Redis, pattern: str) -> int:
    """DEL every key that SCAN MATCH ``pattern`` finds; how many."""
    n = 0
    batch: list[Any] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            n += int(await redis.delete(*batch))
            batch = []
    if batch:
        n += int(await redis.delete(*batch))
    return n


__all__ = ["delete_matching", "erase_entries", "glob_escape", "ltm_streams", "mesh_streams", "user_hash"]
