"""PostgreSQL + pgvector storage of long-term memories. Every query is scoped by user_id.

The tables are hash-partitioned by user_id (migration 006, docs/partitioning.md): a query that names one user reads
one partition of each table. A statement for many users at once (an ingest batch, the access-count flush) names
each user in its own branch or statement, so that each part is pruned to its user's partition when it is planned.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.ltm import retrieval
from services.ltm.config import LtmSettings
from services.ltm.retrieval import RetrievalConfig
from services.ltm.search_index import SearchIndex
from shared.contracts import Memory, MemorySource
from shared.contracts.messages import SearchData
from shared.runtime.erase import user_hash
from shared.runtime.fence import lock_for_deletion, refuse_if_deleted

_WS = re.compile(r"\s+")
# every table with a user's rows, in deletion order (ltm_search_epochs last: deleting memories writes it; the
# documents' tables: services/ltm/documents/store.py DOC_TABLES)
USER_TABLES = ("ltm_memory_entities", "ltm_relations", "ltm_memories", "ltm_entities", "ltm_ingested",
               "ltm_profiles", "ltm_archive", "ltm_user_state", "ltm_doc_chunks", "ltm_documents",
               "ltm_search_deletions", "ltm_search_epochs")
# a whole user's deletion gives the user a new epoch instead of logging each row (migration 012): every index that
# holds the user drops it, and the log's rows go with the rest
_EPOCH_DELETION = "SET LOCAL mesh.search_deletions = 'epoch'"
SEARCH_INDEX_ROWS = LtmSettings.model_fields["ltm_search_index_rows"].default
# the archived rows merged into a memory, and those merged into them before (consolidation leaves an older merge's
# merged_into pointing at the memory that was later archived in its turn)
DELETE_MERGED = (
    "WITH RECURSIVE merged (memory_id) AS ("
    " SELECT memory_id FROM ltm_archive WHERE user_id = %(u)s AND merged_into = %(m)s"
    " UNION SELECT a.memory_id FROM ltm_archive a JOIN merged g ON a.merged_into = g.memory_id"
    " WHERE a.user_id = %(u)s)"
    " DELETE FROM ltm_archive WHERE user_id = %(u)s AND memory_id IN (SELECT memory_id FROM merged)"
)


def content_hash(text: str) -> str:
    return hashlib.sha256(_WS.sub(" ", text.strip().lower()).encode()).hexdigest()


@dataclass(slots=True)
class NewMemory:
    user_id: str
    type: str
    content: str
    embedding: np.ndarray
    confidence: float = 1.0
    entities: list[str] = field(default_factory=list)
    message_id: str | None = None
    session_id: str | None = None
    timestamp: float | None = None
    speaker: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    salience: float | None = None  # services/ltm/salience (LTM_SALIENCE); None: not scored
    tokens: int | None = None  # WordPiece tokens of content (retrieval.token_counts); None: counted at search


COLUMNS = (
    "memory_id, type, content, confidence, entities, source_message_id, source_session_id,"
    " source_timestamp, speaker, extract(epoch from created_at) AS created_at,"
    " extract(epoch from last_accessed) AS last_accessed, access_count"
)

INSERT = (
    "INSERT INTO ltm_memories (memory_id, user_id, type, content, content_hash, embedding, confidence,"
    " entities, source_message_id, source_session_id, source_timestamp, speaker, meta, salience, content_tokens)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (user_id, type, content_hash) DO UPDATE"
    " SET confidence = GREATEST(ltm_memories.confidence, EXCLUDED.confidence)"
)
INSERT_RETURNING = INSERT + " RETURNING " + COLUMNS
INSERT_MANY = INSERT.replace("VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                             "VALUES {values}")


def to_memory(row: dict[str, Any], similarity: float = 0.0, score: float | None = None) -> Memory:
    return Memory(
        memory_id=str(row["memory_id"]),
        type=row["type"],
        content=row["content"],
        similarity=similarity,
        score=similarity if score is None else score,
        confidence=float(row["confidence"]),
        created_at=float(row["created_at"]),
        last_accessed=float(row["last_accessed"]) if row["last_accessed"] is not None else None,
        access_count=int(row["access_count"]),
        entities=list(row["entities"] or []),
        source=MemorySource(
            message_id=row["source_message_id"],
            session_id=row["source_session_id"],
            timestamp=row["source_timestamp"],
            speaker=row["speaker"],
        ),
    )


MemoryKey = tuple[str, str, str]
"""(user_id, type, content_hash): the unique key of a memory."""


@dataclass(slots=True)
class IngestWrite:
    """One update's rows: its idempotency key, its memories, and what ``then`` writes for it."""

    user_id: str
    message_id: str
    memories: list[NewMemory]
    knowledge: Any = None


def values(rows: int, width: int) -> str:
    """``(%s, ...), (%s, ...)``: the placeholders of a multi-row VALUES list."""
    one = "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([one] * rows)


