"""Graceful shutdown with a time limit, on a real Redis: work that finishes within the grace period is
acknowledged (or answered); work that does not is cancelled, its stream entry left pending and taken over by
another consumer exactly once, its request answered ``unavailable``; stop never waits past the grace."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from shared.contracts import ErrorCode, Names, new_id
from shared.contracts.ping import CHAT_REQUEST, PING_RESPONSE, PingRequest, PingResponse
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RequestServer
from shared.runtime.streams import StreamConsumer
from tests.helpers import Replies, wait_until


def consumer(redis: aioredis.Redis, stream: str, name: str, handler: Any, drain_s: float,
             metrics: Metrics, claim_idle_ms: int = 60_000) -> StreamConsumer:
    return StreamConsumer(redis, stream=stream, group="g", consumer=name, handler=handler, metrics=metrics,
                          concurrency=4, block_ms=100, claim_idle_ms=claim_idle_ms, drain_s=drain_s)


async def test_stop_cancels_what_outlasts_the_grace_and_another_consumer_takes_it_over(
        redis: aioredis.Redis, names: Names) -> None:
    stream = f"{names.prefix}shutdown:stream"
    started: list[str] = []
    done: dict[str, list[str]] = {}

    def handler_of(name: str, slow: float) -> Any:
        async def handle(entry_id: str, raw: Any) -> None:
            body = json.loads(raw)
            started.append(body["n"])
            await asyncio.sleep(slow if body["n"] == "slow" else 0.2)
            done.setdefault(body["n"], []).append(name)
        return handle

    metrics = Metrics()
    first = consumer(redis, stream, "first", handler_of("first", 60.0), drain_s=1.0, metrics=metrics)
    task = asyncio.create_task(first.run())
    for n in ("slow", "quick"):
        await redis.xadd(stream, {"data": json.dumps({"n": n})})
    await wait_until(lambda: set(started) == {"slow", "quick"}, message=f"both handlers running (saw {started})")
    stopping = time.monotonic()
    first.stop()
    await asyncio.wait_for(task, 10)
    assert time.monotonic() - stopping < 3.0  # the grace (1 s) plus a read, not the slow handler's 60 s
    assert done == {"quick": ["first"]}  # finished within the grace: handled and acknowledged
    assert metrics.get("drain_cancelled") == 1
    pending: Any = await redis.xpending_range(stream, "g", min="-", max="+", count=10)
    assert [p["consumer"] for p in pending] == [b"first"], pending  # the slow one stays pending, unacknowledged

    second = consumer(redis, stream, "second", handler_of("second", 0.1), drain_s=1.0, metrics=Metrics(),
                      claim_idle_ms=200)
    task = asyncio.create_task(second.run())
    try:
        await wait_until(lambda: "slow" in done, timeout=15, message=f"the slow entry taken over (done {done})")
        await wait_until(lambda: _pending_zero(redis, stream), timeout=10, message="nothing pending after it")
    finally:
        second.stop()
        await asyncio.wait_for(task, 10)
    assert done == {"quick": ["first"], "slow": ["second"]}  # each entry handled to the end exactly once


async def _pending_zero(redis: aioredis.Redis, stream: str) -> bool:
    summary: Any = await redis.xpending(stream, "g")
    return int(summary["pending"]) == 0


async def test_a_request_cut_short_by_shutdown_is_answered_unavailable(redis: aioredis.Redis, names: Names) -> None:
    queue, channel = f"{names.prefix}shutdown:requests", f"{names.prefix}shutdown:replies"
    entered = asyncio.Event()

    async def slow(request: PingRequest) -> PingResponse:
        entered.set()
        await asyncio.sleep(60)
        return PingResponse(request_id=request.request_id)

    server: RequestServer[Any] = RequestServer(
        redis, queue=queue, reply_channel=channel, adapter=CHAT_REQUEST, handler=slow,
        error_reply=PingResponse.failure, metrics=Metrics(), max_content_bytes=1024, block_s=0.1, drain_s=0.5)
    task = asyncio.create_task(server.run())
    async with Replies(redis, channel, PING_RESPONSE) as replies:
        request_id = new_id()
        await redis.rpush(queue, json.dumps({"request_id": request_id, "type": "ping", "data": {}}))
        await asyncio.wait_for(entered.wait(), 10)
        stopping = time.monotonic()
        server.stop()
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - stopping < 2.5
        reply = await replies.get(request_id, timeout=5)
    assert reply.success is False and reply.error is not None and reply.error.code == ErrorCode.UNAVAILABLE
    assert server.metrics.get("drain_cancelled") == 1


async def test_work_within_the_grace_drains_before_stop_returns(redis: aioredis.Redis, names: Names) -> None:
    stream = f"{names.prefix}shutdown:drained"
    finished: list[str] = []
    running = asyncio.Event()

    async def handle(entry_id: str, raw: Any) -> None:
        running.set()
        await asyncio.sleep(0.5)
        finished.append(entry_id)

    metrics = Metrics()
    c = consumer(redis, stream, "only", handle, drain_s=10.0, metrics=metrics)
    task = asyncio.create_task(c.run())
    await redis.xadd(stream, {"data": "{}"})
    await asyncio.wait_for(running.wait(), 10)
    c.stop()
    await asyncio.wait_for(task, 10)
    assert len(finished) == 1 and metrics.get("drain_cancelled") == 0
    assert await _pending_zero(redis, stream)  # acknowledged before run() returned
