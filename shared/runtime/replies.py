"""Waiting for chat replies on ``ai_responses``: one reader for any number of waiters, like the RPC client.

A waiter registers the input's ``message_id`` before the input is sent (:meth:`ReplyWaiter.expect`), so a reply
cannot slip past; one task reads the stream from the moment the waiter started and resolves the matching future;
the entry is removed on every path (reply, timeout, cancel) and replies nobody waits for are dropped. Used by the
HTTP gateway (services/gateway/).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis

from shared.contracts import AI_RESPONSE, AIResponse, DecodeError, decode
from shared.runtime.backoff import Backoff
from shared.runtime.errors import REDIS_ERRORS, redis_failed
from shared.runtime.logging import get_logger

log = get_logger(__name__)


class ReplyWaiter:
    def __init__(self, redis: aioredis.Redis, stream: str, block_ms: int = 500) -> None:
        self.redis, self.stream, self.block_ms = redis, stream, block_ms
        self._pending: dict[str, asyncio.Future[AIResponse]] = {}
        self._task: asyncio.Task[None] | None = None
        self._cursor: Any = "$"

    async def start(self) -> None:
        last: Any = await self.redis.xrevrange(self.stream, count=1)
        self._cursor = last[0][0] if last else "0-0"  # replies from now on (an explicit id: none is skipped)
        self._task = asyncio.create_task(self._read(), name="replies.reader")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @contextlib.contextmanager
    def expect(self, message_id: str) -> Iterator[asyncio.Future[AIResponse]]:
        """Register before sending; the future resolves with the reply. Removed on leaving the block."""
        fut: asyncio.Future[AIResponse] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = fut
        try:
            yield fut
        finally:
            if self._pending.get(message_id) is fut:
                del self._pending[message_id]

    async def _read(self) -> None:
        backoff = Backoff()
        while True:
            try:
                rows: Any = await self.redis.xread({self.stream: self._cursor}, block=self.block_ms, count=200)
                backoff.reset()
            except REDIS_ERRORS as exc:  # an outage; NOPERM (an ACL without XREAD)...: never dies unseen
                redis_failed(exc, None, "replies", stream=self.stream)
                await backoff.sleep()
                continue
            for _stream, entries in rows or []:
                for entry_id, fields in entries:
                    self._cursor = entry_id
                    if not self._pending:
                        continue
                    try:
                        reply = decode(AI_RESPONSE, fields.get(b"data"), max_content_bytes=1 << 30)
                    except DecodeError:
                        continue
                    fut = self._pending.get(reply.in_reply_to)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)
