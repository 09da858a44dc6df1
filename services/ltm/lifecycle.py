"""The memory lifecycle: supersession, consolidation, decay, budgeted cleanup, and the ``optimize`` job.

Rules (every statement scoped by ``user_id``):

- **Supersession** (on ingest, :func:`supersede`): statements of a single-valued slot of one subject ("Caroline
  lives in Lisbon" / "Caroline moved to Berlin", slot ``location``) are ordered by when they were last stated;
  each one whose value differs from a later one gets ``valid_to`` = the later one's time and ``superseded_by`` =
  its id. The latest value stays current. Superseded memories stay in the table (history, searchable, ranked
  lower); the graph relation they state gets the same ``valid_to``.
- **Consolidation** (optimize): current typed memories of one type, subject, slot value and predicate whose
  embeddings are at least ``LTM_CONSOLIDATE_SIMILARITY`` alike, and that name the same numbers, dates, days and
  times (:func:`particulars`: the embedding barely tells "on 8 May" from "on 15 May"), are merged into the one
  with most mentions: it takes the others' mentions, access counts, entities, links and provenance
  (``sources``); the merged ones move to ``ltm_archive`` (reason ``merged``). Exact repeats never make a second
  row: the unique constraint on (user, type, content hash) turns them into a mention.
- **Decay** (optimize): ``decay`` = (0.5 + 0.5 confidence) x 0.5^(days since last stated or used / half-life)
  + 0.1 ln(1 + access_count) + 0.05 ln(mentions), capped at 1, halved for superseded memories.
- **Budgeted cleanup** (optimize): when a user holds more than ``LTM_MEMORY_BUDGET`` memories, the lowest-decay
  ones (never instructions, never a current slot value; with LTM_SALIENCE_CLEANUP the least salient first)
  move to ``ltm_archive`` (reason ``budget``), at most
  ``LTM_CLEANUP_BATCH`` per run.
- **optimize** runs all three for one user under a Redis lock (``SET NX PX`` with a token, released by a
  compare-and-delete script), so two workers never optimise the same user at once; the periodic job runs it for
  users active since their last optimisation, at most every ``LTM_OPTIMIZE_INTERVAL_S`` per user.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from shared.runtime.errors import is_transient
from shared.runtime.fence import after_deletion
from shared.runtime.logging import get_logger

log = get_logger(__name__)

KEEP_SOURCES = 50  # provenance entries kept per memory (mentions keeps the full count)
TYPED = ["preference", "fact", "commitment", "instruction"]

# What tells two statements apart that a sentence embedding barely sees: numbers, dates, days, times ("call mom on
# 8 May" / "on 15 May": cosine 0.95, "a dentist appointment on Tuesday" / "on Thursday": 0.98, over the 0.92 that
# merges). A relative one ("tomorrow", "next week") means another day each time it is said: the statement's day.
_MONTHS = {"january": "jan", "february": "feb", "march": "mar", "april": "apr", "june": "jun", "july": "jul",
           "august": "aug", "september": "sep", "sept": "sep", "october": "oct", "november": "nov",
           "december": "dec", **{m: m for m in ("jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "oct", "nov",
                                               "dec")}}
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_NUMBERS = {w: str(i) for i, w in enumerate(("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                                             "eleven", "twelve"), start=2)}  # not "one": a pronoun too
_WORDS = {**_MONTHS, **{d: d for d in _DAYS}, **_NUMBERS, "noon": "noon", "midnight": "midnight"}
# a number, am/pm after one ("4pm" = "4 pm"), "may" beside one (else the verb), or any word (looked up in _WORDS)
_PARTICULAR = re.compile(r"(?<=\d)\s*+(?P<ampm>[ap])\.?m\b|(?P<may>\d++\s*+may\b|\bmay\s*+\d++)|(?P<num>\d++)"
                         r"|(?P<word>[a-z]++)", re.IGNORECASE)
_RELATIVE = re.compile(
    r"\b(?:today|tonight|tomorrow|yesterday|(?:this|next|last)\s+(?:week|weekend|month|year|morning|afternoon"
    r"|evening|night|" + "|".join(_DAYS) + r"))\b", re.IGNORECASE)


def particulars(text: str, asserted_at: float | None) -> tuple[str, ...]:
    """The numbers, dates, days and times a statement names (and its day, when it names a relative one): two
    statements merge only when these are the same."""
    found: set[str] = set()
    for m in _PARTICULAR.finditer(text):
        if m["ampm"]:
            found.add(m["ampm"].lower() + "m")
        elif m["may"]:
            found.update(("may", *(d.lstrip("0") or "0" for d in re.findall(r"\d+", m["may"]))))
        elif m["num"]:
            found.add(m["num"].lstrip("0") or "0")
        elif m["word"].lower() in _WORDS:
            found.add(_WORDS[m["word"].lower()])
    out = sorted(found)
    if asserted_at is not None and _RELATIVE.search(text):
        out.append(f"@{int(asserted_at // 86_400)}")
    return tuple(out)


# --------------------------------------------------------------------------- supersession
async def supersede(conn: AsyncConnection, user_id: str, subject: str, slot: str) -> int:
    """Re-resolve which statement of (subject, slot) is current; returns how many rows changed."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                       (f"ltm-slot\x1f{user_id}\x1f{subject}\x1f{slot}",))
    cur = await conn.execute(
        "SELECT memory_id, lower(coalesce(slot_value, content)), asserted_at, valid_to, superseded_by"
        " FROM ltm_memories WHERE user_id = %s AND subject = %s AND slot = %s"
        " ORDER BY asserted_at NULLS FIRST, created_at, memory_id", (user_id, subject, slot))
    rows = await cur.fetchall()
    changed = 0
    for i, (mid, value, _at, valid_to, superseded_by) in enumerate(rows):
        nxt = next((r for r in rows[i + 1:] if r[1] != value), None)
        want = (nxt[2], nxt[0]) if nxt is not None else (None, None)
        if (valid_to, superseded_by) == want:
            continue
        changed += 1
        await conn.execute("UPDATE ltm_memories SET valid_to = %s, superseded_by = %s"
                           " WHERE user_id = %s AND memory_id = %s", (*want, user_id, mid))
        await conn.execute("UPDATE ltm_relations SET valid_to = %s WHERE user_id = %s AND memory_id = %s",
                           (want[0], user_id, mid))
    return changed


