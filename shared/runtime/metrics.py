"""Process-local counters, mirrored into a Redis hash (``metrics:<service>``) for operators.

Counting never touches Redis on the hot path: a flush task adds the deltas every
``interval`` seconds with HINCRBY, so ``redis-cli HGETALL metrics:ltm`` shows the
mesh-wide totals of every copy of a service.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import redis.asyncio as aioredis
import redis.exceptions

from shared.runtime.logging import get_logger
from shared.runtime.prom import EVENTS

log = get_logger(__name__)


class Metrics:
    def __init__(self, redis: aioredis.Redis | None = None, key: str | None = None, service: str | None = None) -> None:
        """``service``: the label of its Prometheus series (default: the last part of ``key``, metrics:<service>)."""
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._redis = redis
        self._key = key
        self.service = service or (key.rsplit(":", 1)[-1] if key else "local")
        EVENTS.add(self)  # mesh_events_total on /metrics

    def incr(self, name: str, n: int = 1) -> None:
        self.totals[name] += n
        self._pending[name] += n

    def get(self, name: str) -> int:
        return self.totals[name]

    async def flush(self) -> None:
        if self._redis is None or self._key is None or not self._pending:
            return
        delta, self._pending = self._pending, Counter()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name, n in delta.items():
                    pipe.hincrby(self._key, name, n)
                await pipe.execute()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            self._pending.update(delta)  # try again next time

    async def run(self, stop: asyncio.Event, interval: float = 2.0) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
            await self.flush()
