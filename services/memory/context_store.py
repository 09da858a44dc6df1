"""Per-user data beside the conversation: session context entries, links between sessions and preferences
(sensitive ones encrypted with the service's key). Every statement names the user (one partition), and a session
another user holds behaves as a missing one (:class:`NotFound`), as in :mod:`services.memory.store`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.memory.crypto import Cipher
from shared.contracts.errors import BadRequest, NotFound
from shared.contracts.memory_api import ContextItem, SessionLink


class Conflict(BadRequest):
    """The request cannot be applied as asked (e.g. a session id another user already holds)."""


_CONTEXT_COLS = (
    "c.session_id, c.context_type, c.key, c.value, c.relevance_score, c.metadata,"
    " extract(epoch from c.updated_at)::float8, extract(epoch from c.expires_at)::float8"
)


def _context(r: Sequence[Any]) -> ContextItem:
    return ContextItem(session_id=r[0], context_type=r[1], key=r[2], value=r[3], relevance_score=r[4],
                       metadata=r[5], updated_at=r[6], expires_at=r[7])


class ContextStore:
    def __init__(self, pool: AsyncConnectionPool, cipher: Cipher | None = None) -> None:
        self.pool = pool
        self.cipher = cipher

    # ------------------------------------------------------------------ context
    async def store_context(self, user_id: str, session_id: str, context_type: str, key: str, value: Any, *,
                            relevance_score: float = 1.0, metadata: dict[str, Any] | None = None,
                            ttl_seconds: float | None = None, merge: bool = True) -> ContextItem:
        """Upsert one context entry; with ``merge`` two JSON objects are merged (the new keys win)."""
        expires = time.time() + ttl_seconds if ttl_seconds else None
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO conversation_context AS c (user_id, session_id, context_type, key, value,"
                " relevance_score, metadata, expires_at)"
                " SELECT s.user_id, s.session_id, %s, %s, %s, %s, %s, to_timestamp(%s) FROM conversation_sessions s"
                " WHERE s.session_id = %s AND s.user_id = %s"
                " ON CONFLICT (user_id, session_id, context_type, key) DO UPDATE SET"
                "  value = CASE WHEN %s AND jsonb_typeof(c.value) = 'object'"
                "   AND jsonb_typeof(EXCLUDED.value) = 'object'"
                "   AND (c.expires_at IS NULL OR c.expires_at > now())"
                "   THEN c.value || EXCLUDED.value ELSE EXCLUDED.value END,"
                "  relevance_score = EXCLUDED.relevance_score, metadata = c.metadata || EXCLUDED.metadata,"
                "  expires_at = EXCLUDED.expires_at, updated_at = now()"
                f" RETURNING {_CONTEXT_COLS}",
                (context_type, key, Jsonb(value), relevance_score, Jsonb(metadata or {}), expires, session_id,
                 user_id, merge),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound("no such session")
        return _context(row)

    async def get_context(self, user_id: str, session_id: str, context_type: str | None = None) -> list[ContextItem]:
        """Live (unexpired) entries, most relevant first."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT s.session_id IS NOT NULL, {_CONTEXT_COLS}"
                " FROM conversation_sessions s LEFT JOIN conversation_context c ON c.user_id = %s"
                "  AND c.session_id = s.session_id"
                "  AND (%s::text IS NULL OR c.context_type = %s) AND (c.expires_at IS NULL OR c.expires_at > now())"
                " WHERE s.session_id = %s AND s.user_id = %s ORDER BY c.relevance_score DESC, c.updated_at DESC",
                (user_id, context_type, context_type, session_id, user_id),
            )
            rows = await cur.fetchall()
        if not rows:
            raise NotFound("no such session")
        return [_context(r[1:]) for r in rows if r[1] is not None]

    async def cleanup_expired_data(self, user_id: str | None) -> dict[str, int]:
        """Delete expired context entries (of one user, or of everyone for the service's own sweep)."""
        async with self.pool.connection() as conn:
            if user_id is not None:
                cur = await conn.execute(
                    "DELETE FROM conversation_context WHERE user_id = %s AND expires_at <= now()", (user_id,))
            else:  # the periodic sweep across users: every partition (the partial expiry index of each)
                cur = await conn.execute("DELETE FROM conversation_context WHERE expires_at <= now()")
            return {"context": cur.rowcount}

    # ------------------------------------------------------------------ links
    async def link_sessions(self, user_id: str, source: str, target: str, relation_type: str,
                            strength: float) -> SessionLink:
        if source == target:
            raise Conflict("a session cannot be linked to itself")
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO session_relationships AS r (user_id, source_session_id, target_session_id, relation_type,"
                " strength)"
                " SELECT a.user_id, a.session_id, b.session_id, %s, %s"
                " FROM conversation_sessions a, conversation_sessions b"
                " WHERE a.session_id = %s AND b.session_id = %s AND a.user_id = %s AND b.user_id = %s"
                " ON CONFLICT (user_id, source_session_id, target_session_id, relation_type) DO UPDATE SET"
                "  strength = EXCLUDED.strength"
                " RETURNING source_session_id, target_session_id, relation_type, strength",
                (relation_type, strength, source, target, user_id, user_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound("no such session")
        return SessionLink(source_session_id=row[0], target_session_id=row[1], relation_type=row[2], strength=row[3])

    async def session_links(self, user_id: str, session_id: str) -> list[SessionLink]:
        """Links from or to the session (both ends are the user's: links are only made that way)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT r.source_session_id, r.target_session_id, r.relation_type, r.strength"
                " FROM session_relationships r WHERE r.user_id = %s"
                " AND (r.source_session_id = %s OR r.target_session_id = %s) ORDER BY r.strength DESC, r.created_at",
                (user_id, session_id, session_id),
            )
            return [SessionLink(source_session_id=r[0], target_session_id=r[1], relation_type=r[2], strength=r[3])
                    for r in await cur.fetchall()]

    # ------------------------------------------------------------------ preferences
    async def set_preference(self, user_id: str, key: str, value: Any, sensitive: bool = False) -> None:
        if sensitive:
            if self.cipher is None:
                raise Conflict("no encryption key is configured for sensitive preferences")
            plain, secret = None, self.cipher.encrypt(value)
        else:
            plain, secret = Jsonb(value), None
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO user_preferences (user_id, key, value, value_encrypted, sensitive)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id, key) DO UPDATE SET value = EXCLUDED.value,"
                " value_encrypted = EXCLUDED.value_encrypted, sensitive = EXCLUDED.sensitive, updated_at = now()",
                (user_id, key, plain, secret, sensitive),
            )

    async def get_preferences(self, user_id: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT key, value, value_encrypted, sensitive FROM user_preferences WHERE user_id = %s"
                " AND (%s::text[] IS NULL OR key = ANY(%s)) ORDER BY key",
                (user_id, list(keys) if keys is not None else None, list(keys) if keys is not None else None),
            )
            rows = await cur.fetchall()
        out: dict[str, Any] = {}
        for key, value, secret, sensitive in rows:
            if sensitive:
                if self.cipher is None:
                    raise Conflict("no encryption key is configured for sensitive preferences")
                out[key] = self.cipher.decrypt(bytes(secret))
            else:
                out[key] = value
        return out