# --------------------------------------------------------------------------- the lock
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
EXTEND = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2])"
          " else return 0 end")


# When the user was last optimized, for a user that still has memories: an optimize that overlaps the user's
# deletion must not write the user's id back after it (deleting a user removes every row of it).
MARK_OPTIMIZED = """
INSERT INTO ltm_user_state (user_id, last_optimized_at)
SELECT %(user_id)s, now() WHERE EXISTS (SELECT 1 FROM ltm_memories WHERE user_id = %(user_id)s)
ON CONFLICT (user_id) DO UPDATE SET last_optimized_at = now()"""


class RedisLock:
    """A lock one holder at a time: ``SET key token NX PX ttl``; released only by its own token
    (compare-and-delete script). While held through :meth:`held`, a watchdog extends the TTL every third of it,
    so a long run keeps the lock and a crashed holder loses it after one TTL."""

    def __init__(self, redis: aioredis.Redis, key: str, ttl_ms: int) -> None:
        self.redis, self.key, self.ttl_ms = redis, key, ttl_ms
        self.token = uuid.uuid4().hex

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def release(self) -> bool:
        return bool(await self.redis.eval(RELEASE, 1, self.key, self.token))  # type: ignore[misc]

    async def extend(self) -> bool:
        return bool(await self.redis.eval(EXTEND, 1, self.key, self.token, self.ttl_ms))  # type: ignore[misc]

    async def _watchdog(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.ttl_ms / 3000)
            except TimeoutError:
                if not await self.extend():
                    log.warning("ltm.lock_lost", key=self.key)
                    return

    @asynccontextmanager
    async def held(self) -> AsyncIterator[bool]:
        """``async with lock.held() as ok``: ok is False when another holder has it (nothing is waited for)."""
        ok = await self.acquire()
        stop = asyncio.Event()
        watchdog = asyncio.create_task(self._watchdog(stop)) if ok else None
        try:
            yield ok
        finally:
            if watchdog is not None:
                stop.set()
                await watchdog
                await self.release()


