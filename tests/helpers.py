"""Condition waits and an in-process mesh harness for the tests (real Redis, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, TypeAdapter

from services.chat_ai.config import ChatSettings
from services.chat_ai.service import ChatService
from services.ltm.config import LtmSettings
from services.ltm.service import LtmService, build_backend
from services.memory.config import MemorySettings
from services.memory.service import MemoryService
from services.memory.store import ConversationStore
from shared.contracts import AI_RESPONSE, AIResponse, DecodeError, LTMResponse, Names, UserInput, decode, encode, new_id
from shared.runtime.db import open_pool
from shared.runtime.embedding import SyncEmbedder
from shared.runtime.runner import pubsub_for


async def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02,
                     message: str | Callable[[], str] = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns a truthy value; return that value. ``message`` may be a
    callable, called when the wait fails (what was last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            seen = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {seen}")
        await asyncio.sleep(interval)


class Service(Protocol):
    async def run(self) -> None: ...
    def stop(self) -> None: ...


@asynccontextmanager
async def running(service: Service) -> AsyncIterator[Service]:
    task = asyncio.create_task(service.run())
    ready = getattr(service, "ready", None)
    if ready is not None:  # models loaded, subscriptions up: what a client of a started mesh gets
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # a service that failed to start raises here
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)


def common(redis_url: str, database_url: str) -> dict[str, Any]:
    return dict(redis_url=redis_url, database_url=database_url, claim_idle_ms=1000, metrics_flush_s=0.2,
                openai_api_key=None, openai_base_url=None, log_format="console")


@dataclass
class Mesh:
    """The three services of one test, sharing its key prefix and database."""

    names: Names
    redis: aioredis.Redis
    redis_url: str
    database_url: str
    pool: AsyncConnectionPool
    model: SyncEmbedder
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def memory(self, **kw: Any) -> MemoryService:
        s = MemorySettings(**{**common(self.redis_url, self.database_url), **self.overrides.get("memory", {}), **kw})
        return MemoryService(s, self.names, self.redis, ConversationStore(self.pool))

    def ltm(self, **kw: Any) -> LtmService:
        s = LtmSettings(**{**common(self.redis_url, self.database_url), **self.overrides.get("ltm", {}), **kw})
        # ltm_backend="mem0" (a keyword or an override) builds it on mem0, as LTM_BACKEND=mem0 does
        return LtmService(s, self.names, self.redis, build_backend(s, self.pool, self.model, self.redis, self.names))

    def chat(self, llm: Any = None, **kw: Any) -> ChatService:
        s = ChatSettings(**{**common(self.redis_url, self.database_url), **self.overrides.get("chat", {}), **kw})
        return ChatService(s, self.names, self.redis, llm)

    async def send(self, content: str, *, user_id: str | None, session_id: str, **kw: Any) -> UserInput:
        msg = UserInput(message_id=new_id(), user_id=user_id, session_id=session_id, content=content, **kw)
        await self.redis.xadd(self.names.user_input, {"data": encode(msg)})
        return msg

    async def replies(self) -> list[AIResponse]:
        rows = await self.redis.xrange(self.names.ai_responses)
        out = []
        for _, fields in rows:
            try:
                out.append(decode(AI_RESPONSE, fields.get(b"data")))
            except DecodeError:
                continue  # bad entries a test injected on purpose
        return out

    async def reply_to(self, msg: UserInput, timeout: float = 15.0) -> AIResponse:
        async def find() -> AIResponse | None:
            return next((r for r in await self.replies() if r.in_reply_to == msg.message_id), None)

        result: AIResponse = await wait_until(find, timeout, message=f"reply to {msg.message_id}")
        return result

    async def dead(self, name: str) -> list[dict[str, str]]:
        rows = await self.redis.xrange(Names.dead(name))
        return [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]

    async def count(self, sql: str, *params: Any) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
        return int(row[0]) if row else 0


@asynccontextmanager
async def mesh_for(names: Names, redis: aioredis.Redis, redis_url: str, database_url: str,
                   model: SyncEmbedder) -> AsyncIterator[Mesh]:
    pool = await open_pool(database_url, max_size=10)
    try:
        yield Mesh(names, redis, redis_url, database_url, pool, model)
    finally:
        await pool.close()


R = TypeVar("R", bound=BaseModel)


class Replies(Generic[R]):
    """A subscription to a reply channel, confirmed before anything is sent; replies kept by request_id.

    Tests send raw (often malformed) JSON and need the default channel too, so they cannot use
    RpcClient; this is their one way to wait for replies.
    """

    def __init__(self, redis: aioredis.Redis, channel: str, adapter: TypeAdapter[R]) -> None:
        self.redis, self.channel, self.adapter = redis, channel, adapter
        self.pubsub: Any = None
        self.seen: dict[str, R] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Replies[R]:
        self.pubsub = await pubsub_for(self.redis)
        await self.pubsub.subscribe(self.channel)

        async def confirmed() -> bool:
            msg = await self.pubsub.get_message(timeout=0.1)
            return msg is not None and msg["type"] == "subscribe"

        await wait_until(confirmed, message=f"subscribed to {self.channel}")
        self._reader = asyncio.create_task(self._read())  # one reader: any number of waiters
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.pubsub.aclose()

    async def _read(self) -> None:
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg and msg["type"] == "message":
                resp = decode(self.adapter, msg["data"], max_content_bytes=1 << 30)
                self.seen[str(getattr(resp, "request_id", ""))] = resp

    async def get(self, request_id: str, timeout: float = 20.0) -> R:
        result: R = await wait_until(lambda: self.seen.get(request_id), timeout, message=f"reply to {request_id}")
        return result


def ltm_replies(mesh: Mesh, channel: str | None = None) -> Replies[LTMResponse]:
    return Replies(mesh.redis, channel or mesh.names.ltm_responses, TypeAdapter(LTMResponse))


async def ask_ltm(mesh: Mesh, raw: str, timeout: float = 20.0) -> LTMResponse:
    """Push one raw ltm request and wait for its reply on the default channel."""
    async with ltm_replies(mesh) as replies:
        await mesh.redis.rpush(mesh.names.ltm_requests, raw)
        return await replies.get(json.loads(raw)["request_id"], timeout)


def ltm_request(type_: str, user_id: str | None, data: dict[str, Any] | None = None, **kw: Any) -> str:
    body: dict[str, Any] = {"request_id": new_id(), "type": type_, "data": data or {}, **kw}
    if user_id is not None:
        body["user_id"] = user_id
    return json.dumps(body)


def record_chaos(section: str, counts: dict[str, Any]) -> None:
    """Merge ``counts`` into .data/chaos-report.json (what `make chaos` and `make test` tried, and what was lost)."""
    path = Path(__file__).resolve().parent.parent / ".data" / "chaos-report.json"
    path.parent.mkdir(exist_ok=True)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = {}
    report[section] = counts
    path.write_text(json.dumps(report, indent=1) + "\n")
