"""Writer of short-term memory: recent turns in a sorted set, trimmed, with a TTL."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.contracts import Names
from shared.runtime.stm import Turn


class StmWriter:
    def __init__(self, redis: aioredis.Redis, names: Names, max_messages: int, ttl_s: int) -> None:
        self.redis, self.names = redis, names
        self.max_messages, self.ttl_s = max_messages, ttl_s

    async def append(self, session_id: str, user_id: str | None, turn: Turn) -> list[Turn]:
        """Add a turn; returns the turns that left the window (oldest first)."""
        turns_key, meta_key = self.names.stm_turns(session_id), self.names.stm_meta(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(turns_key, {turn.member(): turn.timestamp})
            pipe.zrange(turns_key, 0, -(self.max_messages + 1))
            pipe.zremrangebyrank(turns_key, 0, -(self.max_messages + 1))
            pipe.hset(meta_key, mapping={"user_id": user_id or ""})
            pipe.expire(turns_key, self.ttl_s)
            pipe.expire(meta_key, self.ttl_s)
            pipe.expire(self.names.stm_summary(session_id), self.ttl_s)
            res = await pipe.execute()
        return [Turn.parse(m) for m in res[1]]