# --------------------------------------------------------------------------- optimize
@dataclass(slots=True)
class LifecycleConfig:
    half_life_days: float = 30.0
    consolidate_similarity: float = 0.92
    consolidate_max: int = 2000
    memory_budget: int = 20_000
    cleanup_batch: int = 500
    optimize_interval_s: float = 600.0
    users_per_run: int = 20
    lock_ms: int = 120_000
    salience_first: bool = False  # LTM_SALIENCE_CLEANUP: the least salient first (NULL as 0.5), then by decay
    deletions_keep_s: float = 86_400.0  # LTM_SEARCH_DELETIONS_KEEP_S


# The user's rows of the search index's deletion log older than the time kept (migration 012), and the newest txid
# pruned as the user's log_floor (an epoch row is made if the user has none: its new epoch reloads any entry held
# without one). Only rows older than every transaction running: the floor is then below the horizon of any later
# read, so an entry loaded after the prune is not loaded again for it (a reload loop while a long transaction ran).
PRUNE_DELETIONS = (
    "WITH pruned AS (DELETE FROM ltm_search_deletions WHERE user_id = %(u)s"
    " AND deleted_at < now() - make_interval(secs => %(keep)s)"
    " AND txid < pg_snapshot_xmin(pg_current_snapshot()) RETURNING txid)"
    " INSERT INTO ltm_search_epochs AS e (user_id, epoch, log_floor)"
    " SELECT %(u)s, nextval('ltm_search_epoch_seq'), max(txid) FROM pruned HAVING count(*) > 0"
    " ON CONFLICT (user_id) DO UPDATE SET log_floor = greatest(e.log_floor, EXCLUDED.log_floor)"
)

ARCHIVE = (
    "WITH moved AS (DELETE FROM ltm_memories WHERE user_id = %(u)s AND memory_id = ANY(%(ids)s) RETURNING *)"
    " INSERT INTO ltm_archive (user_id, memory_id, reason, merged_into, row)"
    " SELECT user_id, memory_id, %(reason)s, %(into)s, to_jsonb(moved) - 'embedding' FROM moved"
    " ON CONFLICT (user_id, memory_id) DO NOTHING"
)

# decay is a real (float4): past 100 half-lives (a memory dated decades back, or at -1) the factor stays at
# 0.5^100 ~ 8e-31 instead of underflowing the column ("value out of range") and failing the user's optimize
_DECAY_VALUE = (
    "LEAST(1.0, GREATEST(0.0,"
    " (0.5 + 0.5 * confidence) * power(0.5, LEAST(100.0, GREATEST(0.0, %(now)s - GREATEST("
    "   COALESCE(extract(epoch FROM last_accessed), 0), COALESCE(asserted_at, source_timestamp,"
    "   extract(epoch FROM created_at)))) / 86400.0 / %(half_life)s))"
    " + 0.1 * ln(1 + access_count) + 0.05 * ln(GREATEST(mentions, 1))))"
    " * CASE WHEN valid_to IS NULL THEN 1.0 ELSE 0.5 END"
)
# Only the rows whose value moved by DECAY_STEP or more are written: between two passes (LTM_OPTIMIZE_INTERVAL_S,
# 10 min) a 30-day half-life moves a value by about 1e-4, so a pass rewrites a handful of rows, not every memory of
# the user (each rewrite is a new row version, WAL and index entries). The value only orders budgeted cleanup.
# The expression is written twice but costs one evaluation per row: SET is evaluated only for the few rows that pass
# WHERE (a subquery joined back on memory_id would add a join over all the user's rows for nothing).
DECAY_STEP = 0.005
DECAY = (
    f"UPDATE ltm_memories SET decay = {_DECAY_VALUE}"
    f" WHERE user_id = %(u)s AND abs(decay - {_DECAY_VALUE}) >= {DECAY_STEP}"
)

MERGE = (
    "UPDATE ltm_memories s SET mentions = s.mentions + l.mentions,"
    " confidence = GREATEST(s.confidence, l.confidence), access_count = s.access_count + l.access_count,"
    f" sources = jsonb_path_query_array(s.sources || l.sources, '$[last - {KEEP_SOURCES - 1} to last]'),"
    " valid_from = LEAST(s.valid_from, l.valid_from), asserted_at = GREATEST(s.asserted_at, l.asserted_at),"
    " last_accessed = GREATEST(s.last_accessed, l.last_accessed),"
    " entities = ARRAY(SELECT DISTINCT e FROM unnest(s.entities || l.entities) AS e),"
    " meta = s.meta || jsonb_build_object('merged', COALESCE(s.meta -> 'merged', '[]'::jsonb)"
    "   || jsonb_build_array(jsonb_build_object('memory_id', l.memory_id::text, 'content', l.content)))"
    " FROM ltm_memories l WHERE s.user_id = %(u)s AND s.memory_id = %(keep)s"
    " AND l.user_id = %(u)s AND l.memory_id = %(gone)s"
)


