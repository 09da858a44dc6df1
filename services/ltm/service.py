"""The ltm worker: ingests ``memory_updates`` and serves ``ltm_requests``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.ltm.backend import LtmBackend
from services.ltm.config import LtmSettings
from shared.contracts import (
    LTM_REQUEST,
    LTM_WARM,
    MEMORY_UPDATE,
    AddRequest,
    DeadLetterReason,
    DeleteRequest,
    DeleteUserRequest,
    DocAddRequest,
    DocDeleteRequest,
    DocSearchRequest,
    ListRequest,
    LTMRequest,
    LTMResponse,
    LtmWarm,
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
    encode,
    payload_limit,
)
from shared.contracts.messages import DocSearchResult, UserDeletion
from shared.contracts.ping import PingInfo
from shared.runtime import heap, prom
from shared.runtime.children import Children, announce_ready
from shared.runtime.deadletter import dead_letter
from shared.runtime.drain import run_service
from shared.runtime.erase import erase_entries, ltm_streams
from shared.runtime.errors import REDIS_ERRORS
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.priority import Foreground, SharedCount
from shared.runtime.pubsub import decoded, listen
from shared.runtime.requests import RequestServer
from shared.runtime.streams import StreamConsumer

log = get_logger(__name__)

WARM_EVERY_S = 0.2  # ltm_index_warm: one message per this much ingest, not one per update
CHILDREN_READY_S = 120.0  # LTM_INGEST_PROCESSES: the children's start (models, migrations) may take this long


class LtmService:
    def __init__(self, settings: LtmSettings, names: Names, redis: aioredis.Redis, backend: LtmBackend,
                 metrics: Metrics | None = None) -> None:
        self.settings, self.names, self.redis, self.backend = settings, names, redis, backend
        self.metrics = metrics or Metrics(redis, names.metrics("ltm"))
        if (bind := getattr(backend, "bind_metrics", None)) is not None:  # the native backend's ingest counters
            bind(self.metrics)
        self._stop = asyncio.Event()
        self._stored_users: set[str] = set()  # announced on ltm_index_warm (see _warm_announce)
        self._stored = asyncio.Event()
        self.ready = asyncio.Event()  # set once the backend is loaded and the loops run
        self.started_at = time.time()
        self.ingest = StreamConsumer(
            redis, stream=names.memory_updates, group=names.ltm_group, consumer=settings.consumer_name,
            handler=self._on_update_entry, metrics=self.metrics, concurrency=settings.ltm_ingest_concurrency,
            batch=settings.ltm_ingest_batch, claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries, retention_s=settings.stream_retention_s or None,
            drain_s=settings.shutdown_grace_s, operation="ingest",
        )
        self.requests: RequestServer[LTMRequest] = RequestServer(
            redis, queue=names.ltm_requests, reply_channel=names.ltm_responses, adapter=LTM_REQUEST,
            handler=self.handle_request, error_reply=LTMResponse.failure, metrics=self.metrics,
            max_content_bytes=settings.max_content_bytes, concurrency=settings.ltm_request_concurrency,
            foreground=getattr(backend, "foreground", None),  # the native backend's ingest steps aside for requests
            drain_s=settings.shutdown_grace_s, slow_ms=settings.request_slow_ms,
            # doc_add carries a whole document (LTM_DOC_MAX_BYTES); every other text keeps MAX_CONTENT_BYTES
            max_payload_bytes=payload_limit(settings.ltm_doc_max_bytes),
            context={"max_document_bytes": settings.ltm_doc_max_bytes},
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        await self.backend.start()
        core = []
        if self.settings.ingests:
            core.append(asyncio.create_task(self.ingest.run(), name="ltm.ingest"))
            if self.settings.ltm_accept_pubsub:
                core.append(asyncio.create_task(self._pubsub_ingest(), name="ltm.pubsub"))
        if self.settings.serves_requests:
            core.append(asyncio.create_task(self.requests.run(), name="ltm.requests"))
        background = [
            asyncio.create_task(self.metrics.run(self._stop, self.settings.metrics_flush_s), name="ltm.metrics"),
            asyncio.create_task(self._maintenance_loop(), name="ltm.maintenance"),
        ]
        # every copy hears which users were deleted (forget: caches keyed by text, session state), and, with search
        # indexes, which users changed
        background.append(asyncio.create_task(self._warm_listen(), name="ltm.warm_listen"))
        if self.settings.ltm_search_index_rows:
            background.append(asyncio.create_task(self._warm_announce(), name="ltm.warm_announce"))
        heap.freeze_startup()  # what start-up loaded stays out of every garbage collection
        self.ready.set()
        log.info("ltm.ready", backend=self.backend.name, role=self.settings.ltm_role)
        announce_ready()  # to the parent, when this is one of its ingest children
        try:
            await run_service(core, background, self._stop, self.settings.shutdown_grace_s, what="ltm",
                              metrics=self.metrics, stop_core=self.stop)
        finally:
            await self.backend.close()
            await self.metrics.flush()

    def stop(self) -> None:
        self._stop.set()
        self.ingest.stop()
        self.requests.stop()

    async def _maintenance_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.ltm_maintenance_s)
            except TimeoutError:
                pass
            try:
                self._announce(await self.backend.maintenance())
            except Exception:
                self.metrics.incr("maintenance_failed")
                log.warning("ltm.maintenance_failed", exc_info=True)

    # ------------------------------------------------------------------ ingest
    async def _on_update_entry(self, entry_id: str, raw: bytes | str | None) -> None:
        update = decode(MEMORY_UPDATE, raw, max_content_bytes=self.settings.max_content_bytes, entry_id=entry_id)
        await self.ingest_update(update)

    async def ingest_update(self, update: MemoryUpdate) -> bool:
        structlog.contextvars.bind_contextvars(user_id=update.user_id, message_id=update.message_id)
        try:
            stored = await self.backend.ingest(update)
            self.metrics.incr("ingested" if stored else "ingest_duplicates")
            if stored:
                self._announce([update.user_id])
            return stored
        finally:
            structlog.contextvars.unbind_contextvars("user_id", "message_id")

    # ------------------------------------------------------------------ search index warming
    def _announce(self, user_ids: list[str]) -> None:
        """These users' memories changed here (ingest, optimize): every ltm process is told (_warm_announce). Without
        a search index (LTM_SEARCH_INDEX_ROWS=0) nothing is announced: nothing empties the set then."""
        if user_ids and self.settings.ltm_search_index_rows:
            self._stored_users.update(user_ids)
            self._stored.set()

    async def _warm_announce(self) -> None:
        """Tell every ltm process (this one too) which users just got memories, at most every WARM_EVERY_S."""
        while not self._stop.is_set():
            stored = asyncio.create_task(self._stored.wait())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait({stored, stop}, return_when=asyncio.FIRST_COMPLETED)
            stored.cancel()
            stop.cancel()
            if self._stop.is_set():
                return
            await asyncio.sleep(WARM_EVERY_S)  # one message for a burst of ingest
            users, self._stored_users = sorted(self._stored_users), set()
            self._stored.clear()
            for i in range(0, len(users), 1000):
                try:
                    await self.redis.publish(self.names.ltm_warm, encode(LtmWarm(users=users[i:i + 1000])))
                except redis.exceptions.RedisError as exc:  # a hint only: the next search loads the user itself
                    self.metrics.incr("warm.publish_failed")
                    log.warning("ltm.warm_publish_failed", error=str(exc))

    async def _warm_listen(self) -> None:
        await listen(self.redis, self.names.ltm_warm, self._on_warm, self._stop, metrics=self.metrics)

    async def _on_warm(self, raw: bytes) -> None:
        msg = await decoded(self.redis, self.names.ltm_warm, LTM_WARM, raw, what="warm",
                            max_content_bytes=self.settings.max_content_bytes, metrics=self.metrics)
        if msg is None:
            return
        if msg.forget:
            self.backend.forget(msg.forget)
        if msg.users:
            self.backend.warm(msg.users)

    async def _pubsub_ingest(self) -> None:
        """LTM_ACCEPT_PUBSUB: also ingest updates that publishers send only on the channel."""
        await listen(self.redis, self.names.memory_updates_pubsub, self._on_pubsub_update, self._stop,
                     metrics=self.metrics)

    async def _on_pubsub_update(self, raw: bytes) -> None:
        channel = self.names.memory_updates_pubsub
        update = await decoded(self.redis, channel, MEMORY_UPDATE, raw, what="pubsub",
                               max_content_bytes=self.settings.max_content_bytes, metrics=self.metrics)
        if update is None:
            return
        try:
            await self.ingest_update(update)
        except Exception as exc:  # a channel redelivers nothing: kept as a dead letter (mesh replay), not lost
            self.metrics.incr("pubsub.failed")
            log.exception("ltm.pubsub_ingest_failed")
            try:
                await dead_letter(self.redis, channel, raw, DeadLetterReason.HANDLER_ERROR.value,
                                  f"{type(exc).__name__}: {exc}")
            except REDIS_ERRORS:
                log.warning("ltm.pubsub_dead_letter_failed", exc_info=True)

    # ------------------------------------------------------------------ deletion
    async def delete_user(self, user_id: str) -> dict[str, Any]:
        """The backend's rows, then the user's entries in the streams ltm writes (memory's delete_user sweeps the
        others); every ltm process forgets the user's index entry and text caches (``forget`` on ltm_index_warm,
        this one included)."""
        rows = await self.backend.delete_user(user_id)
        self.backend.forget([user_id])
        entries = await erase_entries(self.redis, ltm_streams(self.names), user_id)  # memory's do the rest
        try:
            await self.redis.publish(self.names.ltm_warm, encode(LtmWarm(forget=[user_id])))
        except redis.exceptions.RedisError as exc:  # the rows are gone; an index entry of another process
            self.metrics.incr("warm.publish_failed")  # is dropped at its next catch-up (epoch changed)
            log.warning("ltm.forget_publish_failed", error=str(exc))
        self.metrics.incr("users_deleted")
        counts = {k: int(v) for k, v in rows.items() if isinstance(v, int)}
        deletion = UserDeletion(rows=counts, stream_entries=entries)
        log.info("ltm.user_deleted", rows=sum(counts.values()), stream_entries=sum(entries.values()))
        return {"deleted": rows, "deletion": deletion.model_dump()}

    # ------------------------------------------------------------------ requests
    def ping_info(self) -> PingInfo:
        s = self.settings
        return PingInfo.now("ltm", s.consumer_name, self.backend.name, self.started_at,
                            extraction=s.ltm_extraction, accept_pubsub=s.ltm_accept_pubsub)

    async def handle_request(self, req: LTMRequest) -> LTMResponse:
        structlog.contextvars.bind_contextvars(request_id=req.request_id, user_id=req.user_id)
        try:
            return await self._dispatch(req)  # a MeshError (not_found, unknown_type, ...) is the request server's
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "user_id")

    async def _dispatch(self, req: LTMRequest) -> LTMResponse:
        ok: dict[str, Any] = {"request_id": req.request_id, "user_id": req.user_id}
        b = self.backend
        match req:
            case SearchRequest(data=d):
                started = time.perf_counter()
                memories = await b.search(req.user_id, d)
                self.metrics.incr("search.hit" if memories else "search.miss")
                prom.RETRIEVAL_MS.labels("ltm", "hit" if memories else "miss").observe(
                    (time.perf_counter() - started) * 1000)
                return LTMResponse(**ok, memories=memories)
            case AddRequest(data=d):
                return LTMResponse(**ok, memories=[await b.add(req.user_id, d)])
            case ProfileGetRequest():
                return LTMResponse(**ok, user_profile=await b.profile_get(req.user_id))
            case ProfileUpdateRequest(data=d):
                return LTMResponse(**ok, user_profile=await b.profile_update(req.user_id, d.profile))
            case DeleteRequest(data=d):
                await b.delete(req.user_id, d.memory_id)
                return LTMResponse(**ok, data={"deleted": d.memory_id})
            case DeleteUserRequest():
                return LTMResponse(**ok, data=await self.delete_user(req.user_id))
            case StatsRequest():
                return LTMResponse(**ok, data={"backend": b.name, **await b.stats(req.user_id)})
            case ListRequest(data=d):
                return LTMResponse(**ok, memories=await b.list_memories(req.user_id, d))
            case OptimizeRequest():
                result = await b.optimize(req.user_id)
                self._announce([req.user_id])
                return LTMResponse(**ok, data=result)
            case SearchEntitiesRequest(data=d):
                return LTMResponse(**ok, data={"entities": await b.search_entities(req.user_id, d)})
            case DocAddRequest(data=d):
                added = await b.doc_add(req.user_id, d)
                self.metrics.incr(f"docs.{added.status}")
                return LTMResponse(**ok, data=added.model_dump())
            case DocSearchRequest(data=d):  # its duration: memory_api_request_duration_seconds{type="doc_search"}
                passages = await b.doc_search(req.user_id, d)
                self.metrics.incr("doc_search.hit" if passages else "doc_search.miss")
                return LTMResponse(**ok, data=DocSearchResult(passages=passages).model_dump())
            case DocDeleteRequest(data=d):
                return LTMResponse(**ok, data=(await b.doc_delete(req.user_id, d)).model_dump())
            case PingRequest():  # served only after backend.start(): models loaded, ingest running
                return LTMResponse(**ok, data=self.ping_info().model_dump())
        raise AssertionError(f"unhandled request type {req.type}")  # pragma: no cover


def build_backend(settings: LtmSettings, pool: Any, model: Any, redis: aioredis.Redis, names: Names,
                  foreground: Foreground | None = None) -> LtmBackend:
    """The configured backend; ``redis`` and ``names`` give the lifecycle job its per-user lock; ``foreground``:
    requests first across this process and its ingest children (shared/runtime/priority.py)."""
    if settings.ltm_backend == "mem0":
        from services.ltm.mem0_backend import Mem0Backend

        return Mem0Backend(settings, model, pool)
    from services.ltm.native import NativeBackend
    from services.ltm.store import LtmStore
    from shared.runtime.embedding import Embedder, dedicated_model

    store = LtmStore(pool, settings.ltm_search_index_rows, settings.ltm_index_load_wait_ms / 1000)
    query = Embedder(dedicated_model("query", settings, int8=True)) if settings.query_model else None
    return NativeBackend(store, Embedder(model), settings=settings, redis=redis, names=names, query_embedder=query,
                         foreground=foreground)


async def main(stop: asyncio.Event) -> None:
    from shared.runtime.logging import configure_logging
    from shared.runtime.runner import tune_process

    settings = LtmSettings()
    configure_logging("ltm", settings.log_level, settings.log_format, settings.log_content)
    tune_process(settings)
    names = Names.from_env()
    wait_s = settings.ltm_ingest_yield_ms / 1000
    children = ingest_children(settings)
    if children is None:  # (an ingest child steps aside for its parent's requests too)
        await _serve(settings, names, stop, foreground=Foreground(wait_s, parent=SharedCount.inherited()))
        return
    # the children load while this process does; it serves requests only, and answers ping once they are ready
    spawned = asyncio.create_task(children.start(), name="ltm.children")
    watch = asyncio.create_task(_watch(children, spawned, stop), name="ltm.children_watch")
    try:
        await _serve(settings.model_copy(update={"ltm_role": "requests"}), names, stop, children, spawned,
                     Foreground(wait_s, publish=children.requests))
    finally:
        stop.set()  # (this process failed, or is stopping): the children get SIGTERM now and drain beside it
        spawned.cancel()
        await asyncio.gather(spawned, watch, return_exceptions=True)
        await children.stop()


async def _watch(children: Children, spawned: asyncio.Task[None], stop: asyncio.Event) -> None:
    try:
        await spawned
    except (RuntimeError, OSError, asyncio.CancelledError) as exc:  # _serve raises it (this process then exits)
        log.warning("ltm.children_not_started", error=type(exc).__name__)
        children.terminate()
        return
    await children.watch(stop)


async def _serve(settings: LtmSettings, names: Names, stop: asyncio.Event, children: Children | None = None,
                 spawned: asyncio.Task[None] | None = None, foreground: Foreground | None = None) -> None:
    from pathlib import Path

    from shared.runtime.db import migrate, open_pool
    from shared.runtime.embedding import dedicated_model, shared_model
    from shared.runtime.runner import redis_client, serve_until
    from shared.runtime.vectors import ensure_vector_columns

    await migrate(settings.database_url, "ltm", Path(__file__).parent / "migrations")
    model = await asyncio.to_thread(shared_model, None, settings)
    if settings.query_model:  # loaded (and made, if missing) off the event loop; build_backend finds it
        await asyncio.to_thread(dedicated_model, "query", settings, int8=True)
    pool = await open_pool(settings.database_url, max_size=settings.db_pool_max, name="ltm")
    try:
        await ensure_vector_columns(pool, "ltm", model.name, model.dim)  # sized for EMBEDDING_MODEL, or refused
        redis = redis_client(settings.redis_url, settings.redis_cluster)
        try:
            service = LtmService(settings, names, redis, build_backend(settings, pool, model, redis, names,
                                                                       foreground))
            if children is not None and spawned is not None:  # ping is answered once ingest runs too
                children.metrics = service.metrics
                await spawned
            with prom.metrics_endpoint(settings.metrics_port, settings.metrics_host, settings.redis_url, names,
                                       cluster=settings.redis_cluster, bus=settings.serves_requests,
                                       children=None if children is None else children.pages):
                await serve_until(stop, service.run(), service.stop)
        finally:
            await redis.aclose()
    finally:
        await pool.close()


def ingest_children(settings: LtmSettings) -> Children | None:
    """LTM_INGEST_PROCESSES children that ingest (LTM_ROLE=ingest at LTM_INGEST_NICE), when this process has both
    roles (shared/runtime/children.py)."""
    if settings.ltm_role != "all" or settings.ltm_ingest_processes <= 0:
        return None

    requests = SharedCount()  # how many requests this process serves now: ingest steps aside while any is

    def env(i: int) -> dict[str, str]:
        return {"LTM_ROLE": "ingest", "PROCESS_NICE": str(settings.ltm_ingest_nice), "METRICS_PORT": "0",
                "CONSUMER_NAME": f"{settings.consumer_name}-ingest{i}", SharedCount.ENV: str(requests.fd)}

    # with METRICS_PORT, each child serves its page on a local port, shown on this process's page (process=ingest0)
    return Children("services.ltm", settings.ltm_ingest_processes, env, "ltm.ingest_children", label="ingest",
                    serve_metrics=settings.metrics_port > 0, grace_s=settings.shutdown_grace_s + 2,
                    ready_timeout_s=CHILDREN_READY_S, requests=requests)
