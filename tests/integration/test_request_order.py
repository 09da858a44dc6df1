"""The request server's order on a real Redis list: oldest first while the list keeps up, newest first while it is
congested (a request taken had expired: its requester gave up), back to oldest first once the list is empty."""

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


async def test_a_congested_list_is_served_newest_first_until_it_empties(redis: aioredis.Redis,
                                                                         names: Names) -> None:
    queue, channel = f"{names.prefix}order:requests", f"{names.prefix}order:replies"
    served: list[str] = []

    async def handle(request: PingRequest) -> PingResponse:
        served.append(request.request_id)
        return PingResponse(request_id=request.request_id)

    def request(request_id: str, deadline: float) -> str:
        return json.dumps({"request_id": request_id, "type": "ping", "data": {}, "deadline": deadline})

    now = time.time()
    # the requester of "late" gave up a second ago; three more wait behind it with time left
    await redis.rpush(queue, request("late", now - 1), *(request(f"fresh-{i}", now + 600) for i in range(3)))
    metrics = Metrics()
    server: RequestServer[Any] = RequestServer(
        redis, queue=queue, reply_channel=channel, adapter=CHAT_REQUEST, handler=handle,
        error_reply=PingResponse.failure, metrics=metrics, max_content_bytes=1024, concurrency=1, block_s=0.1)
    task = asyncio.create_task(server.run())
    try:
        await wait_until(lambda: len(served) == 3, message=lambda: f"three served (saw {served})")
        assert served == ["fresh-2", "fresh-1", "fresh-0"]  # newest first, once "late" showed the list behind
        assert metrics.get("expired") == 1
        await redis.rpush(queue, request("next-0", time.time() + 600), request("next-1", time.time() + 600))
        await wait_until(lambda: len(served) == 5, message=lambda: f"five served (saw {served})")
        assert served[3:] == ["next-0", "next-1"]  # the list emptied: oldest first again
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)
    assert await redis.llen(queue) == 0
