"""``delete_user`` on the memory service: everything the conversation store and Redis hold of one user.

In one transaction: the user's messages and sessions (their context, links and summary go by ON DELETE CASCADE,
their ids leave ``conversation_session_ids`` by trigger), and the user's preferences (sensitive ones included);
the deletion is logged in ``user_deletions`` (a hash of the id, counts, never content). Every statement names the
user, so each reads or deletes one partition of its table (docs/partitioning.md); every row of a session carries
its session's user_id (migration 004), so nothing of the user is elsewhere. Then Redis: the STM of every
session of the user (turns, summary, meta, lock), the session-read cache (per-session and per-user generations
and every cached read of the user), chat_ai's reply-dedup keys of the user, and every stream entry that carries
the user's id or one of the user's sessions (shared/runtime/erase.py). Deleting twice is harmless: the second
time everything counts zero.

Long-term memory is ltm's ``delete_user``; ``mesh delete-user`` sends both (mesh/forget.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from shared.contracts.messages import UserDeletion
from shared.contracts.names import Names
from shared.runtime.erase import delete_matching, erase_entries, glob_escape, mesh_streams, user_hash
from shared.runtime.fence import lock_for_deletion
from shared.runtime.logging import get_logger

log = get_logger(__name__)

# counted before the DELETE (what the cascades take with the sessions), in this order
_COUNTS = ("conversation_messages", "conversation_context", "session_relationships", "session_summary")


async def delete_user_rows(pool: AsyncConnectionPool, user_id: str) -> tuple[dict[str, int], list[str]]:
    """Delete the user's rows; (counts by table, every session id of the user)."""
    async with pool.connection() as conn, conn.transaction():
        await lock_for_deletion(conn, user_id)  # request-path writes of the user wait, then see the deletion
        cur = await conn.execute("SELECT session_id FROM conversation_sessions WHERE user_id = %s FOR UPDATE",
                                 (user_id,))
        owned = [r[0] for r in await cur.fetchall()]
        counts: dict[str, int] = {}
        for table in _COUNTS:
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE user_id = %s").format(
                sql.Identifier(table)), (user_id,))
            row = await cur.fetchone()
            counts[table] = int(row[0]) if row else 0
        await conn.execute("DELETE FROM conversation_messages WHERE user_id = %s", (user_id,))
        cur = await conn.execute("DELETE FROM conversation_sessions WHERE user_id = %s", (user_id,))
        counts["conversation_sessions"] = cur.rowcount
        cur = await conn.execute("DELETE FROM user_preferences WHERE user_id = %s", (user_id,))
        counts["user_preferences"] = cur.rowcount
        await conn.execute("INSERT INTO user_deletions (user_hash, service, counts) VALUES (%s, 'memory', %s)",
                           (user_hash(user_id), Jsonb(counts)))
    return counts, owned


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
