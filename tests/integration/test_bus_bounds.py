"""Bounds of the bus's request/response plumbing on a real Redis: a request list nobody serves stays bounded, and a
pub/sub callback's failure does not end the subscription."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from shared.contracts import Names
from shared.contracts.memory_api import MEMORY_RESPONSE, MemoryResponse
from shared.contracts.ping import PingRequest
from shared.runtime.metrics import Metrics
from shared.runtime.pubsub import listen
from shared.runtime.requests import RpcClient
from tests.helpers import wait_until


async def test_a_request_list_nobody_serves_keeps_only_its_newest_requests(redis: aioredis.Redis,
                                                                           names: Names) -> None:
    queue = f"{names.prefix}bounds:requests"
    client: RpcClient[MemoryResponse] = RpcClient(redis, queue=queue, reply_channel=f"{names.prefix}bounds:replies",
                                                  adapter=MEMORY_RESPONSE, metrics=Metrics(), max_queue=3)
    await client.start()
    try:
        for i in range(5):  # ltm down: every request waits out its timeout, and the list would grow by one each
            with pytest.raises(TimeoutError):
                await client.call(PingRequest(request_id=f"r{i}", type="ping"), 0.02)
        assert [json.loads(r)["request_id"] for r in await redis.lrange(queue, 0, -1)] == ["r2", "r3", "r4"]
        assert client.metrics.get("rpc.queue_trimmed") == 2
    finally:
        await client.close()
        await redis.delete(queue)


async def test_a_failing_callback_does_not_end_the_subscription(redis: aioredis.Redis, names: Names) -> None:
    channel = f"{names.prefix}bounds:channel"
    got: list[bytes] = []
    ready, stop, metrics = asyncio.Event(), asyncio.Event(), Metrics()

    def on_message(data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("a bug in the callback")
        got.append(data)

    task = asyncio.create_task(listen(redis, channel, on_message, stop, metrics=metrics, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await redis.publish(channel, "boom")
        await redis.publish(channel, "after")
        await wait_until(lambda: got == [b"after"], message=lambda: f"the next message heard (got {got})")
        assert metrics.get("pubsub.handler_errors") == 1 and not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