class Lifecycle:
    def __init__(self, pool: AsyncConnectionPool, config: LifecycleConfig, redis: aioredis.Redis | None = None,
                 lock_key: Any = None) -> None:
        """``lock_key(user_id) -> str`` names the user's optimize lock (``Names.lock``)."""
        self.pool, self.config, self.redis, self.lock_key = pool, config, redis, lock_key
        self._next_periodic = 0.0

    # ---- one user
    async def optimize(self, user_id: str, *, only_if_due: bool = False) -> dict[str, Any]:
        """Consolidate, decay and clean up one user's memories, under the user's Redis lock."""
        if self.redis is None or self.lock_key is None:
            raise RuntimeError("optimize needs Redis for its lock")
        lock = RedisLock(self.redis, self.lock_key(user_id), self.config.lock_ms)
        async with lock.held() as ok:
            if not ok:
                return {"user_id": user_id, "status": "busy"}
            if only_if_due and user_id not in await self.due_users(user_id):
                return {"user_id": user_id, "status": "not_due"}  # another worker just did it
            return {"user_id": user_id, "status": "done", **await self.run_unlocked(user_id)}

    async def run_unlocked(self, user_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        merged = await self.consolidate(user_id)
        decayed = await self.decay(user_id)
        archived = await self.cleanup(user_id)
        async with self.pool.connection() as conn:
            async with conn.transaction():
                # after a deletion of the user under way (which takes the epoch row, then the log's rows: this
                # statement takes them the other way round)
                await after_deletion(conn, user_id)
                await conn.execute(PRUNE_DELETIONS, {"u": user_id, "keep": self.config.deletions_keep_s})
            await conn.execute(
                MARK_OPTIMIZED, {"user_id": user_id})
            cur = await conn.execute("SELECT count(*) FROM ltm_memories WHERE user_id = %s", (user_id,))
            row = await cur.fetchone()
        out = {"consolidated": merged, "decayed": decayed, "archived": archived, "memories": row[0] if row else 0,
               "duration_ms": round((time.perf_counter() - started) * 1000, 1)}
        log.info("ltm.optimized", user_id=user_id, **out)
        return out

    async def consolidate(self, user_id: str) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT memory_id, type, subject, lower(coalesce(slot_value, '')), meta ->> 'predicate', embedding,"
                " mentions, confidence, asserted_at, content FROM ltm_memories"
                " WHERE user_id = %s AND type = ANY(%s) AND valid_to IS NULL"
                " ORDER BY asserted_at DESC NULLS LAST LIMIT %s", (user_id, TYPED, self.config.consolidate_max))
            rows = await cur.fetchall()
        if len(rows) < 2:
            return 0
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((r[1], r[2], r[3], r[4], particulars(r[9], r[8])), []).append(i)
        vecs = np.stack([np.asarray(r[5].to_numpy(), dtype=np.float32) for r in rows])
        pairs: list[tuple[float, int, int]] = []
        for members in groups.values():
            if len(members) < 2:
                continue
            sims = vecs[members] @ vecs[members].T
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    if sims[a, b] >= self.config.consolidate_similarity:
                        pairs.append((float(sims[a, b]), members[a], members[b]))
        gone: set[int] = set()
        merged = 0
        for _sim, a, b in sorted(pairs, reverse=True):
            if a in gone or b in gone:
                continue
            keep, lose = sorted((a, b), key=lambda i: (rows[i][6], rows[i][7], rows[i][8] or 0.0), reverse=True)
            await self._merge(user_id, rows[keep][0], rows[lose][0])
            gone.add(lose)
            merged += 1
        return merged

    async def _merge(self, user_id: str, keep: uuid.UUID, gone: uuid.UUID) -> None:
        p = {"u": user_id, "keep": keep, "gone": gone}
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(MERGE, p)
            await conn.execute(
                "INSERT INTO ltm_memory_entities (memory_id, entity_id, user_id, role)"
                " SELECT %(keep)s, entity_id, user_id, role FROM ltm_memory_entities"
                " WHERE user_id = %(u)s AND memory_id = %(gone)s ON CONFLICT DO NOTHING", p)
            await conn.execute("UPDATE ltm_memories SET superseded_by = %(keep)s"
                               " WHERE user_id = %(u)s AND superseded_by = %(gone)s", p)
            await conn.execute("UPDATE ltm_relations SET memory_id = %(keep)s WHERE user_id = %(u)s"
                               " AND memory_id = %(gone)s", p)
            await conn.execute(ARCHIVE, {"u": user_id, "ids": [gone], "reason": "merged", "into": keep})

    async def decay(self, user_id: str) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(DECAY, {"u": user_id, "now": time.time(),
                                             "half_life": self.config.half_life_days})
            return cur.rowcount

    async def cleanup(self, user_id: str) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT count(*) FROM ltm_memories WHERE user_id = %s", (user_id,))
            row = await cur.fetchone()
            over = (row[0] if row else 0) - self.config.memory_budget
            if over <= 0:
                return 0
            cur = await conn.execute(
                "SELECT memory_id FROM ltm_memories WHERE user_id = %s AND type <> 'instruction'"
                " AND NOT (slot IS NOT NULL AND valid_to IS NULL)"
                f" ORDER BY {'coalesce(salience, 0.5), ' if self.config.salience_first else ''}"
                "decay, asserted_at NULLS FIRST, created_at LIMIT %s",
                (user_id, min(over, self.config.cleanup_batch)))
            ids = [r[0] for r in await cur.fetchall()]
            await conn.execute(ARCHIVE, {"u": user_id, "ids": ids, "reason": "budget", "into": None})
        log.info("ltm.cleanup", user_id=user_id, archived=len(ids))
        return len(ids)

    # ---- all active users
    async def touch(self, user_id: str) -> None:
        """Mark a user active (the periodic job's work list); at most one write a minute per user."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO ltm_user_state (user_id) VALUES (%s) ON CONFLICT (user_id) DO UPDATE"
                " SET last_active_at = now() WHERE ltm_user_state.last_active_at < now() - interval '60 seconds'"
                " OR ltm_user_state.last_active_at <= ltm_user_state.last_optimized_at",
                (user_id,))

    async def due_users(self, user_id: str | None = None) -> list[str]:
        """Users active since their last optimisation and not optimised within the interval (or ``user_id``
        alone, if it is due). Across users, from the plain ltm_user_state (one row per user); each optimize then
        works on its user's partition of the partitioned tables."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT user_id FROM ltm_user_state WHERE (%(u)s::text IS NULL OR user_id = %(u)s)"
                " AND (last_optimized_at IS NULL OR (last_active_at > last_optimized_at"
                " AND last_optimized_at < now() - make_interval(secs => %(interval)s)))"
                " ORDER BY last_active_at DESC LIMIT %(n)s",
                {"u": user_id, "interval": self.config.optimize_interval_s, "n": self.config.users_per_run})
            return [r[0] for r in await cur.fetchall()]

    async def periodic(self, now: float | None = None,
                       turn: Callable[[], Awaitable[None]] | None = None) -> list[dict[str, Any]]:
        """Optimise the users that are due, each under its lock; runs at most every ``optimize_interval_s``/10.
        ``turn`` is awaited before each user (requests first: shared/runtime/priority.py)."""
        now = time.monotonic() if now is None else now
        if self.redis is None or now < self._next_periodic:
            return []
        self._next_periodic = now + self.config.optimize_interval_s / 10
        out = []
        for user_id in await self.due_users():
            if turn is not None:
                await turn()
            try:
                out.append(await self.optimize(user_id, only_if_due=True))
            except Exception as exc:  # one user's failure must not stop the round for everyone else
                if is_transient(exc):
                    raise
                log.warning("ltm.optimize_failed", user_id=user_id, error=type(exc).__name__, exc_info=True)
                out.append({"user_id": user_id, "status": "failed", "error": type(exc).__name__})
                async with self.pool.connection() as conn:  # retried after the interval, not every round
                    await conn.execute(
                        MARK_OPTIMIZED, {"user_id": user_id})
        return out
