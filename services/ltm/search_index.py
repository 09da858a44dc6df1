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
  like a new one. A deletion, or a change of embedding, content, type or session, gives the user a new epoch
  (trigger): the user is loaded again.
- At most ``capacity`` rows over all users; the least recently searched users are dropped first. A user larger
  than the capacity (or ``capacity`` 0) is not indexed: :meth:`SearchIndex.candidates` returns None and the
  caller runs the SQL stage.

:meth:`SearchIndex.candidates` returns what the SQL stage's ranking columns hold: the best ``limit`` memory ids
by ``wd * sim / sd(sim) + wk * bm25 / sd(bm25)``, in that order, with sim, bm25 and the statistics n, sim_mean,
sim_sd, s1, s2 (equal to the SQL stage up to float32 rounding of the cosine).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

import numpy as np
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.ltm.candidates import Candidates, Picked
from services.ltm.postings import Postings
from shared.contracts.messages import SearchData
from shared.runtime.logging import get_logger

if TYPE_CHECKING:
    from services.ltm.retrieval import RetrievalConfig

log = get_logger(__name__)

DIM = 384  # until the first rows say otherwise (another EMBEDDING_MODEL)
LOAD_CHUNK = 500  # rows read and indexed between two turns of the event loop (a load a search started)
WARM_CHUNK = 100  # the same while warming: a request that comes meanwhile waits for one chunk (a few ms)
WARM_YIELD_S = 2.0  # a warming load waits for requests at most this long in all (it holds a snapshot open)
TOO_LARGE_S = 600.0  # a user too large for the index is searched in SQL; loading it is tried again after this
_ROW_COST = 16  # per user, in rows: what an entry costs besides its memories (empty users count too)

# The columns of a candidate row, as retrieval._CANDIDATES computes them (its ``base`` CTE: the same
# expressions, so the same values); tests/integration/test_ltm_search_index.py compares the two paths.
ROW_COLUMNS = """m.memory_id, m.type, m.source_message_id, m.source_session_id, m.source_timestamp, m.speaker,
       m.entities, m.confidence, m.access_count, m.valid_to, m.superseded_by,
       m.meta->>'role' AS role, (m.meta->>'question') = 'true' AS question,
       extract(epoch FROM m.created_at)::float8 AS created_at,
       extract(epoch FROM m.last_accessed)::float8 AS last_accessed, m.salience::float8 AS salience"""
KEYS = ("memory_id", "type", "source_message_id", "source_session_id", "source_timestamp", "speaker", "entities",
        "confidence", "access_count", "valid_to", "superseded_by", "role", "question", "created_at", "last_accessed",
        "salience")
