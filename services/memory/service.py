"""The memory worker: stores every user and AI message, keeps STM, publishes memory_updates, serves memory_requests.

Background duties beside the consumers: embedding stored messages for ``search_messages`` (batched,
off the store path, so a store costs no model time) and sweeping expired context entries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from services.memory.api import MemoryApi
from services.memory.cache import SessionCache
from services.memory.carry import Carrier
from services.memory.config import MemorySettings
from services.memory.crypto import LazyCipher
from services.memory.salience import MessageSalience
from services.memory.stm import StmWriter
from services.memory.store import ConversationStore, StoredMessage
from services.memory.summary import ExtractiveSummariser, LlmSummariser, Summariser
from services.memory.tokens import TokenCounter, default_counter
from shared.contracts import (
    AI_RESPONSE,
    MEMORY_REQUEST,
    USER_INPUT,
    MemoryRequest,
    MemoryResponse,
    MemoryUpdate,
    Names,
    decode,
    encode,
)
from shared.contracts.memory_api import MEMORY_FORGET
from shared.contracts.ping import PingInfo
from shared.runtime import heap, prom
from shared.runtime.drain import run_service
from shared.runtime.embedding import Embedder, shared_model
from shared.runtime.llm import ChatModel, chat_model
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.priority import Foreground
from shared.runtime.pubsub import decoded, listen
from shared.runtime.requests import RequestServer
from shared.runtime.streams import StreamConsumer

log = get_logger(__name__)


def build_summariser(settings: MemorySettings, counter: TokenCounter, llm: ChatModel | None) -> Summariser:
    extractive = ExtractiveSummariser(counter, settings.stm_max_tokens, settings.stm_salience_weight)
    return LlmSummariser(llm, counter, settings.stm_max_tokens, extractive) if llm else extractive


def message_salience(settings: MemorySettings) -> MessageSalience | None:
    """The salience model, when the summary uses it (it reads the local model's token vectors)."""
    if settings.stm_salience_weight <= 0 or not settings.memory_embed_messages or settings.embedding_remote:
        return None
    return MessageSalience(settings.stm_salience_sessions)


class MemoryService:
    def __init__(self, settings: MemorySettings, names: Names, redis: aioredis.Redis, store: ConversationStore,
                 metrics: Metrics | None = None, *, llm: ChatModel | None = None,
                 embedder: Embedder | None = None) -> None:
        self.settings, self.names, self.redis, self.store = settings, names, redis, store
        self.metrics = metrics or Metrics(redis, names.metrics("memory"))
        if store.cipher is None:
            store.cipher = LazyCipher(settings.memory_encryption_key, settings.memory_encryption_key_file)
        counter = default_counter()
        cache = SessionCache(redis, names, settings.memory_cache_ttl_s, self.metrics)
        self.stm = StmWriter(redis, names, store, build_summariser(settings, counter, llm), settings.stm_max_messages,
                             settings.stm_ttl_seconds, catch_up_delay_s=settings.memory_summary_delay_ms / 1000,
                             cache=cache)
        self._embedder = embedder
        # messages and requests first: the background embedding of stored messages steps aside between its passes
        self.foreground = Foreground(settings.memory_embed_yield_ms / 1000, self.metrics)
        self.started_at = time.time()
        self.summariser_kind = f"llm:{llm.name}" if llm else "extractive"
        stm_salience = message_salience(settings)
        self.api = MemoryApi(
            store, self.stm, cache, counter,
            self.metrics, embedder=self._get_embedder if settings.memory_embed_messages else None,
            publish=self.queue_update if settings.enable_ltm_publish else None,
            import_max_batch=settings.memory_import_max_batch, background_nice=settings.background_nice,
            ping=lambda: self.ping_info().model_dump(), salience=stm_salience,
            carrier=(Carrier(self._get_embedder, self.metrics, settings.stm_salience_sessions,
                             salience=stm_salience.model if stm_salience else None)  # one copy of the weights
                     if settings.memory_carry_vectors and settings.memory_embed_messages else None),
        )
        self._stop = asyncio.Event()
        common = dict(group=names.memory_group, consumer=settings.consumer_name, metrics=self.metrics,
                      concurrency=settings.memory_concurrency, claim_idle_ms=settings.claim_idle_ms,
                      max_deliveries=settings.max_deliveries, retention_s=settings.stream_retention_s or None,
                      drain_s=settings.shutdown_grace_s)
        self.consumers = [
            StreamConsumer(redis, stream=names.user_input, handler=self._on_user_input, operation="store_input",
                           **common),  # type: ignore[arg-type]
            StreamConsumer(redis, stream=names.ai_responses, handler=self._on_ai_response, operation="store_reply",
                           **common),  # type: ignore[arg-type]
        ]
        self.requests: RequestServer[MemoryRequest] = RequestServer(
            redis, queue=names.memory_requests, reply_channel=names.memory_responses, adapter=MEMORY_REQUEST,
            handler=self.api.handle, error_reply=MemoryResponse.failure, metrics=self.metrics,
            max_content_bytes=settings.max_content_bytes, concurrency=settings.memory_request_concurrency,
            max_payload_bytes=settings.memory_import_max_bytes, drain_s=settings.shutdown_grace_s,
            slow_ms=settings.request_slow_ms,
            foreground=self.foreground,
        )

    async def run(self) -> None:
        core = [asyncio.create_task(c.run(), name=f"memory.{c.name}") for c in self.consumers]
        core.append(asyncio.create_task(self.requests.run(), name="memory.requests"))
        background = [
            asyncio.create_task(self.metrics.run(self._stop, self.settings.metrics_flush_s), name="memory.metrics"),
            asyncio.create_task(self._every(self.settings.memory_cleanup_interval_s, self._cleanup),
                                name="memory.cleanup"),
            asyncio.create_task(self.stm.drain_forever(self._stop), name="memory.stm_catchups"),
        ]
        if self.api.salience is not None or self.api.carrier is not None:  # in-process states of users' sessions
            background.append(asyncio.create_task(
                listen(self.redis, self.names.memory_forget, self._on_forget, self._stop, metrics=self.metrics),
                name="memory.forget_listen"))
        if self.settings.memory_embed_messages:
            background.append(asyncio.create_task(self._every(self.settings.memory_embed_interval_s,
                                                              self._embed_pending), name="memory.embed"))
            # load the model now: an ONNX session holds the GIL while it is built (onnxruntime #27063), which on
            # first need would stall every store and request of the process for about half a second
            await self._get_embedder()
            if (self.api.carrier is not None and self.api.salience is None  # (with it the write path embeds all)
                    and self.settings.memory_background_model == "own" and not self.settings.embedding_remote):
                await self.api.backfill.load_background_model(self.settings)  # its passes beside the stores'
        heap.freeze_startup()  # what start-up loaded stays out of every garbage collection
        log.info("memory.ready")
        try:
            await run_service(core, background, self._stop, self.settings.shutdown_grace_s, what="memory",
                              metrics=self.metrics, stop_core=self.stop)
        finally:
            await self.metrics.flush()

    async def _on_forget(self, raw: bytes) -> None:
        """Another copy deleted these users: drop what this one holds of their sessions."""
        msg = await decoded(self.redis, self.names.memory_forget, MEMORY_FORGET, raw, what="forget",
                            max_content_bytes=self.settings.max_content_bytes, metrics=self.metrics)
        if msg is None:
            return
        self.api.forget(msg.forget)
        self.metrics.incr("forget_heard")

    def stop(self) -> None:
        self._stop.set()
        for c in self.consumers:
            c.stop()
        self.requests.stop()

    def ping_info(self) -> PingInfo:
        s = self.settings
        return PingInfo.now("memory", s.consumer_name, self.summariser_kind, self.started_at,
                            enable_ltm_publish=s.enable_ltm_publish, embed_messages=s.memory_embed_messages,
                            cache=s.memory_cache_ttl_s > 0)

    async def _get_embedder(self) -> Embedder:
        """The embedding model, loaded on first need (in a thread: it takes seconds)."""
        if self._embedder is None:
            self._embedder = Embedder(await asyncio.to_thread(shared_model, None, self.settings))
        return self._embedder

    async def _every(self, interval_s: float, job: Callable[[], Awaitable[object]]) -> None:
        while not self._stop.is_set():
            try:
                await job()
            except Exception:
                self.metrics.incr("background_failed")
                log.warning("memory.background_failed", job=getattr(job, "__name__", "job"), exc_info=True)
            try:
                await asyncio.wait_for(self._stop.wait(), interval_s)
            except TimeoutError:
                pass

    async def _embed_pending(self) -> int:
        return await self.api.embed_pending(turn=self.foreground.turn)

    async def _cleanup(self) -> None:
        deleted = await self.store.cleanup_expired_data(None)
        if deleted["context"]:
            self.metrics.incr("expired_context_deleted", deleted["context"])

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
        with self.foreground.serving():  # another user's session or message id: a BadRequest, dead-lettered
            await self.api.record(m)

    def queue_update(self, pipe: Pipeline, update: MemoryUpdate) -> None:
        """The MemoryUpdate goes to the stream (for ltm, durable) and the channel (observers)."""
        data = encode(update)
        pipe.xadd(self.names.memory_updates, {"data": data}, maxlen=self.settings.memory_updates_maxlen,
                  approximate=True)
        # by name: a cluster pipeline refuses .publish() (no key to route by) but sends PUBLISH to a node, and
        # the cluster passes it to the subscribers of every node
        pipe.execute_command("PUBLISH", self.names.memory_updates_pubsub, data)
        self.metrics.incr("updates_published")


async def main(stop: asyncio.Event) -> None:
    from shared.runtime.db import migrate, open_pool
    from shared.runtime.logging import configure_logging
    from shared.runtime.runner import redis_client, serve_until, tune_process
    from shared.runtime.vectors import ensure_vector_columns, model_identity

    settings = MemorySettings()
    configure_logging("memory", settings.log_level, settings.log_format, settings.log_content)
    tune_process(settings)
    names = Names.from_env()
    await migrate(settings.database_url, "memory", Path(__file__).parent / "migrations")
    pool = await open_pool(settings.database_url, max_size=settings.db_pool_max, name="memory")
    await ensure_vector_columns(pool, "memory", *await asyncio.to_thread(model_identity, settings))
    redis = redis_client(settings.redis_url, settings.redis_cluster)
    llm = chat_model(settings.openai_api_key, settings.openai_base_url, settings.llm_model, settings.llm_timeout_s,
                     service="memory")
    try:
        service = MemoryService(settings, names, redis, ConversationStore(pool), llm=llm)
        with prom.metrics_endpoint(settings.metrics_port, settings.metrics_host, settings.redis_url, names,
                                   cluster=settings.redis_cluster):
            await serve_until(stop, service.run(), service.stop)
    finally:
        await redis.aclose()
        await pool.close()
