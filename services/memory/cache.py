"""Read-through cache of session reads in Redis, with a TTL and invalidation on every write.

Invalidation is by generation, not by deleting entries: each session (and each user's session list)
has a generation key holding a random token, and cached values live under ``...:<token>``. A write
replaces the token, so every older entry is unreachable at once, and a reader that loaded from
PostgreSQL *before* a write and stores its value *after* it stores it under the old token, where no one
looks: the usual delete-then-stale-refill race cannot serve stale data. Old entries simply expire.
Layout (``cache:`` prefix of the names module): ``cache:memory:gen:<session_id>``,
``cache:memory:ugen:<user_id>``, ``cache:memory:<kind>:<user_id>:<id>:<token>``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline

from shared.contracts import Names
from shared.runtime import prom
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics

log = get_logger(__name__)


class SessionCache:
    def __init__(self, redis: aioredis.Redis, names: Names, ttl_s: int, metrics: Metrics) -> None:
        self.redis, self.names, self.ttl_s, self.metrics = redis, names, ttl_s, metrics
        self.enabled = ttl_s > 0

    def _gen_key(self, scope: str, ident: str) -> str:
        return self.names.cache("memory", scope, ident)

    async def _generation(self, gen_key: str) -> str:
        token = await self.redis.get(gen_key)
        if token is None:
            fresh = uuid.uuid4().hex
            # NX: two first readers agree on one token. The TTL outlives every entry made under it.
            await self.redis.set(gen_key, fresh, nx=True, ex=self.ttl_s * 4)
            token = await self.redis.get(gen_key) or fresh.encode()
        return token.decode() if isinstance(token, bytes) else str(token)

    async def get_or_load(self, kind: str, user_id: str, ident: str, scope: str,
                          load: Callable[[], Awaitable[Any]]) -> Any:
        """The cached JSON value of ``kind`` for (user, ident), or ``load()`` stored under the current generation.

        ``scope`` names whose generation guards it: ``gen`` (a session id) or ``ugen`` (a user id).
        """
        if not self.enabled:
            return await load()
        try:
            token = await self._generation(self._gen_key(scope, ident if scope == "gen" else user_id))
            key = self.names.cache("memory", kind, user_id, ident, token)
            raw = await self.redis.get(key)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self.metrics.incr("cache.unavailable")
            return await load()  # the cache is an optimisation: PostgreSQL answers without it
        if raw is not None:
            self.metrics.incr("cache.hit")
            prom.CACHE_HITS.labels(self.metrics.service, "session_reads").inc()
            return json.loads(raw)
        self.metrics.incr("cache.miss")
        prom.CACHE_MISSES.labels(self.metrics.service, "session_reads").inc()
        value = await load()
        try:
            await self.redis.set(key, json.dumps(value, separators=(",", ":")), ex=self.ttl_s)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self.metrics.incr("cache.unavailable")
        return value

    async def invalidate(self, session_id: str | None, user_id: str | None) -> None:
        """New generations for the session and the user's list; cheap enough to call on every write."""
        if not self.enabled:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_invalidate(pipe, session_id, user_id)
            await pipe.execute()

    def queue_invalidate(self, pipe: Pipeline, session_id: str | None, user_id: str | None) -> None:
        """The same, queued into the caller's pipeline (the write path sends it with the STM update)."""
        if not self.enabled:
            return
        if session_id:
            pipe.set(self._gen_key("gen", session_id), uuid.uuid4().hex, ex=self.ttl_s * 4)
        if user_id:
            pipe.set(self._gen_key("ugen", user_id), uuid.uuid4().hex, ex=self.ttl_s * 4)