_TYPE, _SESSION, _ENTITIES = KEYS.index("type"), KEYS.index("source_session_id"), KEYS.index("entities")
_SHARED = ("type", "source_session_id", "speaker", "role")
# What a held row keeps (every KEYS column but entities, held beside it), and where its ids are: see _User.
_HELD = tuple(i for i, k in enumerate(KEYS) if k != "entities")
_HELD_KEYS = tuple(KEYS[i] for i in _HELD)
_HELD_ID, _HELD_SUPERSEDED = _HELD_KEYS.index("memory_id"), _HELD_KEYS.index("superseded_by")

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
SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon,
       (SELECT epoch FROM ltm_search_epochs WHERE user_id = %(user_id)s) AS epoch,
       (SELECT coalesce(array_agg(lexeme), '{}') FROM unnest(to_tsvector('english', %(query)s))) AS qlx"""

# Before each search, one statement (one snapshot): the state, then which rows were written since, and by which
# transaction (LEFT JOIN: the state also when none was). Only the rows not held as they are now are then read
# (_ROW ... AND memory_id = ANY): when a long transaction holds the horizon back, the same rows come back here
# again, not their embeddings.
_CHANGES = f"""
SELECT s.horizon, s.epoch, s.qlx, r.memory_id, r.txid
FROM ({_STATE}) AS s
LEFT JOIN LATERAL (
    SELECT m.memory_id, m.txid::text AS txid FROM ltm_memories m
    WHERE m.user_id = %(user_id)s AND m.txid >= %(since)s::xid8
) AS r ON true"""
_NEW = _ROW + " AND m.memory_id = ANY(%(ids)s)"
# a memory held already, changed in place (uses, supersession...): its row only (embedding and terms cannot change)
_UPDATED = f"SELECT {ROW_COLUMNS}, m.txid::text AS txid FROM ltm_memories m" \
           " WHERE m.user_id = %(user_id)s AND m.memory_id = ANY(%(ids)s)"
_TXID = len(KEYS)  # in a _ROW row: KEYS, then txid, vec, lx, tf
_VEC = _TXID + 1


@dataclass(slots=True)
class _User:
    """The indexed memories of one user (memory i = position i in every list and array).

    Nothing held per memory is an object the garbage collector tracks: a full collection walks every tracked
    object, with the event loop standing still, and three per held memory (its row dict, a UUID, a list) made one
    take 35-100 ms while 50k rows warmed (and longer at the 200k the index holds). So a row dict holds only
    atomic values: its ids as text (ranking and the result rows read them as text; the rows of the SQL stage have
    UUIDs), and ``pos`` is keyed by that text; the entities are tuples in a list beside the rows (a tuple of
    strings stops being tracked at its first collection), added back by :meth:`Candidates.row`.
    """

    horizon: int
    epoch: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # the KEYS columns but entities (read only)
    entities: list[tuple[str, ...]] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)  # memory id (text) -> i
    vecs: np.ndarray = field(default_factory=lambda: np.zeros((0, DIM), np.float32))  # sized by the first load
    norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    dl: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    types: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sessions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # source_timestamp (NaN: none)
    ai: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # meta role = ai
    question: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # meta question
    codes: dict[str, int] = field(default_factory=dict)  # type and session names -> small ints (-1 = NULL)
    strings: dict[str, str] = field(default_factory=dict)  # one copy of each repeated value
    postings: Postings = field(default_factory=Postings)  # lexeme -> (rows, counts)
    txids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1: written before migration 004
    id_hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # memory_id as two numbers: ties
    id_lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sort by it, as in SQL
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def n(self) -> int:
        return len(self.rows)

    def code(self, name: str | None) -> int:
        if name is None:
            return -1
        return self.codes.setdefault(name, len(self.codes))

    def changed(self, pairs: list[tuple[UUID, str]]) -> tuple[list[UUID], list[UUID]]:
        """Of (memory id, txid) pairs, the memories not held, and those held as an older version."""
        new, updated = [], []
        for memory_id, txid in pairs:
            i = self.pos.get(str(memory_id))
            if i is None:
                new.append(memory_id)
            elif self.txids[i] != _xid(txid):
                updated.append(memory_id)
        return new, updated

    def add(self, rows: list[tuple[Any, ...]]) -> int:
        """Take _ROW (or, for memories held already, _UPDATED) rows: a memory held gets its new values (what can
        change in place: confidence, uses, supersession...); returns how many memories are new."""
        fresh: dict[UUID, tuple[Any, ...]] = {}
        for r in rows:
            i = self.pos.get(str(r[0]))
            if i is None:
                fresh[r[0]] = r
            else:
                self.rows[i] = self._row(r)
                self.entities[i] = tuple(r[_ENTITIES] or ())
                self._columns(i, self.rows[i])
                self.txids[i] = _xid(r[_TXID])
        if not fresh:
            return 0
        start, k = self.n, len(fresh)
        # pgvector's binary form: 2 bytes of size, 2 unused, then the floats (the size is the column's, EMBEDDING_DIM)
        vecs = np.frombuffer(b"".join(bytes(r[_VEC])[4:] for r in fresh.values()), dtype=">f4").reshape(k, -1)
        vecs = vecs.astype(np.float32)
        if start == 0 and self.vecs.shape[1] != vecs.shape[1]:
            self.vecs = np.zeros((0, vecs.shape[1]), np.float32)
        self.vecs = _grow(self.vecs, start + k)
        self.vecs[start:start + k] = vecs
        self.norms = _grow(self.norms, start + k)
        self.norms[start:start + k] = np.sqrt(np.einsum("ij,ij->i", vecs, vecs, dtype=np.float64))
        self.dl = _grow(self.dl, start + k)
        self.types = _grow(self.types, start + k)
        self.sessions = _grow(self.sessions, start + k)
        self.ts, self.ai = _grow(self.ts, start + k), _grow(self.ai, start + k)
        self.question = _grow(self.question, start + k)
        self.txids = _grow(self.txids, start + k)
        self.id_hi = _grow(self.id_hi, start + k)
        self.id_lo = _grow(self.id_lo, start + k)
        for j, r in enumerate(fresh.values()):
            i = start + j
            self.rows.append(self._row(r))
            self.entities.append(tuple(r[_ENTITIES] or ()))
            self._columns(i, self.rows[i])
            self.txids[i] = _xid(r[_TXID])
            self.id_hi[i], self.id_lo[i] = divmod(r[0].int, 1 << 64)
            self.pos[self.rows[i]["memory_id"]] = i
            self.dl[i] = len(r[_VEC + 1])
            self.types[i] = self.code("t:" + r[_TYPE])
            self.sessions[i] = self.code(None if r[_SESSION] is None else "s:" + r[_SESSION])
        self.postings.add_rows(start, [r[_VEC + 1] for r in fresh.values()], [r[_VEC + 2] for r in fresh.values()])
        return k

    def _columns(self, i: int, row: dict[str, Any]) -> None:
        """Row ``i``'s values that ranking reads as arrays (candidates.Candidates)."""
        self.ts[i] = math.nan if row["source_timestamp"] is None else float(row["source_timestamp"])
        self.ai[i] = row["role"] == "ai"
        self.question[i] = bool(row["question"])

    def _row(self, r: tuple[Any, ...]) -> dict[str, Any]:
        """The KEYS columns of a row but entities as a dict of atomic values only (the class docstring), its repeated
        strings shared (type, session, speaker, role)."""
        values = [r[i] for i in _HELD]
        values[_HELD_ID] = str(values[_HELD_ID])
        if values[_HELD_SUPERSEDED] is not None:
            values[_HELD_SUPERSEDED] = str(values[_HELD_SUPERSEDED])
        row = dict(zip(_HELD_KEYS, values, strict=True))
        for key in _SHARED:
            value = row[key]
            if value is not None:
                row[key] = self.strings.setdefault(value, value)
        return row

    def compact(self) -> None:
        """Free the room kept for rows to come (after a load)."""
        n = self.n
        self.vecs, self.norms, self.dl = self.vecs[:n].copy(), self.norms[:n].copy(), self.dl[:n].copy()
        self.types, self.sessions, self.txids = self.types[:n].copy(), self.sessions[:n].copy(), self.txids[:n].copy()
        self.ts, self.ai, self.question = self.ts[:n].copy(), self.ai[:n].copy(), self.question[:n].copy()
        self.id_hi, self.id_lo = self.id_hi[:n].copy(), self.id_lo[:n].copy()
        self.postings.settle(force=True)

    def mask(self, types: list[str] | None, session: str | None, exclude_session: str | None) -> np.ndarray | None:
        """Rows that pass the search's filters (None: all of them)."""
        n = self.n
        keep: np.ndarray | None = None
        if types:
            known = [self.codes[k] for k in ("t:" + t for t in types) if k in self.codes]
            keep = np.isin(self.types[:n], known)
        if session is not None:
            code = self.codes.get("s:" + session, -2)
            same = self.sessions[:n] == code
            keep = same if keep is None else keep & same
        if exclude_session is not None:
            code = self.codes.get("s:" + exclude_session, -2)
            other = self.sessions[:n] != code
            keep = other if keep is None else keep & other
        return keep


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with room for ``size`` rows (a quarter more each time; the rows beyond the used ones are garbage)."""
    if len(a) >= size:
        return a
    out = np.zeros((max(size, len(a) + len(a) // 4, 64), *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


def _xid(text: str | None) -> int:
    return int(text) if text else -1


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
        self._users: OrderedDict[str, _User] = OrderedDict()
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._too_large: dict[str, float] = {}  # user -> when it did not fit (tried again after TOO_LARGE_S)
        self._stale: set[str] = set()  # users dropped while a load of theirs was under way: not installed
        self.rows = 0  # rows held over all users (plus _ROW_COST per user)
        self.read = 0  # rows read again before searches since the start (new, or changed in place)

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
        return _first_stage(u, list(lexemes), embedding, keep, limit=cfg.candidates, wd=cfg.profile.dense,
                            wk=cfg.profile.keyword, k1=cfg.bm25_k1, b=cfg.bm25_b)

    async def _load_now(self, user_id: str) -> _User | None:
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

    async def _catch_up(self, conn: AsyncConnection[Any], user_id: str, u: _User, query: str) -> list[str] | None:
        """Read what was written for the user since the last read (module docstring); the query's lexemes, or
        None when the entry is no longer usable (deleted rows: loaded again in the background; too large)."""
        async with u.lock:
            # text results, as the SQL stage reads them (a real in binary would come back as float32 digits)
            cur = conn.cursor()
            await cur.execute(_CHANGES, {"user_id": user_id, "query": query, "since": str(max(u.horizon, 0))})
            head = await cur.fetchall()
            horizon, epoch, lexemes = head[0][:3]
            # something was deleted (a new epoch); or memories came for a user held without any, and without an
            # epoch (_EPOCH_ROW): load the user again, and with that its epoch row
            if epoch != u.epoch or (epoch is None and head[0][3] is not None):
                if self._users.get(user_id) is u:
                    self.drop(user_id)
                self._load_later(user_id)
                return None
            new, updated = u.changed([(r[3], r[4]) for r in head if r[3] is not None])
            added = 0
            for sql, ids in ((_UPDATED, updated), (_NEW, new)):
                if ids:
                    await cur.execute(sql, {"user_id": user_id, "ids": ids})
                    fetched = await cur.fetchall()
                    self.read += len(fetched)
                    added += u.add(fetched)
            u.postings.settle()  # the rows added by catch-ups are merged once they are many
            u.horizon = max(u.horizon, _xid(horizon))
            if self._users.get(user_id) is u:  # (not dropped meanwhile to make room for another user)
                self.rows += added
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
                    turn: Callable[[], Awaitable[None]] | None = None) -> _User | None:
        """Every memory of the user in one snapshot, in chunks (other requests run in between, and with ``turn``
        first); None: too many."""
        params = {"user_id": user_id, "query": ""}
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = await conn.execute(_STATE, params)
            state = await cur.fetchone()
            assert state is not None
            u = _User(horizon=_xid(state[0]), epoch=state[1])
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


def _first_stage(u: _User, lexemes: list[str], embedding: np.ndarray, keep: np.ndarray | None, *, limit: int,
                 wd: float, wk: float, k1: float, b: float) -> Candidates:
    """The rows of ``retrieval._CANDIDATES`` from the memories of ``u`` that ``keep`` holds (all when None), as
    columns; the rows are the index's own dicts (shared: read only)."""
    n_all = u.n
    rows = None if keep is None else np.flatnonzero(keep)
    n = n_all if rows is None else len(rows)
    if n == 0:
        return Candidates.of_rows([])
    q = np.asarray(embedding, dtype=np.float32)
    qnorm = math.sqrt(float(np.dot(q.astype(np.float64), q.astype(np.float64))))
    dots = u.vecs[:n_all] @ q  # sgemv, on this thread (shared/runtime/runner.py one_blas_thread)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim_all = np.clip(dots.astype(np.float64) / (u.norms[:n_all] * qnorm), -1.0, 1.0)
    sim = sim_all if rows is None else sim_all[rows]
    sim_mean, sim_sd = float(sim.mean()), float(sim.std())
    bm25_all = np.zeros(n_all)
    if lexemes:
        avgdl = max(float((u.dl[:n_all] if rows is None else u.dl[rows]).mean()), 1.0)
        for lexeme in dict.fromkeys(lexemes):
            post = u.postings.get(lexeme)
            if post is None:
                continue
            idx, tf = post[0], post[1].astype(np.float64)
            if keep is not None:
                inside = keep[idx]
                idx, tf = idx[inside], tf[inside]
            df = float(len(idx))
            if not df:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            bm25_all[idx] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * u.dl[idx] / avgdl))
    bm25 = bm25_all if rows is None else bm25_all[rows]
    s1, s2 = float(bm25.sum()), float(np.dot(bm25, bm25))
    k_sd = math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))
    fused = wd * sim / max(sim_sd, 1e-9) + wk * bm25 / max(k_sd, 1e-9)
    # the best k by the fused score, ties by memory_id (the order of retrieval._CANDIDATES)
    hi, lo = (u.id_hi[:n_all], u.id_lo[:n_all]) if rows is None else (u.id_hi[rows], u.id_lo[rows])
    k = min(limit, n)
    if k < n:
        cut = fused[np.argpartition(-fused, k - 1)[k - 1]]
        above, tied = np.flatnonzero(fused > cut), np.flatnonzero(fused == cut)
        tied = tied[np.lexsort((lo[tied], hi[tied]))][: k - len(above)]
        top = np.concatenate([above, tied])
    else:
        top = np.arange(n)
    top = top[np.lexsort((lo[top], hi[top], -fused[top]))]
    chosen = top if rows is None else rows[top]
    return Candidates(rows=Picked(u.rows, chosen), entities=Picked(u.entities, chosen), sim=sim_all[chosen],
                      bm25=bm25_all[chosen], session=u.sessions[chosen].astype(np.int64), ts=u.ts[chosen],
                      ai=u.ai[chosen], question=u.question[chosen], n=float(n), sim_mean=sim_mean, sim_sd=sim_sd,
                      s1=s1, s2=s2)
