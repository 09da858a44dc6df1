"""The request server's order on a real Redis list: oldest first while the list keeps up, newest first while it is
congested (a request taken had expired: its requester gave up), back to oldest first once the list is empty or its
oldest request has time left."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from shared.contracts import Names
from shared.contracts.ping import CHAT_REQUEST, PingRequest, PingResponse
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RequestServer
from tests.helpers import wait_until


async def test_a_congested_list_is_served_newest_first_while_its_oldest_has_expired(redis: aioredis.Redis,
                                                                                   names: Names) -> None:
    queue, channel = f"{names.prefix}order:requests", f"{names.prefix}order:replies"
    served: list[str] = []

    async def handle(request: PingRequest) -> PingResponse:
        served.append(request.request_id)
        return PingResponse(request_id=request.request_id)

    def request(request_id: str, deadline: float) -> str:
        return json.dumps({"request_id": request_id, "type": "ping", "data": {}, "deadline": deadline})

    now = time.time()
    # the requesters of the three "late" gave up a second ago; four more wait behind them with time left
    await redis.rpush(queue, *(request(f"late-{i}", now - 1) for i in range(3)),
                      *(request(f"fresh-{i}", now + 600) for i in range(4)))
    metrics = Metrics()
    server: RequestServer[Any] = RequestServer(
        redis, queue=queue, reply_channel=channel, adapter=CHAT_REQUEST, handler=handle,
        error_reply=PingResponse.failure, metrics=metrics, max_content_bytes=1024, concurrency=1, block_s=0.1)
    task = asyncio.create_task(server.run())
    try:
        await wait_until(lambda: len(served) == 4, message=lambda: f"four served (saw {served})")
        # newest first once "late-0" showed the list behind, the expired bottom taken in between and dropped; once
        # the oldest left has time, oldest first: it would otherwise wait below every newer request
        assert served == ["fresh-3", "fresh-2", "fresh-1", "fresh-0"]
        assert metrics.get("expired") == 3
        await redis.rpush(queue, request("next-0", time.time() + 600), request("next-1", time.time() + 600))
        await wait_until(lambda: len(served) == 6, message=lambda: f"six served (saw {served})")
        assert served[4:] == ["next-0", "next-1"]  # the list emptied: oldest first again
        await redis.rpush(queue, request("late-3", time.time() - 1), request("old", time.time() + 600),
                          *(request(f"new-{i}", time.time() + 600) for i in range(2)))
        await wait_until(lambda: len(served) == 9, message=lambda: f"nine served (saw {served})")
        assert served[6:] == ["new-1", "old", "new-0"]  # one newest, then the oldest has time left: oldest first
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)
    assert await redis.llen(queue) == 0


async def test_a_slow_request_is_logged_with_where_its_time_went(redis: aioredis.Redis, names: Names,
                                                                  monkeypatch: Any) -> None:
    """REQUEST_SLOW_MS: a request slow in all (waiting on the list, or served slowly) is logged as ``requests.slow``
    with both times and counted; a fast one is not; 0 logs none. An overloaded server logs one a second and counts
    every one."""
    from shared.runtime import requests as module

    queue, channel = f"{names.prefix}slow:requests", f"{names.prefix}slow:replies"
    seen: list[dict[str, Any]] = []

    class Recorder:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: seen.append({"event": event, "level": level, **kw})

    monkeypatch.setattr(module, "log", Recorder())
    served: list[str] = []

    async def handle(request: PingRequest) -> PingResponse:
        if request.request_id.startswith("slow"):
            await asyncio.sleep(0.4)  # the handler's own work, as a slow search's
        served.append(request.request_id)
        return PingResponse(request_id=request.request_id)

    def request(request_id: str, now: float) -> str:
        sent_at = now - 1.0 if request_id.startswith("queued") else now + 60 if request_id == "fast" else now
        body = {"request_id": request_id, "type": "ping", "data": {}, "sent_at": sent_at}
        if request_id == "unsent":  # a requester that does not say when it sent: served time only
            del body["sent_at"]
        return json.dumps(body)

    # "fast" says it was sent a minute from now (another host's clock): not queued for that; "queued" waited 1 s
    rounds = ((300.0, 0.0, ["fast", "slow", "queued", "unsent"]), (0.0, 0.0, ["slow-unlogged", "queued-unlogged"]),
              (300.0, 60.0, ["slow-a", "slow-b", "queued-c"]))
    for slow_ms, every_s, ids in rounds:
        monkeypatch.setattr(module, "SLOW_LOG_EVERY_S", every_s)
        seen.clear()
        served.clear()
        metrics = Metrics()
        server: RequestServer[Any] = RequestServer(
            redis, queue=queue, reply_channel=channel, adapter=CHAT_REQUEST, handler=handle,
            error_reply=PingResponse.failure, metrics=metrics, max_content_bytes=1024, concurrency=1, block_s=0.1,
            slow_ms=slow_ms)
        now = time.time()
        await redis.rpush(queue, *(request(i, now) for i in ids))
        task = asyncio.create_task(server.run())
        try:
            await wait_until(lambda want=ids: len(served) == len(want),  # type: ignore[misc]
                             message=lambda want=ids: f"{want} served (saw {served})")  # type: ignore[misc]
        finally:
            server.stop()
            await asyncio.wait_for(task, 10)
        slow = {e["request_id"]: e for e in seen if e["event"] == "requests.slow"}
        if not slow_ms:
            assert slow == {} and metrics.get("slow") == 0
            continue
        if every_s:  # the first logged, the next two counted only
            assert list(slow) == ["slow-a"] and metrics.get("slow") == 3 and slow["slow-a"]["unlogged"] == 0
            continue
        assert set(slow) == {"slow", "queued"} and metrics.get("slow") == 2, seen
        assert slow["slow"]["served_ms"] >= 400 and slow["slow"]["type"] == "ping" and slow["slow"]["outcome"] == "ok"
        assert slow["queued"]["queued_ms"] >= 1000 and slow["queued"]["served_ms"] < 300
        assert slow["slow"]["level"] == "warning" and slow["slow"]["in_flight"] >= 1
