"""Writer of short-term memory: the recent-turn window, the rolling summary, and rehydration.

The memory service is the only writer (layout in shared/contracts/names.py). Appending is one
MULTI pipeline that adds the turn and trims the window to ``STM_MAX_MESSAGES``; that is all a store
waits for. When turns fell out of the window, a background *catch-up* for the session folds them
into the summary (see services/memory/summary.py): under a per-session Redis lock, it folds every
stored turn older than the window's oldest turn that the summary has not folded in yet, read from
PostgreSQL. What is folded in is kept by message_index (the summary's *fold point*: every index up to
one, but the few turns skipped because they were still in the window), not by time: message indexes are
given under the session's row lock, so in commit order, and a turn stored late with an older timestamp
than turns already folded (an import into a live session, two writers racing, a client's clock) is
folded by the next catch-up like any other. So a catch-up that was lost (crash, error) is made good by
the next one, and several writers of one session, in one process or several, never fold a turn twice or
skip one. The summary is written to Redis for readers and to PostgreSQL (``conversation_sessions``) as the
durable copy.

PostgreSQL is the source of truth. When the STM is gone from Redis (restart, eviction, FLUSHALL,
TTL) the first write or read rebuilds it: the stored summary, plus the turns it does not cover yet,
of which the newest ``STM_MAX_MESSAGES`` form the window and the rest are folded in. For a session
whose summary is current that is two indexed queries, whatever the session's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import LockError

from services.memory.cache import SessionCache
from services.memory.store import Backlog, ConversationStore
from services.memory.summary import Summariser, SummaryState
from shared.contracts import Names
from shared.runtime.errors import TransientError
from shared.runtime.logging import get_logger
from shared.runtime.runner import batch, is_cluster
from shared.runtime.stm import Stm, Turn, read_stm

log = get_logger(__name__)

# The summary's HSET and TTL, only while the session's meta exists (KEYS: summary, meta; ARGV: ttl, then field and
# value pairs): a fold that ends after the session's keys were dropped (a failed catch-up, a deletion) or expired
# leaves no summary behind without its owner. 1 when written.
_SUMMARY_IF_PRESENT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class StmWriter:
    def __init__(self, redis: aioredis.Redis, names: Names, store: ConversationStore, summariser: Summariser,
                 max_messages: int, ttl_s: int, lock_timeout_s: float = 120.0, catch_up_delay_s: float = 0.0,
                 cache: SessionCache | None = None) -> None:
        """``cache``: the session read cache, whose reads carry the summary (``context_summary``, ``summary_turns``):
        a saved summary invalidates them, as a write does."""
        self.redis, self.names, self.store, self.summariser = redis, names, store, summariser
        self.cache = cache
        self.max_messages, self.ttl_s = max_messages, ttl_s
        self.lock_timeout_s = lock_timeout_s
        self.catch_up_delay_s = catch_up_delay_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self.failures = 0

    # ------------------------------------------------------------------ writing
    async def append(self, session_id: str, user_id: str | None, turn: Turn | None,
                     also: Callable[[Pipeline], None] | None = None) -> list[Turn]:
        """Add a turn (stored in PostgreSQL already; None: none, the window is only kept alive and ``also`` run);
        returns the turns that left the window.

        When Redis had no STM for the session it is rebuilt from PostgreSQL first (the rebuild includes
        this turn). Turns that left the window are folded into the summary in the background. ``also``
        queues the caller's own commands into the same MULTI (one round trip for the whole write).
        """
        owner, evicted = await self._add(session_id, user_id, [] if turn is None else [turn], also=also)
        if owner is not None and owner != (user_id or ""):
            # another user's STM under this session id (left by a deletion that raced its write): PostgreSQL gives
            # the session to this user now, so none of it is theirs; rebuilt from what is (this turn included)
            log.warning("memory.stm_foreign_dropped", session_id=session_id)
            await self.forget_session(session_id)
            owner = None
        if owner is None:  # the write made no meta: until the rebuild does, readers see no STM (and ask for it)
            await self.rehydrate(session_id, user_id, unless_present=True)
        elif evicted:
            self.schedule_catch_up(session_id, user_id)
        return evicted

    async def _add(self, session_id: str, user_id: str | None, turns: Sequence[Turn],
                   rehydrated_at: float | None = None,
                   also: Callable[[Pipeline], None] | None = None) -> tuple[str | None, list[Turn]]:
        """ZADD the turns, trim the window; (the STM's owner before, None when it had no STM: its meta's
        ``user_id``; turns that left the window). Only a rebuild (``rehydrated_at``) writes the meta, which marks the
        STM present: a write that found none once made it, and until the rebuild ended (or after it failed, or when
        a failed one undid it after another's had succeeded) a reader took the new turn alone for the session's
        window."""
        turns_key, meta_key = self.names.stm_turns(session_id), self.names.stm_meta(session_id)
        meta = {"user_id": user_id or ""}
        if rehydrated_at is not None:
            meta["rehydrated_at"] = repr(rehydrated_at)
        cluster = is_cluster(self.redis)  # the session's keys share a slot (names.py); the caller's may not
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(meta_key, "user_id")
            if turns:
                pipe.zadd(turns_key, {t.member(): t.timestamp for t in turns})
            pipe.zrange(turns_key, 0, -(self.max_messages + 1))
            pipe.zremrangebyrank(turns_key, 0, -(self.max_messages + 1))
            if rehydrated_at is not None:
                pipe.hset(meta_key, mapping=meta)  # type: ignore[arg-type]
            pipe.expire(turns_key, self.ttl_s)
            pipe.expire(meta_key, self.ttl_s)
            pipe.expire(self.names.stm_summary(session_id), self.ttl_s)
            if also is not None and not cluster:
                also(pipe)
            res = await pipe.execute()
        if also is not None and cluster:  # other slots: a pipeline of their own (a redelivery repairs a partial write)
            async with batch(self.redis) as other:
                also(other)
                await other.execute()
        evicted_raw = res[2] if turns else res[1]
        owner = None if res[0] is None else res[0].decode("utf-8", "replace")
        return owner, [Turn.parse(m) for m in evicted_raw]

    def _lock(self, session_id: str):  # type: ignore[no-untyped-def]  # redis.asyncio.lock.Lock
        return self.redis.lock(self.names.lock("stm", session_id), timeout=self.lock_timeout_s, sleep=0.005,
                               blocking_timeout=self.lock_timeout_s)

    def schedule_catch_up(self, session_id: str, user_id: str | None) -> None:
        """Run a catch-up for the session (of ``user_id``, whose rows it reads) soon; one at a time per session (a
        request while one runs re-runs it)."""
        if session_id in self._tasks:
            self._again.add(session_id)
            return
        self._tasks[session_id] = asyncio.create_task(self._catch_up_loop(session_id, user_id))

    async def _catch_up_loop(self, session_id: str, user_id: str | None) -> None:
        try:
            while True:
                if self.catch_up_delay_s:
                    # Debounce: the evictions of a burst of turns are folded together, in one pass.
                    await asyncio.sleep(self.catch_up_delay_s)
                self._again.discard(session_id)
                try:
                    await self.catch_up(session_id, user_id)
                except Exception as exc:  # noqa: BLE001 - background work: log, and let the next access rebuild
                    self.failures += 1
                    log.warning("memory.stm_catch_up_failed", session_id=session_id,
                                error=f"{type(exc).__name__}: {exc}")
                    await self._forget(session_id)
                if session_id not in self._again:
                    return
        finally:
            self._tasks.pop(session_id, None)

    async def catch_up(self, session_id: str, user_id: str | None) -> None:
        """Fold every stored turn older than the window that the summary has not folded in yet."""
        try:
            async with self._lock(session_id):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrange(self.names.stm_turns(session_id), 0, 0, withscores=True)
                    pipe.hgetall(self.names.stm_summary(session_id))
                    oldest, summary = await pipe.execute()
                if not oldest:
                    return  # no window (expired, flushed): the next access rebuilds everything
                cached = SummaryState.from_redis(summary)
                state = cached if cached is not None else await self.store.load_summary(user_id, session_id)
                state = await self._with_fold_point(session_id, user_id, state)
                backlog = await self.store.unfolded_turns(user_id, session_id, state, before=float(oldest[0][1]))
                if backlog.turns:
                    await self._fold_locked(session_id, user_id, backlog, state)
        except LockError as exc:
            raise TransientError(f"STM lock for the session not acquired: {exc}") from exc

    async def drain(self) -> None:
        """Wait for the background catch-ups (tests, benchmarks, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def drain_forever(self, stop: asyncio.Event) -> None:
        """A service's background task: once ``stop`` is set, wait for the catch-ups in flight (the service's
        shutdown grace bounds it; a catch-up cut short leaves the summary to be rebuilt from PostgreSQL)."""
        await stop.wait()
        await self.drain()

    async def _forget(self, session_id: str) -> None:
        """After a failed catch-up: drop the session's STM, so the next access rebuilds it from PostgreSQL (nothing
        is lost). All three keys: turns or a summary left without their meta have no owner to check a reader
        against (shared/runtime/stm.py)."""
        try:
            await self.forget_session(session_id)
        except Exception:  # noqa: BLE001 - best effort; the original error is what the caller must see
            log.warning("memory.stm_forget_failed", session_id=session_id)

    async def _fold_locked(self, session_id: str, user_id: str | None, backlog: Backlog,
                           state: SummaryState) -> None:
        new_state = await self._fold(state, backlog)
        if new_state is not state:
            await self._write_summary(session_id, new_state)
            await self._save_summary(user_id, session_id, new_state)

    async def _save_summary(self, user_id: str | None, session_id: str, state: SummaryState) -> None:
        """The durable copy in PostgreSQL, then the session's cached reads (and its user's session list) made stale:
        they show the summary, and a read cached between a turn's write and its fold would otherwise show the old
        one until its TTL (the background fold saves after the write's own invalidation)."""
        await self.store.save_summary(user_id, session_id, state)
        if self.cache is not None:
            await self.cache.invalidate(session_id, user_id)

    async def _with_fold_point(self, session_id: str, user_id: str | None, state: SummaryState) -> SummaryState:
        """A state saved before fold points were kept, converted and saved at once (held under the lock): converted
        again later, a turn stored late meanwhile would pass for folded by its timestamp."""
        if state.folded_through is not None:
            return state
        state = await self.store.fold_point_of(user_id, session_id, state)
        await self._write_summary(session_id, state)
        await self._save_summary(user_id, session_id, state)
        return state

    async def _fold(self, state: SummaryState, backlog: Backlog) -> SummaryState:
        """The summary with the backlog's turns folded in, its fold point moved past them (held under the lock)."""
        if not backlog.turns:
            return state
        folded = await self.summariser.fold(state, backlog.turns, backlog.scores)
        through, holes = state.folding(backlog.indexes[t.message_id] for t in backlog.turns)
        return replace(folded, folded_through=through, not_folded=holes)

    async def _write_summary(self, session_id: str, state: SummaryState, *, rebuilding: bool = False) -> None:
        """The summary for readers: while the session's STM is in Redis (its meta there), or unconditionally when
        ``rebuilding`` it from PostgreSQL (under the lock, just before its window and meta are written)."""
        key = self.names.stm_summary(session_id)
        mapping = state.redis_mapping(time.time())
        if rebuilding:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
            return
        pairs = [x for k, v in mapping.items() for x in (k, v)]
        await self.redis.eval(_SUMMARY_IF_PRESENT, 2, key, self.names.stm_meta(session_id),  # type: ignore[misc]
                              self.ttl_s, *pairs)

    async def window_ids(self, session_id: str) -> set[str]:
        """The message ids of the turns in the session's window (whatever the spelling of their members)."""
        members: Any = await self.redis.zrange(self.names.stm_turns(session_id), 0, -1)
        ids = set()
        for m in members:
            with contextlib.suppress(ValueError, KeyError):
                ids.add(Turn.parse(m).message_id)
        return ids

    # ------------------------------------------------------------------ rebuilding
    async def rehydrate(self, session_id: str, user_id: str | None, *, unless_present: bool = False) -> None:
        """Rebuild the session's STM from PostgreSQL; ``unless_present``: not when, once this has the session's
        lock, the STM is there for this user (another write or read rebuilt it meanwhile: this write's turn was in
        the window before that rebuild wrote it, or in the rows it read)."""
        try:
            async with self._lock(session_id):
                if unless_present and await self.redis.hget(self.names.stm_meta(session_id), "user_id") in (
                        (user_id or "").encode(), user_id or ""):
                    return
                state = await self._with_fold_point(session_id, user_id,
                                                    await self.store.load_summary(user_id, session_id))
                stored = await self.store.unfolded_turns(user_id, session_id, state)
                rows = stored.turns
                window, backlog = rows[-self.max_messages:], rows[: -self.max_messages]
                if backlog:
                    state = await self._fold(state, stored._replace(turns=backlog))
                    await self._save_summary(user_id, session_id, state)
                if state.text or state.turns:
                    await self._write_summary(session_id, state, rebuilding=True)
                else:  # nothing to summarise yet: no summary left over from before either
                    await self.redis.delete(self.names.stm_summary(session_id))
                # A turn the write path added just before (the one that found the STM missing) is in the
                # window too, but its timestamp from PostgreSQL is rounded to microseconds: a different
                # member. Keep the one already there.
                present = await self.window_ids(session_id)
                window = [t for t in window if t.message_id not in present]
                _, evicted = await self._add(session_id, user_id, window, rehydrated_at=time.time())
        except LockError as exc:
            raise TransientError(f"STM lock for the session not acquired: {exc}") from exc
        if evicted:  # a turn newer than our read arrived meanwhile and pushed these out
            self.schedule_catch_up(session_id, user_id)
        log.info("memory.stm_rehydrated", session_id=session_id, turns=len(rows) - len(backlog), folded=len(backlog))

    async def read(self, session_id: str, user_id: str | None) -> tuple[Stm, bool]:
        """The session's STM, rebuilt first when Redis lost it; (stm, rebuilt now)."""
        stm = await read_stm(self.redis, self.names, session_id)
        if stm.exists and stm.readable_by(user_id):
            return stm, False
        if stm.exists:  # another user's leftover (see append): the session is this user's in PostgreSQL now
            log.warning("memory.stm_foreign_dropped", session_id=session_id)
            await self.forget_session(session_id)
        await self.rehydrate(session_id, user_id, unless_present=True)
        return await read_stm(self.redis, self.names, session_id), True

    async def forget_session(self, session_id: str) -> None:
        """A deleted session leaves nothing behind in Redis."""
        await self.redis.delete(self.names.stm_turns(session_id), self.names.stm_summary(session_id),
                                self.names.stm_meta(session_id))
