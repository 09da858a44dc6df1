"""The first stage of a search without a scan in SQL: each ltm process's in-memory index of recently searched users.

The SQL candidate stage (``retrieval._CANDIDATES``) reads every memory of the user on every search: the cosine
of each to the query, BM25 over the english tsvectors (document frequencies and lengths of the user's own
memories) and the z-score statistics over all of them. This index computes the same numbers from a copy of what
they depend on, held per user in this process: each memory's embedding (float32, as stored), its lexemes with
their counts (PostgreSQL's own ``search_tsv``; the query's lexemes come from ``to_tsvector`` too), its type and
session (for the filters). The embeddings of a 10k-memory user are a 15 MB matrix: one product with the query,
about a millisecond, where the SQL stage reads and detoasts 10k rows.

Kept in step with PostgreSQL (migration 004):

- A user is loaded in the background on its first search (which, like any search of a user not indexed, runs
  the SQL stage), in one REPEATABLE READ snapshot that also gives the oldest transaction still running
  (``pg_snapshot_xmin``) and the user's deletion epoch.
- Every search first runs one small statement (with the query's lexemes): the rows of the user whose ``txid``
  (the writing transaction) is not older than the oldest transaction running at the previous read. A row
  whose transaction commits late is therefore read on a later search, never missed; a row read twice counts
  once. Ingest, in any process, is seen by the next search.
- A row updated in place (uses, confidence, supersession...) gets a new ``txid`` (trigger): it is read again
  like a new one. A deleted row is logged in ``ltm_search_deletions`` with the deleting transaction's ``txid``
  (migration 012), read by the same statement under the same rule, and dropped from the entry (HeldUser.remove):
  a deletion costs what it deletes. A change of embedding, content, type or session, or the deletion of the
  whole user, gives the user a new epoch (trigger): the user is loaded again; so does a log pruned past the
  entry's last read (``log_floor``).
- At most ``capacity`` rows over all users; the least recently searched users are dropped first. A user larger
  than the capacity (or ``capacity`` 0) is not indexed: :meth:`SearchIndex.candidates` returns None and the
  caller runs the SQL stage.

:meth:`SearchIndex.candidates` returns what the SQL stage's ranking columns hold: the best ``limit`` memory ids
by ``wd * sim / sd(sim) + wk * bm25 / sd(bm25)``, in that order, with sim, bm25 and the statistics n, sim_mean,
sim_sd, s1, s2 (equal to the SQL stage up to float32 rounding of the cosine).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.ltm.candidates import Candidates
from services.ltm.held import ROW_COLUMNS, HeldUser, first_stage, xid
from shared.contracts.messages import SearchData
from shared.runtime.logging import get_logger

if TYPE_CHECKING:
    from services.ltm.retrieval import RetrievalConfig

log = get_logger(__name__)

LOAD_CHUNK = 500  # rows read and indexed between two turns of the event loop (a load a search started)
WARM_CHUNK = 100  # the same while warming: a request that comes meanwhile waits for one chunk (a few ms)
WARM_YIELD_S = 2.0  # a warming load waits for requests at most this long in all (it holds a snapshot open)
TOO_LARGE_S = 600.0  # a user too large for the index is searched in SQL; loading it is tried again after this
_ROW_COST = 16  # per user, in rows: what an entry costs besides its memories (empty users count too)

# One memory as the index holds it: the row, the transaction that last wrote it, the embedding (pgvector's binary
# send format: 4 header bytes, then big-endian float32), and the lexemes of search_tsv with their counts.
_ROW = f"""
SELECT {ROW_COLUMNS}, m.txid::text AS txid, vector_send(m.embedding) AS vec, coalesce(t.lx, '{{}}') AS lx,
       coalesce(t.tf, '{{}}') AS tf
FROM ltm_memories m CROSS JOIN LATERAL (
    SELECT array_agg(u.lexeme) AS lx, array_agg(coalesce(array_length(u.positions, 1), 1)) AS tf
    FROM unnest(m.search_tsv) AS u
) AS t
WHERE m.user_id = %(user_id)s"""

# Before a load: a user with memories gets an epoch row if it has none. Without one, the index held the user with
# epoch NULL, and a deletion of the whole user (which removes the row too) left it NULL: an index of another process
# that missed the deletion's broadcast could not tell and kept the deleted rows (store.delete_user). So an entry holds
# memories only with an epoch: a load that read memories but no epoch (written between the two) is not installed,
# and a user held while it had no memories (no row: a user without memories gets none, so that nothing names a
# deleted user whom a late warm or search loads again) is loaded again, with its row, once memories come.
_EPOCH_ROW = """
INSERT INTO ltm_search_epochs (user_id, epoch)
SELECT %(user_id)s, nextval('ltm_search_epoch_seq')
WHERE EXISTS (SELECT 1 FROM ltm_memories WHERE user_id = %(user_id)s)
ON CONFLICT (user_id) DO NOTHING"""

_STATE = """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon, e.epoch,
       (SELECT coalesce(array_agg(lexeme), '{}') FROM unnest(to_tsvector('english', %(query)s))) AS qlx,
       e.log_floor::text AS floor
