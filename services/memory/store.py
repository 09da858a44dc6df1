"""The conversation store in PostgreSQL (sessions and messages). Every read is scoped by user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool


class SessionOwnershipError(Exception):
    """A message names a session that belongs to another user."""


@dataclass(slots=True)
class StoredMessage:
    message_id: str
    session_id: str
    user_id: str | None
    role: str  # human | ai | system
    content: str
    timestamp: float
    parent_message_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class ConversationStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def store_message(self, m: StoredMessage) -> bool:
        """Store once (idempotent by message_id); True when it was new."""
        async with self.pool.connection() as conn, conn.transaction():
            # Upsert the session and lock its row: message_index is assigned under that lock.
            cur = await conn.execute(
                "INSERT INTO conversation_sessions (session_id, user_id, created_at, last_activity)"
                " VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s))"
                " ON CONFLICT (session_id) DO UPDATE SET"
                "  user_id = COALESCE(conversation_sessions.user_id, EXCLUDED.user_id),"
                "  last_activity = GREATEST(conversation_sessions.last_activity, EXCLUDED.last_activity)"
                " RETURNING user_id, message_count",
                (m.session_id, m.user_id, m.timestamp, m.timestamp),
            )
            row = await cur.fetchone()
            assert row is not None
            owner, count = row
            if m.user_id is not None and owner != m.user_id:
                raise SessionOwnershipError("session belongs to another user")
            cur = await conn.execute(
                "INSERT INTO conversation_messages (message_id, session_id, user_id, role, content,"
                " message_index, parent_message_id, metadata, timestamp)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s)) ON CONFLICT (message_id) DO NOTHING",
                (m.message_id, m.session_id, m.user_id, m.role, m.content, count, m.parent_message_id,
                 Jsonb(m.metadata), m.timestamp),
            )
            if cur.rowcount == 0:
                return False
            await conn.execute(
                "UPDATE conversation_sessions SET message_count = message_count + 1 WHERE session_id = %s",
                (m.session_id,),
            )
            return True

    async def recent_messages(self, session_id: str, limit: int) -> list[StoredMessage]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT message_id, session_id, user_id, role, content, extract(epoch from timestamp),"
                " parent_message_id, metadata FROM conversation_messages WHERE session_id = %s"
                " ORDER BY message_index DESC LIMIT %s",
                (session_id, limit),
            )
            rows = await cur.fetchall()
        return [StoredMessage(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6], dict(r[7])) for r in reversed(rows)]
