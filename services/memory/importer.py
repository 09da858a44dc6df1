"""``import_messages``: a batch of one user's past turns into the conversation store, STM and memory_updates.

One batch is one PostgreSQL transaction of four statements, whatever its size:

1. upsert the batch's sessions for the user (created with the time of their first turn), locking their rows in
   session-id order, so concurrent writers of a session (live turns, another import) wait and message indexes
   stay consecutive; a session another user holds fails the whole batch (:class:`NotFound`, rolled back);
2. find which message ids are stored already (duplicates: not stored, not published again);
3. insert the new messages in one multi-row statement (``unnest`` of arrays), in timestamp order, with their own
   timestamps; the insert trigger keeps each session's counts and activity times (migration 002);
4. before the commit, the MemoryUpdates of the new messages go out in one MULTI (stream + pub/sub mirror, the
   same commands as a live turn). If Redis fails, the transaction rolls back and nothing of the batch is applied;
   if the commit itself fails after the MULTI, the updates are out without their rows: a retry stores the rows
   and publishes them again, and ltm ingests each message id once. So an update is never lost.

After the commit the session cache is invalidated and each session's STM is rebuilt from PostgreSQL once (the
same :meth:`StmWriter.rehydrate` as after a Redis loss: the stored summary, the newest ``STM_MAX_MESSAGES`` turns as
the window, older ones folded into the summary). A re-import rebuilds the STM again (idempotent), which also
repairs one that an interrupted import left behind. Turns imported into a live session with timestamps older than
its window are folded into its summary by that rebuild, whatever the summary covered before (services/memory/stm.py:
the summary's fold point goes by message index, not by time).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg import AsyncConnection, errors

from services.memory.cache import SessionCache
from services.memory.carry import Carrier, Embedded
from services.memory.salience import MessageSalience
from services.memory.stm import StmWriter
from services.memory.store import NOBODY, SESSION_IDS_KEY, ConversationStore, NotFound, StoredMessage
from services.memory.tokens import TokenCounter
from services.memory.updates import Publish, memory_update
from shared.contracts.errors import BadRequest
from shared.contracts.memory_api import ImportMessage, ImportResult, import_message_id
from shared.runtime.fence import refuse_if_deleted
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.runner import batch

log = get_logger(__name__)

STM_PARALLEL = 4  # sessions whose STM is rebuilt at once (each takes a pool connection and a Redis lock)
IMPORT_STEP_TOKENS = 512  # one forward pass of an import's embedding (shared/runtime/passes.py)

# a session id another user holds fails the statement (migration 004's trigger): the batch is rolled back
_UPSERT_SESSIONS = (
    "INSERT INTO conversation_sessions AS s (session_id, user_id, created_at, last_activity)"
    " SELECT u.sid, %(uid)s, to_timestamp(u.ts), to_timestamp(u.ts)"
    " FROM unnest(%(sids)s::text[], %(firsts)s::float8[]) AS u(sid, ts) ORDER BY u.sid"
    " ON CONFLICT (user_id, session_id) DO UPDATE SET created_at = LEAST(s.created_at, EXCLUDED.created_at)"
    " RETURNING session_id, message_count"
)
_INSERT_MESSAGES = (
    "INSERT INTO conversation_messages (message_id, session_id, user_id, role, content, message_index, metadata,"
    " token_count, timestamp)"
    " SELECT u.mid, u.sid, %(uid)s, u.role, u.content, u.idx, u.meta::jsonb, u.tokens, to_timestamp(u.ts)"
    " FROM unnest(%(mids)s::text[], %(sids)s::text[], %(roles)s::text[], %(contents)s::text[], %(idxs)s::int[],"
    "  %(metas)s::text[], %(tokens)s::int[], %(tss)s::float8[]) AS u(mid, sid, role, content, idx, meta, tokens, ts)"
    " ON CONFLICT (user_id, message_id) DO NOTHING RETURNING message_id"
)


class HistoryImporter:
    def __init__(self, store: ConversationStore, stm: StmWriter, cache: SessionCache, counter: TokenCounter,
                 metrics: Metrics, publish: Publish | None, max_batch: int, *, carrier: Carrier | None = None,
                 salience: MessageSalience | None = None) -> None:
        self.store, self.stm, self.cache, self.counter, self.metrics = store, stm, cache, counter, metrics
        self._publish = publish
        self.max_batch = max_batch
        self.carrier = carrier  # MEMORY_CARRY_VECTORS: new messages embedded here, their vectors on their updates
        self.salience = salience  # STM_SALIENCE_WEIGHT > 0: their STM scores stored with the vectors

    async def import_messages(self, user_id: str, messages: Sequence[ImportMessage]) -> ImportResult:
        if len(messages) > self.max_batch:
            raise BadRequest(f"import_messages takes at most {self.max_batch} messages per request "
                             f"(MEMORY_IMPORT_MAX_BATCH); this one has {len(messages)}: send smaller batches")
        started = time.perf_counter()
        batch: dict[str, StoredMessage] = {}
        for msg in messages:  # the first of repeated ids wins; the rest count as duplicates
            mid = import_message_id(user_id, msg)
            batch.setdefault(mid, StoredMessage(message_id=mid, session_id=msg.session_id, user_id=user_id,
                                                role=msg.store_role, content=msg.content, timestamp=msg.timestamp,
                                                metadata=msg.meta))
        rows = sorted(batch.values(), key=lambda m: m.timestamp)  # stable: equal times keep the batch's order
        known = await self._stored_ids(None, user_id, [m.message_id for m in rows])  # a hint; the transaction re-checks
        fresh = [m for m in rows if m.message_id not in known]  # token counts are the costly part: new ones only
        counts = await asyncio.to_thread(lambda: [self.counter.count(m.content) for m in fresh])
        for m, n in zip(fresh, counts, strict=True):
            m.token_count = n
        sessions = sorted({m.session_id for m in rows})
        # one embedding per message: the new ones' vectors before the transaction (not inside it), carried on their
        # updates and stored after the commit
        embedded = await self.carrier.embed_many(fresh, IMPORT_STEP_TOKENS) if self.carrier is not None else {}
        inserted, published = await self._store(user_id, rows, sessions, known, embedded)
        if embedded and inserted:
            await self._store_vectors([m for m in rows if m.message_id in inserted], embedded)
        await self._invalidate_cache(user_id, sessions)
        await self._rebuild_stm(user_id, sessions)
        result = ImportResult(imported=len(inserted), duplicates=len(messages) - len(inserted),
                              sessions=len(sessions), updates_published=published)
        self.metrics.incr("import_batches")
        self.metrics.incr("imported", result.imported)
        self.metrics.incr("import_duplicates", result.duplicates)
        log.info("memory.imported", imported=result.imported, duplicates=result.duplicates, sessions=len(sessions),
                 updates=published, ms=round((time.perf_counter() - started) * 1000, 1))
        return result

    async def _store(self, user_id: str, rows: list[StoredMessage], sessions: list[str],
                     known: set[str], embedded: Mapping[str, Embedded]) -> tuple[set[str], int]:
        """One transaction: sessions, duplicates, the new rows, then their MemoryUpdates before the commit."""
        firsts: dict[str, float] = {}
        for m in rows:
            firsts.setdefault(m.session_id, m.timestamp)
        async with self.store.pool.connection() as conn, conn.transaction():
            await refuse_if_deleted(conn, user_id, "memory")  # a deletion that overtook this request
            try:
                cur = await conn.execute(_UPSERT_SESSIONS, {"uid": user_id, "sids": sessions,
                                                            "firsts": [firsts[s] for s in sessions]})
            except errors.UniqueViolation as exc:
                if exc.diag.constraint_name != SESSION_IDS_KEY:
                    raise
                # raising rolls the transaction back: nothing of the batch is applied
                raise NotFound(f"session_id {exc.diag.message_detail!r} is another user's session; nothing of this"
                               " batch was imported") from None
            next_index: dict[str, int] = {sid: count for sid, count in await cur.fetchall()}
            stored = await self._stored_ids(conn, user_id, [m.message_id for m in rows])
            new = [m for m in rows if m.message_id not in stored]
            if not new:
                return set(), 0
            indexes = []
            for m in new:
                if m.message_id in known:  # stored at the hint, gone since (its session deleted): count it now
                    m.token_count = self.counter.count(m.content)
                indexes.append(next_index[m.session_id])
                next_index[m.session_id] += 1
            cur = await conn.execute(_INSERT_MESSAGES, {
                "uid": user_id, "mids": [m.message_id for m in new], "sids": [m.session_id for m in new],
                "roles": [m.role for m in new], "contents": [m.content for m in new], "idxs": indexes,
                "metas": [json.dumps(m.metadata) for m in new], "tokens": [m.token_count for m in new],
                "tss": [m.timestamp for m in new],
            })
            inserted = {r[0] for r in await cur.fetchall()}  # short of `new` only if a live turn took an id meanwhile
            published = await self._publish_updates([m for m in new if m.message_id in inserted], embedded)
        return inserted, published

    async def _stored_ids(self, conn: AsyncConnection[Any] | None, user_id: str, ids: list[str]) -> set[str]:
        sql = "SELECT message_id FROM conversation_messages WHERE user_id = %s AND message_id = ANY(%s)"
        if conn is None:
            async with self.store.pool.connection() as own:
                cur = await own.execute(sql, (user_id, ids))
                return {r[0] for r in await cur.fetchall()}
        cur = await conn.execute(sql, (user_id, ids))
        return {r[0] for r in await cur.fetchall()}

    async def _publish_updates(self, new: list[StoredMessage], embedded: Mapping[str, Embedded]) -> int:
        if self._publish is None:
            return 0
        updates = []
        for m in new:  # in time order: the carried salience follows each session's published turns in order
            update = memory_update(m, self.metrics)
            if update is None:
                continue
            if self.carrier is not None and (e := embedded.get(m.message_id)) is not None:
                update.embedding = self.carrier.carried(m, e)
            updates.append(update)
        if updates:
            async with batch(self.stm.redis) as pipe:
                for update in updates:
                    self._publish(pipe, update)
                await pipe.execute()
        return len(updates)

    async def _store_vectors(self, messages: list[StoredMessage], embedded: Mapping[str, Embedded]) -> None:
        """The imported messages' vectors (and STM scores) for search_messages. After the commit, so a failure here
        loses nothing: the rows are in, and the background job embeds what has no vector yet (counted, logged)."""
        scores = self.salience.score_embedded(messages, embedded) if self.salience is not None else {}
        try:
            await self.store.set_embeddings([(m.user_id or NOBODY, m.message_id, embedded[m.message_id].vector,
                                              scores.get(m.message_id)) for m in messages if m.message_id in embedded])
        except Exception as exc:  # noqa: BLE001 - best effort: the background job embeds these messages instead
            self.metrics.incr("carry.store_failed", len(messages))
            log.warning("memory.import_vectors_not_stored", error=type(exc).__name__, messages=len(messages))

    async def _invalidate_cache(self, user_id: str, sessions: list[str]) -> None:
        if not self.cache.enabled:
            return
        async with self.stm.redis.pipeline(transaction=False) as pipe:
            for sid in sessions:
                self.cache.queue_invalidate(pipe, sid, None)
            self.cache.queue_invalidate(pipe, None, user_id)
            await pipe.execute()

    async def _rebuild_stm(self, user_id: str, sessions: list[str]) -> None:
        limit = asyncio.Semaphore(STM_PARALLEL)

        async def one(sid: str) -> None:
            async with limit:
                await self.stm.rehydrate(sid, user_id)

        try:
            async with asyncio.TaskGroup() as tg:
                for sid in sessions:
                    tg.create_task(one(sid))
        except* Exception as group:  # noqa: BLE001 - re-raised
            raise group.exceptions[0] from None  # one error makes one reply (the rows are committed: a retry repairs)
