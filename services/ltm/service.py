"""The ltm worker: ingests ``memory_updates`` and serves ``ltm_requests``."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.ltm.config import LtmSettings
from services.ltm.store import LtmStore, NewMemory
from shared.contracts import (
    LTM_REQUEST,
    MEMORY_UPDATE,
    AddRequest,
    DecodeError,
    DeleteRequest,
    DeleteUserRequest,
    ErrorCode,
    ErrorInfo,
    LTMRequest,
    LTMResponse,
    MemoryUpdate,
    Names,
    OptimizeRequest,
    PingRequest,
    ProfileGetRequest,
    ProfileUpdateRequest,
    SearchEntitiesRequest,
    SearchRequest,
    StatsRequest,
    decode,
)
from shared.runtime.backoff import Backoff
from shared.runtime.embedding import Embedder
from shared.runtime.logging import content, get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RequestServer
from shared.runtime.streams import StreamConsumer

log = get_logger(__name__)


class LtmService:
    def __init__(self, settings: LtmSettings, names: Names, redis: aioredis.Redis, store: LtmStore,
                 embedder: Embedder, metrics: Metrics | None = None) -> None:
        self.settings, self.names, self.redis = settings, names, redis
        self.store, self.embedder = store, embedder
        self.metrics = metrics or Metrics(redis, names.metrics("ltm"))
        self._stop = asyncio.Event()
        self.ingest = StreamConsumer(
            redis, stream=names.memory_updates, group=names.ltm_group, consumer=settings.consumer_name,
            handler=self._on_update_entry, metrics=self.metrics, concurrency=settings.ltm_ingest_concurrency,
            batch=settings.ltm_ingest_batch, claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
        )
        self.requests: RequestServer[LTMRequest] = RequestServer(
            redis, queue=names.ltm_requests, reply_channel=names.ltm_responses, adapter=LTM_REQUEST,
            handler=self.handle_request, error_reply=LTMResponse.failure, metrics=self.metrics,
            max_content_bytes=settings.max_content_bytes, concurrency=settings.ltm_request_concurrency,
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.ingest.run(), name="ltm.ingest"),
            asyncio.create_task(self.requests.run(), name="ltm.requests"),
            asyncio.create_task(self.metrics.run(self._stop, self.settings.metrics_flush_s), name="ltm.metrics"),
            asyncio.create_task(self._flush_access_loop(), name="ltm.access"),
        ]
        if self.settings.ltm_accept_pubsub:
            tasks.append(asyncio.create_task(self._pubsub_ingest(), name="ltm.pubsub"))
        log.info("ltm.ready")
        try:
            await asyncio.gather(*tasks)
        finally:
            await self.store.flush_access()
            await self.metrics.flush()

    def stop(self) -> None:
        self._stop.set()
        self.ingest.stop()
        self.requests.stop()

    async def _flush_access_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.ltm_access_flush_s)
            except TimeoutError:
                pass
            try:
                await self.store.flush_access()
            except Exception:
                log.warning("ltm.access_flush_failed", exc_info=True)

    # ------------------------------------------------------------------ ingest
    async def _on_update_entry(self, entry_id: str, raw: bytes | str | None) -> None:
        update = decode(MEMORY_UPDATE, raw, max_content_bytes=self.settings.max_content_bytes)
        await self.ingest_update(update)

    async def ingest_update(self, update: MemoryUpdate) -> bool:
        structlog.contextvars.bind_contextvars(user_id=update.user_id, message_id=update.message_id)
        try:
            vec = await self.embedder.embed(update.content)
            episodic = NewMemory(
                user_id=update.user_id, type="episodic", content=update.content, embedding=vec, confidence=1.0,
                message_id=update.message_id, session_id=update.meta.session_id, timestamp=update.timestamp,
                speaker=update.source, meta={k: v for k, v in (update.meta.model_extra or {}).items()},
            )
            stored = await self.store.ingest(update.user_id, update.message_id, [episodic])
            self.metrics.incr("ingested" if stored else "ingest_duplicates")
            log.debug("ltm.ingested", stored=stored, content=content(update.content))
            return stored
        finally:
            structlog.contextvars.unbind_contextvars("user_id", "message_id")

    async def _pubsub_ingest(self) -> None:
        """LTM_ACCEPT_PUBSUB: also ingest updates that publishers send only on the channel."""
        backoff = Backoff()
        while not self._stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.names.memory_updates_pubsub)
                while not self._stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if msg is None or msg["type"] != "message":
                        continue
                    backoff.reset()
                    try:
                        update = decode(MEMORY_UPDATE, msg["data"], max_content_bytes=self.settings.max_content_bytes)
                    except DecodeError as err:
                        self.metrics.incr(f"pubsub.rejected.{err.reason.value}")
                        from shared.runtime.deadletter import dead_letter

                        await dead_letter(self.redis, self.names.memory_updates_pubsub, msg["data"],
                                          err.reason.value, err.message)
                        continue
                    try:
                        await self.ingest_update(update)
                    except Exception:
                        self.metrics.incr("pubsub.failed")
                        log.exception("ltm.pubsub_ingest_failed")
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("ltm.pubsub_lost", error=str(exc))
                await backoff.sleep(self._stop)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass

    # ------------------------------------------------------------------ requests
    async def handle_request(self, req: LTMRequest) -> LTMResponse:
        structlog.contextvars.bind_contextvars(request_id=req.request_id, user_id=req.user_id)
        try:
            return await self._dispatch(req)
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "user_id")

    async def _dispatch(self, req: LTMRequest) -> LTMResponse:
        ok: dict[str, Any] = {"request_id": req.request_id, "user_id": req.user_id}
        match req:
            case SearchRequest(data=d):
                vec = await self.embedder.embed(d.query)
                memories = await self.store.search(req.user_id, vec, d.limit, threshold=d.threshold,
                                                 types=list(d.types) if d.types else None)
                self.metrics.incr("search.hit" if memories else "search.miss")
                return LTMResponse(**ok, memories=memories)
            case AddRequest(data=d):
                vec = await self.embedder.embed(d.content)
                mem = await self.store.add(NewMemory(
                    user_id=req.user_id, type=d.type, content=d.content, embedding=vec, confidence=d.confidence,
                    message_id=d.source_turn, meta=d.meta,
                ))
                return LTMResponse(**ok, memories=[mem])
            case ProfileGetRequest():
                return LTMResponse(**ok, user_profile=await self.store.get_profile(req.user_id))
            case ProfileUpdateRequest(data=d):
                return LTMResponse(**ok, user_profile=await self.store.update_profile(req.user_id, d.profile))
            case DeleteRequest(data=d):
                if not await self.store.delete(req.user_id, d.memory_id):
                    return LTMResponse.failure(req.request_id, ErrorInfo(code=ErrorCode.NOT_FOUND,
                                               message="no such memory for this user"), req.user_id)
                return LTMResponse(**ok, data={"deleted": 1})
            case DeleteUserRequest():
                return LTMResponse(**ok, data={"deleted": await self.store.delete_user(req.user_id)})
            case StatsRequest():
                return LTMResponse(**ok, data=await self.store.stats(req.user_id))
            case PingRequest():
                return LTMResponse(**ok, data={"pong": True})
            case OptimizeRequest() | SearchEntitiesRequest():
                return LTMResponse.failure(req.request_id, ErrorInfo(
                    code=ErrorCode.UNKNOWN_TYPE, message=f"{req.type} is not implemented by this backend yet"),
                    req.user_id)
        raise AssertionError(f"unhandled request type {req.type}")  # pragma: no cover


async def main(stop: asyncio.Event) -> None:
    from pathlib import Path

    from shared.runtime.db import migrate, open_pool
    from shared.runtime.embedding import shared_model
    from shared.runtime.logging import configure_logging
    from shared.runtime.runner import redis_client, serve_until

    settings = LtmSettings()
    configure_logging("ltm", settings.log_level, settings.log_format, settings.log_content)
    names = Names.from_env()
    await migrate(settings.database_url, "ltm", Path(__file__).parent / "migrations")
    model = await asyncio.to_thread(shared_model)
    pool = await open_pool(settings.database_url, max_size=settings.db_pool_max, name="ltm")
    redis = redis_client(settings.redis_url)
    try:
        service = LtmService(settings, names, redis, LtmStore(pool), Embedder(model))
        await serve_until(stop, service.run(), service.stop)
    finally:
        await redis.aclose()
        await pool.close()