FROM (SELECT 1) AS one LEFT JOIN ltm_search_epochs e ON e.user_id = %(user_id)s"""

# Before each search, one statement (one snapshot): the state, then which rows were written since, and by which
# transaction, and which were deleted since (gone: the deletion log, migration 012) (LEFT JOIN: the state also when
# nothing was). Only the rows not held as they are now are then read (_ROW ... AND memory_id = ANY): when a long
# transaction holds the horizon back, the same rows come back here again, not their embeddings.
_CHANGES = f"""
SELECT s.horizon, s.epoch, s.qlx, s.floor, r.memory_id, r.txid, r.gone
FROM ({_STATE}) AS s
LEFT JOIN LATERAL (
    SELECT m.memory_id, m.txid::text AS txid, false AS gone FROM ltm_memories m
    WHERE m.user_id = %(user_id)s AND m.txid >= %(since)s::xid8
    UNION ALL
    SELECT d.memory_id, d.txid::text, true FROM ltm_search_deletions d
    WHERE d.user_id = %(user_id)s AND d.txid >= %(since)s::xid8
) AS r ON true"""
_NEW = _ROW + " AND m.memory_id = ANY(%(ids)s)"
# a memory held already, changed in place (uses, supersession...): its row only (embedding and terms cannot change)
_UPDATED = f"SELECT {ROW_COLUMNS}, m.txid::text AS txid FROM ltm_memories m" \
           " WHERE m.user_id = %(user_id)s AND m.memory_id = ANY(%(ids)s)"


class SearchIndex:
    """In-memory first stage of the native search for the users this process searched lately (module docstring)."""

    def __init__(self, pool: AsyncConnectionPool, capacity: int, load_wait_s: float = 0.0) -> None:
        """``load_wait_s``: how long a search of a user not held waits for the user's load before it runs in SQL
        (a small user loads in less than the SQL stage takes; 0 = never wait)."""
        self.pool = pool
        self.capacity = capacity
        self.load_wait_s = load_wait_s
        # warming's turn between two chunks (NativeBackend gives it Foreground.turn: requests in flight first, as
        # for ingest). A load that a search started takes only event loop turns: it ends that user's SQL searches.
        self.warming_turn: Callable[[], Awaitable[None]] | None = None
        self._users: OrderedDict[str, HeldUser] = OrderedDict()
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._too_large: dict[str, float] = {}  # user -> when it did not fit (tried again after TOO_LARGE_S)
        self._stale: set[str] = set()  # users dropped while a load of theirs was under way: not installed
        self.rows = 0  # rows held over all users (plus _ROW_COST per user)
        self.read = 0  # rows read again before searches since the start (new, or changed in place)
        self.removed = 0  # rows dropped from entries since the start (deleted in PostgreSQL)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def drop(self, user_id: str) -> None:
        """Forget the user (deleted, or its entry no longer usable); a load of it under way is not kept either (it
        may have read the rows before the deletion)."""
        self._remove(user_id)
        if user_id in self._loads:
            self._stale.add(user_id)

    def _remove(self, user_id: str) -> None:
        u = self._users.pop(user_id, None)
        if u is not None:
            self.rows -= u.n + _ROW_COST

    async def settle(self) -> None:
        """Wait for the loads under way (tests, and a clean shutdown)."""
        while self._loads:
            await asyncio.gather(*self._loads.values(), return_exceptions=True)

    async def candidates(self, conn: AsyncConnection[Any], user_id: str, data: SearchData, embedding: np.ndarray,
                         cfg: RetrievalConfig) -> Candidates | None:
        """The rows ``retrieval._CANDIDATES`` returns for this search (same keys, same values, same order: see
        :meth:`Candidates.as_rows`), or None
        when the user is not indexed: the caller runs the SQL stage, and the user is loaded in the background
        (a first search waits up to ``load_wait_s`` for that load, then runs in SQL: it costs at most what it
        costs without the index, plus that wait)."""
        if self.capacity <= 0:
            return None
        u = self._users.get(user_id)
        if u is None:
            u = await self._load_now(user_id)
            if u is None:
                return None
        lexemes = await self._catch_up(conn, user_id, u, data.query)
        if lexemes is None:
            return None
        # no await from here: the entry cannot change under the computation
        keep = u.mask(list(data.types) if data.types else None, data.session_id or None,
                      data.exclude_session_id or None)
        return first_stage(u, list(lexemes), embedding, keep, limit=cfg.candidates, wd=cfg.profile.dense,
                            wk=cfg.profile.keyword, k1=cfg.bm25_k1, b=cfg.bm25_b)

    async def _load_now(self, user_id: str) -> HeldUser | None:
        """Start (or join) the user's load and wait for it at most ``load_wait_s``; the entry, or None (the search
        then runs in SQL while the load goes on)."""
        self._load_later(user_id)
        task = self._loads.get(user_id)
        if task is None or self.load_wait_s <= 0:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(task), self.load_wait_s)
        except TimeoutError:
            return None
        return self._users.get(user_id)

    async def _catch_up(self, conn: AsyncConnection[Any], user_id: str, u: HeldUser, query: str) -> list[str] | None:
        """Read what was written for the user since the last read (module docstring); the query's lexemes, or
        None when the entry is no longer usable (deleted rows: loaded again in the background; too large)."""
        async with u.lock:
            # text results, as the SQL stage reads them (a real in binary would come back as float32 digits)
            cur = conn.cursor()
            await cur.execute(_CHANGES, {"user_id": user_id, "query": query, "since": str(max(u.horizon, 0))})
            head = await cur.fetchall()
            horizon, epoch, lexemes, floor = head[0][:4]
            # a change the entry cannot follow row by row (a new epoch: a changed embedding or text, the user
            # deleted); deletions pruned from the log that this entry may not have read (floor); or memories came
            # for a user held without any, and without an epoch (_EPOCH_ROW): load the user again
            if epoch != u.epoch or (floor is not None and xid(floor) >= max(u.horizon, 0)) \
                    or (epoch is None and head[0][4] is not None):
                if self._users.get(user_id) is u:
                    self.drop(user_id)
                self._load_later(user_id)
                return None
            written = [(r[4], r[5]) for r in head if r[4] is not None and not r[6]]
            n_before = u.n
            # a memory deleted and written again with the same id (not done today) is held as written
            removed = u.remove({str(r[4]) for r in head if r[6]} - {str(m) for m, _ in written})
            self.removed += removed
            if removed and self._users.get(user_id) is u:  # counted now: a drop during the reads below subtracts
                self.rows += u.n - n_before              # what the entry holds then (fewer once compacted)
                n_before = u.n
            new, updated = u.changed(written)
            for sql, ids in ((_UPDATED, updated), (_NEW, new)):
                if ids:
                    await cur.execute(sql, {"user_id": user_id, "ids": ids})
                    fetched = await cur.fetchall()
                    self.read += len(fetched)
                    u.add(fetched)
            u.postings.settle()  # the rows added by catch-ups are merged once they are many
            u.horizon = max(u.horizon, xid(horizon))
            if self._users.get(user_id) is u:  # (not dropped meanwhile to make room for another user)
                self.rows += u.n - n_before  # (fewer once deleted rows are dropped: HeldUser.remove)
                if u.n + _ROW_COST > self.capacity:
                    self.drop(user_id)
                    self._too_large[user_id] = time.monotonic()
                    return None
                self._users.move_to_end(user_id)
                self._evict(keep=user_id)
        return list(lexemes)

    def warm(self, user_id: str) -> None:
        """Get the user ready for a fast first search, in the background: read what was written since the last
        read when indexed, else load it, but only into free room (warming never evicts a user searched before).

        Called after ingest (in every ltm process: services/ltm/service.py) and at start for the users active
        last, so that a user's first search after new memories, or after a restart, is not a cold one.
        """
        if self.capacity <= 0 or user_id in self._loads:
            return
        if user_id in self._users:
            self._spawn(user_id, self._refresh(user_id), "refresh")
        elif self.rows + _ROW_COST < self.capacity:
            self._load_later(user_id, evict=False)

    async def warm_recent(self, rows: int) -> int:
        """At start: load the users active last (``ltm_user_state``), most recent first, while they fit in
        ``rows`` (and the capacity); the number of users loaded. Searches run meanwhile (loads yield often)."""
        target = min(rows, self.capacity)
        if target <= 0:
            return 0
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT user_id FROM ltm_user_state ORDER BY last_active_at DESC LIMIT 10000")
            users = [r[0] for r in await cur.fetchall()]
        loaded = 0
        for user_id in users:
            if self.rows >= target:
                break
            if user_id in self._users or user_id in self._loads:
                continue
            self._load_later(user_id, evict=False)
            task = self._loads.get(user_id)
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            if user_id not in self._users:
                break  # did not fit: the index is as full as warming may make it
            loaded += 1
        log.info("ltm.index_warmed", users=loaded, rows=self.rows)
        return loaded

    async def _refresh(self, user_id: str) -> None:
        try:
            await self._refresh_entry(user_id)
        finally:
            # A drop while this refresh was the user's task in _loads (its own catch-up's, on a new epoch, or a
            # deletion's) marked the user stale: a mark for a load that read before a deletion. A refresh installs
            # nothing, and a load started after it reads after the deletion, so the mark goes. Kept, it threw away
            # the reload below (every user whose optimize merged duplicates was searched cold next) or the next one.
            self._stale.discard(user_id)

    async def _refresh_entry(self, user_id: str) -> None:
        u = self._users.get(user_id)
        if u is None:
            return
        try:
            async with self.pool.connection() as conn:
                usable = await self._catch_up(conn, user_id, u, "") is not None
        except Exception:  # the next search reads the same rows
            log.warning("ltm.index_refresh_failed", exc_info=True)
            return
        if not usable and user_id not in self._users:  # rows were deleted: load it again (this task is ending)
            self._loads.pop(user_id, None)
            self._load_later(user_id, evict=False)

    def _spawn(self, user_id: str, work: Coroutine[Any, Any, None], kind: str) -> None:
        task = asyncio.create_task(work, name=f"ltm-index-{kind}:{user_id}")
        self._loads[user_id] = task
        task.add_done_callback(lambda t: self._loads.pop(user_id) if self._loads.get(user_id) is t else None)

    def _load_later(self, user_id: str, *, evict: bool = True) -> None:
        failed = self._too_large.get(user_id)
        if user_id in self._loads or (failed is not None and time.monotonic() - failed < TOO_LARGE_S):
            return
        self._too_large.pop(user_id, None)
        self._spawn(user_id, self._load(user_id, evict), "load")

    async def _load(self, user_id: str, evict: bool = True) -> None:
        """``evict`` False: warming (at start, after ingest), which never evicts and steps aside for requests."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute(_EPOCH_ROW, {"user_id": user_id})
                u = await self._read(conn, user_id, None if evict else self.warming_turn)
        except Exception:  # searches go on in SQL; the next one tries again
            log.warning("ltm.index_load_failed", exc_info=True)
            self._stale.discard(user_id)
            return
        if user_id in self._stale:  # dropped while it loaded
            self._stale.discard(user_id)
            return
        if u is None:
            self._too_large[user_id] = time.monotonic()
            log.info("ltm.index_user_too_large", capacity=self.capacity)
            return
        if u.epoch is None and u.n:  # memories written after _EPOCH_ROW found none: the next search loads again
            return
        if not evict and self.rows + u.n + _ROW_COST > self.capacity and user_id not in self._users:
            return  # warming: no room without evicting a user searched before
        self._remove(user_id)
        self._users[user_id] = u
        self.rows += u.n + _ROW_COST
        self._evict(keep=user_id)

    async def _read(self, conn: AsyncConnection[Any], user_id: str,
                    turn: Callable[[], Awaitable[None]] | None = None) -> HeldUser | None:
        """Every memory of the user in one snapshot, in chunks (other requests run in between, and with ``turn``
        first); None: too many."""
        params = {"user_id": user_id, "query": ""}
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = await conn.execute(_STATE, params)
            state = await cur.fetchone()
            assert state is not None
            u = HeldUser(horizon=xid(state[0]), epoch=state[1])
            named = conn.cursor(f"ltm_index_load_{id(u)}")
            await named.execute(_ROW, params)
            yield_until = time.monotonic() + WARM_YIELD_S
            while batch := await named.fetchmany(LOAD_CHUNK if turn is None else WARM_CHUNK):
                if turn is not None and time.monotonic() > yield_until:  # under steady load: done waiting
                    turn = None
                u.add(batch)
                if u.n + _ROW_COST > self.capacity:
                    await named.close()
                    return None
                await (turn() if turn is not None else asyncio.sleep(0))
            await named.close()
        u.compact()
        return u

    def _evict(self, keep: str) -> None:
        while self.rows > self.capacity and len(self._users) > 1:
            oldest = next(iter(self._users))
            if oldest == keep:
                self._users.move_to_end(oldest)
                continue
            self._remove(oldest)
