"""The memory worker: stores every user and AI message, keeps STM, publishes memory_updates."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from services.memory.config import MemorySettings
from services.memory.stm import StmWriter
from services.memory.store import ConversationStore, SessionOwnershipError, StoredMessage
from shared.contracts import (
    AI_RESPONSE,
    USER_INPUT,
    DeadLetterReason,
    DecodeError,
    MemoryUpdate,
    Names,
    decode,
    encode,
)
from shared.contracts.messages import MemoryUpdateMeta
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.stm import Turn
from shared.runtime.streams import StreamConsumer

log = get_logger(__name__)


class MemoryService:
    def __init__(self, settings: MemorySettings, names: Names, redis: aioredis.Redis, store: ConversationStore,
                 metrics: Metrics | None = None) -> None:
        self.settings, self.names, self.redis, self.store = settings, names, redis, store
        self.metrics = metrics or Metrics(redis, names.metrics("memory"))
        self.stm = StmWriter(redis, names, settings.stm_max_messages, settings.stm_ttl_seconds)
        self._stop = asyncio.Event()
        common = dict(group=names.memory_group, consumer=settings.consumer_name, metrics=self.metrics,
                      concurrency=settings.memory_concurrency, claim_idle_ms=settings.claim_idle_ms,
                      max_deliveries=settings.max_deliveries)
        self.consumers = [
            StreamConsumer(redis, stream=names.user_input, handler=self._on_user_input, **common),  # type: ignore[arg-type]
            StreamConsumer(redis, stream=names.ai_responses, handler=self._on_ai_response, **common),  # type: ignore[arg-type]
        ]

    async def run(self) -> None:
        tasks = [asyncio.create_task(c.run()) for c in self.consumers]
        tasks.append(asyncio.create_task(self.metrics.run(self._stop, self.settings.metrics_flush_s)))
        log.info("memory.ready")
        try:
            await asyncio.gather(*tasks)
        finally:
            await self.metrics.flush()

    def stop(self) -> None:
        self._stop.set()
        for c in self.consumers:
            c.stop()

    async def _on_user_input(self, entry_id: str, raw: bytes | str | None) -> None:
        msg = decode(USER_INPUT, raw, max_content_bytes=self.settings.max_content_bytes, entry_id=entry_id)
        await self.record(StoredMessage(
            message_id=msg.message_id, session_id=msg.session_id, user_id=msg.user_id, role="human",
            content=msg.content, timestamp=msg.timestamp, metadata=msg.meta,
        ))

    async def _on_ai_response(self, entry_id: str, raw: bytes | str | None) -> None:
        msg = decode(AI_RESPONSE, raw, max_content_bytes=self.settings.max_content_bytes)
        await self.record(StoredMessage(
            message_id=msg.message_id, session_id=msg.session_id, user_id=msg.user_id, role="ai",
            content=msg.content, timestamp=msg.timestamp, parent_message_id=msg.in_reply_to,
            metadata=msg.meta.model_dump(),
        ))

    async def record(self, m: StoredMessage) -> None:
        structlog.contextvars.bind_contextvars(user_id=m.user_id, message_id=m.message_id, session_id=m.session_id)
        try:
            try:
                new = await self.store.store_message(m)
            except SessionOwnershipError as exc:
                raise DecodeError(DeadLetterReason.INVALID, str(exc)) from None
            self.metrics.incr("stored" if new else "duplicates")
            role = "user" if m.role == "human" else "ai"
            await self.stm.append(m.session_id, m.user_id, Turn(m.message_id, role, m.content, m.timestamp))
            if m.user_id and self.settings.enable_ltm_publish:
                await self.publish_update(MemoryUpdate(
                    user_id=m.user_id, content=m.content, source=role, timestamp=m.timestamp,  # type: ignore[arg-type]
                    meta=MemoryUpdateMeta(session_id=m.session_id, message_id=m.message_id),
                ))
        finally:
            structlog.contextvars.unbind_contextvars("user_id", "message_id", "session_id")

    async def publish_update(self, update: MemoryUpdate) -> None:
        data = encode(update)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.names.memory_updates, {"data": data}, maxlen=self.settings.memory_updates_maxlen,
                      approximate=True)
            pipe.publish(self.names.memory_updates_pubsub, data)
            await pipe.execute()
        self.metrics.incr("updates_published")


async def main(stop: asyncio.Event) -> None:
    from shared.runtime.db import migrate, open_pool
    from shared.runtime.logging import configure_logging
    from shared.runtime.runner import redis_client, serve_until

    settings = MemorySettings()
    configure_logging("memory", settings.log_level, settings.log_format, settings.log_content)
    names = Names.from_env()
    await migrate(settings.database_url, "memory", Path(__file__).parent / "migrations")
    pool = await open_pool(settings.database_url, max_size=settings.db_pool_max, name="memory")
    redis = redis_client(settings.redis_url)
    try:
        service = MemoryService(settings, names, redis, ConversationStore(pool))
        await serve_until(stop, service.run(), service.stop)
    finally:
        await redis.aclose()
        await pool.close()
