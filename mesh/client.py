"""A small client of the mesh over plain Redis, as any application would talk to it."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from shared.contracts import (
    AI_RESPONSE,
    LTM_RESPONSE,
    AIResponse,
    DecodeError,
    LTMResponse,
    Names,
    UserInput,
    decode,
    encode,
    new_id,
)
from shared.contracts.messages import PingRequest, StatsRequest
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient, Unavailable
from shared.runtime.runner import redis_client

STACK_ENV = Path(".data") / "stack.env"


def stack_urls() -> dict[str, str]:
    """REDIS_URL / DATABASE_URL from the environment, else from .data/stack.env written by `mesh stack`."""
    from mesh.stack_files import read_env_file

    urls = {k: os.environ[k] for k in ("REDIS_URL", "DATABASE_URL") if os.environ.get(k)}
    for key, value in read_env_file(STACK_ENV).items():
        if key in ("REDIS_URL", "DATABASE_URL"):
            urls.setdefault(key, value.strip())
    if "REDIS_URL" not in urls:
        raise SystemExit("no REDIS_URL: start the mesh with `make up` (or set REDIS_URL)")
    return urls


class MeshClient:
    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis, self.names = redis, names
        self.ltm: RpcClient[LTMResponse] = RpcClient(
            redis, queue=names.ltm_requests, reply_channel=names.reply_channel(names.ltm_responses, new_id()[:12]),
            adapter=LTM_RESPONSE, metrics=Metrics(),
        )

    @classmethod
    async def connect(cls) -> MeshClient:
        client = cls(redis_client(stack_urls()["REDIS_URL"]), Names.from_env())
        await client.ltm.start()
        return client

    async def close(self) -> None:
        await self.ltm.close()
        await self.redis.aclose()

    async def say(self, content: str, *, user_id: str | None, session_id: str, timeout: float = 60.0,
                  timestamp: float | None = None) -> AIResponse:
        """XADD a UserInput (``timestamp``: when it is said, default now), then XREAD ai_responses from just
        before it until the matching reply."""
        last = await self.redis.xrevrange(self.names.ai_responses, count=1)
        cursor: Any = last[0][0] if last else "0-0"
        msg = UserInput(message_id=new_id(), user_id=user_id, session_id=session_id, content=content,
                        **({"timestamp": timestamp} if timestamp is not None else {}))
        await self.redis.xadd(self.names.user_input, {"data": encode(msg)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows: Any = await self.redis.xread({self.names.ai_responses: cursor}, block=1000, count=100)
            for _stream, entries in rows or []:
                for entry_id, fields in entries:
                    cursor = entry_id
                    try:
                        reply = decode(AI_RESPONSE, fields.get(b"data"))
                    except DecodeError:
                        continue
                    if reply.in_reply_to == msg.message_id:
                        return reply
        raise TimeoutError(f"no reply within {timeout:.0f}s (is chat_ai running? `make up`)")

    async def wait_for_ltm(self, timeout: float = 180.0) -> str:
        """Ping ltm until a worker answers (it loads its models at start); returns the backend name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                resp = await self.ltm.call(PingRequest(request_id=new_id(), type="ping"), 2.0)
                return str((resp.data or {}).get("backend", "?"))
            except (TimeoutError, Unavailable):
                await asyncio.sleep(0.5)
        raise TimeoutError("ltm did not answer a ping")

    async def memory_count(self, user_id: str) -> int:
        resp = await self.ltm.call(StatsRequest(request_id=new_id(), type="stats", user_id=user_id), 5.0)
        return int((resp.data or {}).get("memories", 0))


LtmCall = Callable[[Any, float], Awaitable[LTMResponse]]  # RpcClient.call: (request, timeout) -> reply


class LtmRefused(RuntimeError):
    """An ltm error reply: its code and message."""


def ltm_ok(resp: LTMResponse) -> LTMResponse:
    """``resp``, or LtmRefused with the error's code and message."""
    if not resp.success:
        err = resp.error
        raise LtmRefused(f"{err.code.value if err else '?'}: {err.message if err else ''}")
    return resp


async def run_ltm_command(name: str, body: Callable[[LtmCall], Awaitable[int]]) -> int:
    """A ``mesh NAME`` command that talks to ltm: connect, run ``body(call)``, report a refusal or a missing ltm
    on stderr (exit 1), close."""
    client = await MeshClient.connect()
    try:
        return await body(client.ltm.call)
    except LtmRefused as exc:
        print(f"mesh {name}: refused: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, Unavailable):
        print(f"mesh {name}: no reply from ltm (is the mesh running? `make up`)", file=sys.stderr)
        return 1
    finally:
        await client.close()