async def insert_memories(conn: AsyncConnection, memories: Sequence[NewMemory]) -> dict[MemoryKey, uuid.UUID]:
    """Insert memories in one statement (a repeat of a key keeps the first, as one insert after another would);
    returns the id of each key, new or existing."""
    first: dict[MemoryKey, NewMemory] = {}
    for m in memories:
        key = (m.user_id, m.type, content_hash(m.content))
        if key in first:  # ON CONFLICT keeps the row and the higher confidence
            first[key] = replace(first[key], confidence=max(first[key].confidence, m.confidence))
        else:
            first[key] = m
    if not first:
        return {}
    ordered = sorted(first.items(), key=lambda kv: kv[0])
    cur = await conn.execute(
        INSERT_MANY.format(values=values(len(ordered), 15)) + " RETURNING user_id, type, content_hash, memory_id",
        [p for _, m in ordered for p in _params(m)])
    return {(r[0], r[1], r[2]): r[3] for r in await cur.fetchall()}


def _params(m: NewMemory) -> tuple[Any, ...]:
    return (
        uuid.uuid4(), m.user_id, m.type, m.content, content_hash(m.content), m.embedding, m.confidence,
        m.entities, m.message_id, m.session_id, m.timestamp, m.speaker, Jsonb(m.meta), m.salience, m.tokens,
    )


