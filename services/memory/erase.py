"""``delete_user`` on the memory service: everything the conversation store and Redis hold of one user.

In one transaction: the user's sessions (their messages, context, links and summary go by ON DELETE CASCADE),
the user's messages in sessions that belong to nobody (inputs of old clients without a ``user_id``), and the
user's preferences (sensitive ones included); the deletion is logged in ``user_deletions`` (a hash of the id,
counts, never content). Then Redis: the STM of every session the user wrote in (turns, summary, meta, lock),
the session-read cache (per-session and per-user generations and every cached read of the user), chat_ai's
reply-dedup keys of the user, and every stream entry that carries the user's id or one of the user's sessions
(shared/runtime/erase.py). Deleting twice is harmless: the second time everything counts zero.

Long-term memory is ltm's ``delete_user``; ``mesh delete-user`` sends both (mesh/forget.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from shared.contracts.messages import UserDeletion
from shared.contracts.names import Names
from shared.runtime.erase import delete_matching, erase_entries, glob_escape, mesh_streams, user_hash
from shared.runtime.logging import get_logger

log = get_logger(__name__)

# counted before the DELETE (what the cascades take with the sessions), in this order
_COUNTS = {
    "conversation_messages": "SELECT count(*) FROM conversation_messages WHERE user_id = %(u)s"
                             " OR session_id = ANY(%(owned)s)",
    "conversation_context": "SELECT count(*) FROM conversation_context WHERE session_id = ANY(%(owned)s)",
    "session_relationships": "SELECT count(*) FROM session_relationships"
                             " WHERE source_session_id = ANY(%(owned)s) OR target_session_id = ANY(%(owned)s)",
    "session_summary": "SELECT count(*) FROM session_summary WHERE session_id = ANY(%(owned)s)",
}


async def delete_user_rows(pool: AsyncConnectionPool, user_id: str) -> tuple[dict[str, int], list[str]]:
    """Delete the user's rows; (counts by table, every session id the user wrote in)."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("SELECT session_id FROM conversation_sessions WHERE user_id = %s FOR UPDATE",
                                 (user_id,))
        owned = [r[0] for r in await cur.fetchall()]
        cur = await conn.execute("SELECT DISTINCT session_id FROM conversation_messages WHERE user_id = %s"
                                 " AND NOT (session_id = ANY(%s))", (user_id, owned))
        elsewhere = [r[0] for r in await cur.fetchall()]
        counts: dict[str, int] = {}
        for table, sql in _COUNTS.items():
            cur = await conn.execute(sql, {"u": user_id, "owned": owned})
            row = await cur.fetchone()
            counts[table] = int(row[0]) if row else 0
        await conn.execute("DELETE FROM conversation_messages WHERE user_id = %s", (user_id,))
        cur = await conn.execute("DELETE FROM conversation_sessions WHERE user_id = %s", (user_id,))
        counts["conversation_sessions"] = cur.rowcount
        cur = await conn.execute("DELETE FROM user_preferences WHERE user_id = %s", (user_id,))
        counts["user_preferences"] = cur.rowcount
        await conn.execute("INSERT INTO user_deletions (user_hash, service, counts) VALUES (%s, 'memory', %s)",
                           (user_hash(user_id), Jsonb(counts)))
    return counts, owned + elsewhere


async def delete_user_keys(redis: aioredis.Redis, names: Names, user_id: str, sessions: list[str]) -> int:
    """The user's Redis keys: STM and locks of ``sessions``, the read cache, chat_ai's dedup keys."""
    keys: list[str] = []
    for s in sessions:
        keys += [names.stm_turns(s), names.stm_summary(s), names.stm_meta(s), names.lock("stm", s),
                 names.cache("memory", "gen", s)]
    keys.append(names.cache("memory", "ugen", user_id))
    n = 0
    for i in range(0, len(keys), 500):
        n += int(await redis.delete(*keys[i:i + 500]))
    user = glob_escape(user_id)
    n += await delete_matching(redis, glob_escape(names.cache("memory")) + f":*:{user}:*")
    n += await delete_matching(redis, glob_escape(names.reply_dedup(user_id)) + ":*")  # done and answering
    return n


async def delete_user(pool: AsyncConnectionPool, redis: aioredis.Redis, names: Names, user_id: str) -> UserDeletion:
    rows, sessions = await delete_user_rows(pool, user_id)
    keys = await delete_user_keys(redis, names, user_id, sessions)
    entries = await erase_entries(redis, mesh_streams(names), user_id, sessions)
    log.info("memory.user_deleted", rows=sum(rows.values()), sessions=len(sessions), keys=keys,
             stream_entries=sum(entries.values()))
    return UserDeletion(rows=rows, sessions=len(sessions), keys=keys, stream_entries=entries)
