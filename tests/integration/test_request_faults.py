"""A request server under what Redis and requesters can throw at it: a Redis that refuses writes (a replica during a
failover: READONLY) is waited out, not a crash of the service; a nested request at the bottom of a congested list
is dead-lettered, not a crash; a reply pydantic cannot encode becomes an ``internal`` error reply, not silence."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mesh.redis_server import RedisServer
from shared.contracts import Names
from shared.contracts.ping import CHAT_REQUEST, PING_RESPONSE, PingRequest, PingResponse
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RequestServer, RpcClient
from tests.helpers import wait_until


def _request(request_id: str, deadline: float) -> str:
    return json.dumps({"request_id": request_id, "type": "ping", "data": {}, "deadline": deadline})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(redis: aioredis.Redis, queue: str, channel: str, metrics: Metrics, handle: Any) -> RequestServer[Any]:
    return RequestServer(redis, queue=queue, reply_channel=channel, adapter=CHAT_REQUEST, handler=handle,
                         error_reply=PingResponse.failure, metrics=metrics, max_content_bytes=1024, concurrency=1,
                         block_s=0.1)


async def test_a_read_only_redis_is_waited_out_and_requests_are_served_after(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, persist=False)
    server.start()
    redis = aioredis.from_url(server.url)
    metrics = Metrics()
    requests = _server(redis, "q", "replies", metrics, lambda r: _pong(r))
    task = asyncio.create_task(requests.run())
    client: RpcClient[PingResponse] = RpcClient(redis, queue="q", reply_channel="replies:client",
                                                adapter=PING_RESPONSE, metrics=Metrics())
    try:
        await client.start()
        assert (await client.call(PingRequest(request_id="before", type="ping"), 5)).success
        # a replica of a primary it cannot reach: every write (BLPOP among them) is refused with READONLY
        await redis.execute_command("REPLICAOF", "127.0.0.1", str(_free_port()))
        await wait_until(lambda: metrics.get("redis_reconnects") >= 2 or task.done(),
                         message=lambda: f"READONLY met (counters {dict(metrics.totals)})")
        assert not task.done(), f"the request server stopped: {task.exception()!r}"
        await redis.execute_command("REPLICAOF", "NO", "ONE")
        assert (await client.call(PingRequest(request_id="after", type="ping"), 5)).success
    finally:
        requests.stop()
        await asyncio.wait_for(task, 10)
        await client.close()
        await redis.aclose()
        server.stop()


async def _pong(request: PingRequest) -> PingResponse:
    return PingResponse(request_id=request.request_id)


async def test_a_nested_request_at_the_bottom_of_a_congested_list_is_dead_lettered(redis: aioredis.Redis,
                                                                                  names: Names) -> None:
    queue, channel = f"{names.prefix}faults:requests", f"{names.prefix}faults:replies"
    served: list[str] = []

    async def handle(request: PingRequest) -> PingResponse:
        served.append(request.request_id)
        return PingResponse(request_id=request.request_id)

    now = time.time()
    # the expired first request makes the list congested: the server then peeks at the oldest left, the junk
    await redis.rpush(queue, _request("late", now - 1), "[" * 5000, _request("fresh-0", now + 600),
                      _request("fresh-1", now + 600))
    metrics = Metrics()
    server = _server(redis, queue, channel, metrics, handle)
    task = asyncio.create_task(server.run())
    try:
        await wait_until(lambda: len(served) == 2 or task.done(),
                         message=lambda: f"both fresh requests served (saw {served}, counters {dict(metrics.totals)})")
        assert not task.done(), f"the request server stopped: {task.exception()!r}"
        await wait_until(lambda: metrics.get("rejected.invalid_json") == 1,
                         message=lambda: f"the junk rejected (counters {dict(metrics.totals)})")
        dead: Any = await redis.xrange(Names.dead(queue))
        assert [fields[b"reason"] for _id, fields in dead] == [b"invalid_json"]
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)


async def test_a_reply_that_cannot_be_encoded_is_an_internal_error(redis: aioredis.Redis, names: Names) -> None:
    queue, channel = f"{names.prefix}faults:requests", f"{names.prefix}faults:replies"

    async def handle(request: PingRequest) -> PingResponse:
        nested: Any = []
        for _ in range(300):  # past pydantic's serialisation limit (255)
            nested = [nested]
        return PingResponse(request_id=request.request_id, data={"x": nested})

    metrics = Metrics()
    server = _server(redis, queue, channel, metrics, handle)
    task = asyncio.create_task(server.run())
    client: RpcClient[PingResponse] = RpcClient(redis, queue=queue, reply_channel=f"{channel}:client",
                                                adapter=PING_RESPONSE, metrics=Metrics())
    try:
        await client.start()
        reply = await client.call(PingRequest(request_id="deep", type="ping"), 5)
        assert not reply.success and reply.error is not None
        assert reply.error.code.value == "internal" and reply.request_id == "deep"
        assert metrics.get("reply_unencodable") == 1
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)
        await client.close()



async def test_a_request_is_dated_by_when_it_was_sent_never_later_than_when_it_was_taken(
        redis: aioredis.Redis, names: Names) -> None:
    """What a deletion fence compares (shared/runtime/fence.py): a request sent before a deletion and taken after it
    (a congested list serves the newest first) must count as made before it."""
    from shared.runtime.fence import RECEIVED_AT

    queue, channel = f"{names.prefix}dated:requests", f"{names.prefix}dated:replies"
    seen: dict[str, float | None] = {}

    async def handle(request: PingRequest) -> PingResponse:
        seen[request.request_id] = RECEIVED_AT.get()
        return PingResponse(request_id=request.request_id)

    now = time.time()
    await redis.rpush(queue, *(json.dumps({"request_id": rid, "type": "ping", "data": {}, "sent_at": sent})
                               for rid, sent in (("old", now - 100), ("future", now + 100), ("unsent", None))))
    server = _server(redis, queue, channel, Metrics(), handle)
    task = asyncio.create_task(server.run())
    try:
        await wait_until(lambda: len(seen) == 3, message=lambda: f"three served (saw {seen})")
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)
    assert seen["old"] == now - 100
    assert seen["future"] is not None and now <= seen["future"] < now + 60  # when it was taken
    assert seen["unsent"] is not None and now <= seen["unsent"] < now + 60