class LtmStore:
    def __init__(self, pool: AsyncConnectionPool, search_index_rows: int = SEARCH_INDEX_ROWS,
                 index_load_wait_s: float = 0.0) -> None:
        """``search_index_rows``: the capacity of this process's search index (services/ltm/search_index.py;
        LTM_SEARCH_INDEX_ROWS, 0 = every search in SQL); ``index_load_wait_s``: LTM_INDEX_LOAD_WAIT_MS."""
        self.pool = pool
        self._access: Counter[tuple[str, str]] = Counter()  # (user_id, memory_id) -> uses
        self.index = SearchIndex(pool, search_index_rows, index_load_wait_s)

    async def ingest_many(self, writes: Sequence[IngestWrite],
                          then: Callable[[AsyncConnection, list[IngestWrite], dict[MemoryKey, uuid.UUID]],
                                         Awaitable[object]] | None = None) -> list[bool]:
        """Store the memories of many updates in one transaction, each update once: per write, False when its
        update was already ingested (or is a repeat within ``writes``).

        ``then(conn, fresh, ids)`` runs in the same transaction after the memories are written, with the writes
        that were new and the memory id of every (user, type, content hash) written (the extracted knowledge).
        Rows are written in key order, so that concurrent batches never wait on each other in a cycle.
        """
        keys = [(w.user_id, w.message_id) for w in writes]
        async with self.pool.connection() as conn, conn.transaction():
            # each row goes to its user's partition (an insert routes row by row)
            cur = await conn.execute(
                "INSERT INTO ltm_ingested (user_id, message_id) SELECT * FROM unnest(%s::text[], %s::text[])"
                " ON CONFLICT DO NOTHING RETURNING user_id, message_id",
                ([u for u, _ in keys], [m for _, m in keys]))
            new = {(r[0], r[1]) for r in await cur.fetchall()}
            stored, fresh = [], []
            for key, w in zip(keys, writes, strict=True):
                stored.append(key in new)
                if key in new:
                    new.discard(key)  # a repeat of the same update within the batch is a duplicate
                    fresh.append(w)
            ids = await insert_memories(conn, [m for w in fresh for m in w.memories])
            if then is not None and fresh:
                await then(conn, fresh, ids)
        return stored

    async def ingested(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (user_id, message_id) were ingested already, in one query (a cheap pre-check; :meth:`ingest_many`
        stays the guarantee)."""
        if not keys:
            return set()
        by_user: dict[str, list[str]] = {}
        for user_id, message_id in keys:
            by_user.setdefault(user_id, []).append(message_id)
        users = sorted(by_user)
        # one branch per user (a constant user_id each: one partition each), one round trip
        branch = "(SELECT user_id, message_id FROM ltm_ingested WHERE user_id = %s AND message_id = ANY(%s::text[]))"
        async with self.pool.connection() as conn:
            cur = await conn.execute(" UNION ALL ".join([branch] * len(users)),
                                     [p for u in users for p in (u, by_user[u])])
            return {(r[0], r[1]) for r in await cur.fetchall()}

    async def add(self, m: NewMemory) -> Memory:
        async with self.pool.connection() as conn, conn.transaction():
            await refuse_if_deleted(conn, m.user_id, "ltm")  # a deletion that overtook this request (``add``)
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(INSERT_RETURNING, _params(m))
            row = await cur.fetchone()
        assert row is not None
        return to_memory(row, similarity=1.0)

    async def search(self, user_id: str, data: SearchData, embedding: np.ndarray,
                     config: RetrievalConfig) -> list[Memory]:
        """The hybrid query path (services/ltm/retrieval.py); returned memories count as accessed."""
        out = await retrieval.search(self.pool, user_id, data, embedding, config, self.index)
        self.record_access(user_id, (m.memory_id for m in out))
        return out

    # ---- access statistics: counted in memory, written per flush in one statement per user (pipelined)
    def record_access(self, user_id: str, memory_ids: Any) -> None:
        self._access.update((user_id, str(m)) for m in memory_ids)

    async def flush_access(self) -> int:
        if not self._access:
            return 0
        batch, self._access = self._access, Counter()
        by_user: dict[str, tuple[list[str], list[int]]] = {}
        for (user_id, memory_id), n in batch.items():
            ids, counts = by_user.setdefault(user_id, ([], []))
            ids.append(memory_id)
            counts.append(n)
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(
                "UPDATE ltm_memories m SET access_count = m.access_count + a.n, last_accessed = now()"
                " FROM unnest(%s::uuid[], %s::int[]) AS a(id, n) WHERE m.user_id = %s AND m.memory_id = a.id",
                [(ids, counts, user_id) for user_id, (ids, counts) in sorted(by_user.items())],
            )
        return len(batch)

    # ---- profiles
    async def get_profile(self, user_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT explicit, updated FROM ltm_profiles WHERE user_id = %s", (user_id,))
            row = await cur.fetchone()
        explicit = dict(row["explicit"]) if row else {}
        return {"user_id": user_id, **explicit, "_updated": dict(row["updated"]) if row else {}}

    async def update_profile(self, user_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        stamps = {k: now for k in fields}
        async with self.pool.connection() as conn, conn.transaction():
            await refuse_if_deleted(conn, user_id, "ltm")  # a deletion that overtook this request
            await conn.execute(
                "INSERT INTO ltm_profiles (user_id, explicit, updated) VALUES (%s, %s, %s)"
                " ON CONFLICT (user_id) DO UPDATE SET explicit = ltm_profiles.explicit || EXCLUDED.explicit,"
                " updated = ltm_profiles.updated || EXCLUDED.updated, updated_at = now()",
                (user_id, Jsonb(fields), Jsonb(stamps)),
            )
        return await self.get_profile(user_id)

    # ---- deletion and stats
    async def delete(self, user_id: str, memory_id: str) -> bool:
        """The memory and, in the same transaction, what still holds it: the graph relations it states
        (``ltm_relations.memory_id``, no foreign key) and the archived duplicates merged into it, or into one of
        those (``ltm_archive.merged_into``: their whole rows, content included). Its entity links go by their
        foreign key. False when the user has no such memory."""
        try:
            mid = uuid.UUID(memory_id)
        except ValueError:
            return False
        params = {"u": user_id, "m": mid}
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM ltm_memories WHERE user_id = %(u)s AND memory_id = %(m)s", params)
            if cur.rowcount == 0:
                return False
            await conn.execute("DELETE FROM ltm_relations WHERE user_id = %(u)s AND memory_id = %(m)s", params)
            await conn.execute(DELETE_MERGED, params)
        return True

    async def delete_user(self, user_id: str) -> dict[str, int]:
        """Every row of the user in every ltm table, in one transaction, logged in ``user_deletions`` without
        content; the process's index entry goes too (the other processes drop theirs on ``ltm_index_warm``)."""
        counts: dict[str, int] = {}
        async with self.pool.connection() as conn, conn.transaction():
            await lock_for_deletion(conn, user_id)  # request-path writes of the user wait, then see the deletion
            await conn.execute(_EPOCH_DELETION)
            for table in USER_TABLES:
                cur = await conn.execute(f"DELETE FROM {table} WHERE user_id = %s", (user_id,))
                counts[table] = cur.rowcount
            await conn.execute("INSERT INTO user_deletions (user_hash, service, counts) VALUES (%s, 'ltm', %s)",
                               (user_hash(user_id), Jsonb(counts)))
        self.index.drop(user_id)
        return counts

    async def list_memories(self, user_id: str, limit: int, offset: int, types: list[str] | None) -> list[Memory]:
        """A page of the user's memories, newest first (the user's index, one partition)."""
        where, params = "user_id = %s", [user_id]
        if types:
            where += " AND type = ANY(%s)"
        query = (f"SELECT {COLUMNS} FROM ltm_memories WHERE {where}"
                 " ORDER BY created_at DESC, memory_id LIMIT %s OFFSET %s")
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, (*params, *([types] if types else []), limit, offset))
            cur_rows = await cur.fetchall()
            names = [d.name for d in cur.description or []]
        return [to_memory(dict(zip(names, r, strict=True)), 1.0) for r in cur_rows]

    async def stats(self, user_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT type, count(*) FROM ltm_memories WHERE user_id = %s GROUP BY type", (user_id,)
            )
            by_type = {t: n for t, n in await cur.fetchall()}
        return {"memories": sum(by_type.values()), "by_type": by_type}
