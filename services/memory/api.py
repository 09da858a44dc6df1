"""The memory service's storage API: one Python class, also served over ``memory_requests``.

:class:`MemoryApi` is what both entry points use. The stream consumers call :meth:`MemoryApi.record`
for every user input and AI reply; ``memory_requests`` is decoded and dispatched by
:meth:`MemoryApi.handle`; the store's errors are the mesh's one error type (:class:`MeshError`:
``NotFound``, ``Conflict`` = bad_request), which the request server turns into the error reply and the stream
consumer into a dead letter. Every method takes the caller's ``user_id`` and never shows another user's
data. Writes keep the three copies in step: PostgreSQL first (durable), then the STM window and
summary in Redis, then the session cache's generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from redis.asyncio.client import Pipeline

from services.memory import erase
from services.memory.backfill import Backfill
from services.memory.cache import SessionCache
from services.memory.carry import Carrier
from services.memory.importer import HistoryImporter
from services.memory.salience import MessageSalience
from services.memory.stm import StmWriter
from services.memory.store import NOBODY, Conflict, ConversationStore, NotFound, StoredMessage
from services.memory.tokens import TokenCounter
from services.memory.updates import Publish, memory_update, publishable
from shared.contracts import encode, new_id
from shared.contracts.errors import MeshError
from shared.contracts.memory_api import (
    CleanupExpiredRequest,
    CreateSessionRequest,
    DeleteSessionRequest,
    GetContextRequest,
    GetMessagesRequest,
    GetPreferencesRequest,
    GetSessionRequest,
    GetSessionSummaryRequest,
    GetStmRequest,
    GetUserSessionsRequest,
    ImportMessage,
    ImportMessagesRequest,
    ImportResult,
    LinkSessionsRequest,
    MemoryDeleteUserRequest,
    MemoryForget,
    MemoryPingRequest,
    MemoryRequest,
    MemoryResponse,
    MessageInfo,
    SearchMessagesRequest,
    SessionInfo,
    SetPreferenceRequest,
    StmInfo,
    StmTurnInfo,
    StoreContextRequest,
    StoreMessageData,
    StoreMessageRequest,
    SummaryInfo,
    UpdateSessionActivityRequest,
)
from shared.contracts.messages import UserDeletion
from shared.runtime.embedding import Embedder
from shared.runtime.erase import erase_entries
from shared.runtime.errors import REDIS_ERRORS
from shared.runtime.fence import RECEIVED_AT, refuse_if_deleted
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.stm import Turn

log = get_logger(__name__)


@dataclass(slots=True)
class _Ordered:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class MemoryApi:
    def __init__(self, store: ConversationStore, stm: StmWriter, cache: SessionCache, counter: TokenCounter,
                 metrics: Metrics, *, embedder: Callable[[], Awaitable[Embedder | None]] | None = None,
                 publish: Publish | None = None, ping: Callable[[], dict[str, Any]] | None = None,
                 import_max_batch: int = 500, background_nice: int = 0,
                 salience: MessageSalience | None = None, carrier: Carrier | None = None) -> None:
        self.store, self.stm, self.cache, self.counter, self.metrics = store, stm, cache, counter, metrics
        self._ping = ping  # the service's PingInfo (shared/contracts/ping.py)
        self._embedder = embedder
        self._publish = publish
        self.salience = salience  # STM_SALIENCE_WEIGHT > 0: score messages as they are embedded
        self.carrier = carrier  # MEMORY_CARRY_VECTORS: embed on the write path, the vector on the MemoryUpdate
        self._writing: dict[str, _Ordered] = {}  # session -> its writes in order (carrier only, _in_order)
        # messages stored without a vector: the background job and search_messages' catch-up
        self.backfill = Backfill(store, metrics, embedder, salience, background_nice)
        self.importer = HistoryImporter(store, stm, cache, counter, metrics, publish, import_max_batch,
                                        carrier=carrier, salience=salience)

    # ------------------------------------------------------------------ the write path of every turn
    async def record(self, m: StoredMessage) -> bool:
        """Store a message, then update STM, the cache and (for a new message with a user) memory_updates.

        Idempotent by message_id: a redelivered message is not stored twice, and re-adding its turn
        to the window is a no-op. True when the message was new. Which messages are published:
        services/memory/updates.py (not the offline responder's replies). With a carrier (MEMORY_CARRY_VECTORS)
        a message that will be published is embedded first: its vector is stored with it and sent on its update
        (services/memory/carry.py); the others are embedded in the background (:meth:`_embeds_now`).
        """
        structlog.contextvars.bind_contextvars(user_id=m.user_id, message_id=m.message_id, session_id=m.session_id)
        try:
            if not m.token_count:
                m.token_count = self.counter.count(m.content)
            if self.carrier is not None:
                async with self._in_order(m.session_id):
                    embedded = await self.carrier.embed(m) if self._embeds_now(m) else None
                    new = await self.store.store_message(m, embedding=embedded.vector if embedded else None)
            else:
                embedded, new = None, await self.store.store_message(m)
            self.metrics.incr("stored" if new else "duplicates")
            if not new:
                held = await self._as_stored(m)
                if held is None:
                    return False
                m = held
            role = {"human": "user", "ai": "ai"}.get(m.role, "system")
            update = memory_update(m, self.metrics) if self._publish is not None else None
            if embedded is not None and new:
                if update is not None and self.carrier is not None:
                    update.embedding = self.carrier.carried(m, embedded)
                if self.salience is not None and embedded.tokens is not None:  # the STM summary's score, as stored
                    scores = self.salience.score_embedded([m], {m.message_id: embedded})
                    await self.store.set_embeddings([(m.user_id or NOBODY, m.message_id, embedded.vector,
                                                      scores.get(m.message_id))])

            def also(pipe: Pipeline) -> None:  # one MULTI: STM window, cache generation, memory_updates
                self.cache.queue_invalidate(pipe, m.session_id, m.user_id)
                if update is not None and self._publish is not None:
                    self._publish(pipe, update)

            turn: Turn | None = Turn(m.message_id, role, m.content, m.timestamp)
            if not new and m.message_id in await self.stm.window_ids(m.session_id):
                turn = None  # a retry with another timestamp would add a second member for the one message
            await self.stm.append(m.session_id, m.user_id, turn, also)
            return new
        finally:
            structlog.contextvars.unbind_contextvars("user_id", "message_id", "session_id")

    def _embeds_now(self, m: StoredMessage) -> bool:
        """Whether the write path embeds the message (with a carrier): when its update will carry the vector, or when
        the STM summary scores salience (its per-session state must see a session's turns in order, so all of them
        here). Any other message (an offline reply, a system message, one without a user, all of them with
        ENABLE_LTM_PUBLISH=false) is stored at once and embedded by the background job, in passes that step aside
        for the stores and requests: nobody waits for its vector, and an offline reply, which quotes the memories it
        was given, is often the longest text of its session (docs/operations.md, "How many memory copies")."""
        return self.salience is not None or (self._publish is not None and publishable(m))

    async def _as_stored(self, m: StoredMessage) -> StoredMessage | None:
        """A duplicate as PostgreSQL holds it: its turn and update are written again (a redelivery after a crash
        between the commit and them), but a message id used again with other text, role or session (a client bug)
        must not put into the STM or long-term memory what the store does not hold. None: gone since (deleted)."""
        try:
            held = await self.store.get_message(m.user_id or NOBODY, m.message_id)
        except NotFound:
            return None
        if (held.content, held.role, held.session_id) == (m.content, m.role, m.session_id):
            return m
        self.metrics.incr("duplicate_ids_changed")
        log.warning("memory.duplicate_id_changed", held_session_id=held.session_id)
        return replace(m, session_id=held.session_id, role=held.role, content=held.content, timestamp=held.timestamp,
                       parent_message_id=held.parent_message_id, metadata=held.metadata or {},
                       message_type=held.message_type, token_count=held.token_count or 0)

    # ------------------------------------------------------------------ sessions
    async def create_session(self, user_id: str, session_id: str | None = None, *, name: str | None = None,
                             type_: str = "chat", metadata: dict[str, Any] | None = None) -> SessionInfo:
        session, created = await self.store.create_session(user_id, session_id or new_id(), name=name, type_=type_,
                                                           metadata=metadata)
        if created:
            await self.cache.invalidate(None, user_id)
        return session

    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        async def load() -> dict[str, Any]:
            return (await self.store.get_session(user_id, session_id)).model_dump()

        return SessionInfo.model_validate(await self.cache.get_or_load("session", user_id, session_id, "gen", load))

    async def update_session_activity(self, user_id: str, session_id: str, **changes: Any) -> SessionInfo:
        session = await self.store.update_session_activity(user_id, session_id, **changes)
        await self.cache.invalidate(session_id, user_id)
        return session

    async def get_user_sessions(self, user_id: str, limit: int = 20, status: str | None = None) -> list[SessionInfo]:
        async def load() -> list[dict[str, Any]]:
            return [s.model_dump() for s in await self.store.get_user_sessions(user_id, limit, status)]

        ident = f"{limit}:{status or ''}"
        rows = await self.cache.get_or_load("sessions", user_id, ident, "ugen", load)
        return [SessionInfo.model_validate(r) for r in rows]

    async def delete_session(self, user_id: str, session_id: str) -> None:
        await self.store.delete_session(user_id, session_id)
        await self.stm.forget_session(session_id)
        await self.cache.invalidate(session_id, user_id)

    async def delete_user(self, user_id: str) -> UserDeletion:
        """Everything of the user here: conversation rows, STM, cache and dedup keys, stream entries."""
        deletion = await erase.delete_user(self.store.pool, self.stm.redis, self.stm.names, user_id)
        self.forget([user_id])
        try:  # the other copies hold states of the user's sessions too (services/memory/service.py _on_forget)
            await self.stm.redis.publish(self.stm.names.memory_forget, encode(MemoryForget(forget=[user_id])))
        except REDIS_ERRORS as exc:  # the deletion stands; those states go with their LRU
            self.metrics.incr("forget_publish_failed")
            log.warning("memory.forget_publish_failed", error=str(exc))
        self.metrics.incr("users_deleted")
        return deletion

    def forget(self, user_ids: list[str]) -> None:
        """After a deletion: no state derived from these users' turns stays in this process."""
        for user_id in user_ids:
            if self.salience is not None:
                self.salience.forget(user_id)
            if self.carrier is not None:
                self.carrier.forget(user_id)

    async def get_session_summary(self, user_id: str, session_id: str) -> SummaryInfo:
        async def load() -> dict[str, Any]:
            return (await self.store.get_session_summary(user_id, session_id)).model_dump()

        return SummaryInfo.model_validate(await self.cache.get_or_load("summary", user_id, session_id, "gen", load))

    # ------------------------------------------------------------------ messages
    async def store_message(self, user_id: str, d: StoreMessageData) -> MessageInfo:
        """Store through the same path as the streams (STM, cache, memory_updates), then return the row."""
        exists, owner = await self.store.session_owner(d.session_id)
        if exists and owner != user_id:
            raise NotFound("no such session")
        m = StoredMessage(message_id=d.message_id or new_id(), session_id=d.session_id, user_id=user_id,
                          role=d.role, content=d.content, timestamp=d.timestamp or time.time(),
                          parent_message_id=d.parent_message_id, metadata=d.metadata, message_type=d.message_type,
                          is_context_message=d.is_context_message)
        await self.record(m)
        await self._unless_overtaken(user_id, [m.session_id])
        return await self.store.get_message(user_id, m.message_id)

    async def _unless_overtaken(self, user_id: str, sessions: list[str]) -> None:
        """After a request's write (store_message, import_messages): if the user's deletion came after its commit but
        before its STM was written (the deletion removes the rows, then the sessions' STM keys, and a second pass finds
        no session left to clear), the sessions' STM and their memory_updates entries (if ltm has not read them yet:
        else the deletion's second pass in ltm, mesh/forget.py) are removed again and the request fails as a write
        the deletion overtook (``not_found``, shared/runtime/fence.py). Writes from the streams have no request."""
        if RECEIVED_AT.get() is None:
            return
        try:
            async with self.store.pool.connection() as conn, conn.transaction():
                await refuse_if_deleted(conn, user_id, "memory")  # waits for a deletion under way
        except MeshError:
            await erase.delete_user_keys(self.stm.redis, self.stm.names, user_id, sessions)
            # its updates too (a deletion by a single delete_user request has no second pass to sweep them)
            await erase_entries(self.stm.redis, [self.stm.names.memory_updates], user_id, sessions)
            self.forget([user_id])  # the write's salience states too
            self.metrics.incr("writes_overtaken")
            raise

    async def get_messages(self, user_id: str, session_id: str, limit: int = 50, offset: int = 0,
                           newest_first: bool = False) -> list[MessageInfo]:
        return await self.store.get_messages(user_id, session_id, limit, offset, newest_first)

    async def search_messages(self, user_id: str, query: str, *, session_id: str | None = None, limit: int = 10,
                              threshold: float | None = None) -> list[MessageInfo]:
        """Semantic search; the user's not-yet-embedded messages are embedded first, so nothing stored is missed."""
        embedder = await self._embedder() if self._embedder else None
        if embedder is None:
            raise Conflict("semantic search is not enabled on this memory service (MEMORY_EMBED_MESSAGES=false)")
        await self.backfill.run(user_id)
        vector = await embedder.embed(query)
        return await self.store.search_messages(user_id, vector, session_id=session_id, limit=limit,
                                                threshold=threshold)

    async def embed_pending(self, user_id: str | None = None,
                            turn: Callable[[], Awaitable[None]] | None = None) -> int:
        """Embed stored messages that have no vector yet (services/memory/backfill.py); returns how many."""
        return await self.backfill.run(user_id, turn)

    @asynccontextmanager
    async def _in_order(self, session_id: str) -> AsyncIterator[None]:
        """One session's messages embedded and stored one at a time, in the order they came: a pass takes the model's
        lock, which is not fair, so concurrent writes of one session would otherwise reach PostgreSQL in any order,
        and a turn stored after newer turns had left the STM window would never be folded into the summary."""
        entry = self._writing.setdefault(session_id, _Ordered())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._writing[session_id]

    async def import_messages(self, user_id: str, messages: list[ImportMessage]) -> ImportResult:
        """A batch of the user's past turns (services/memory/importer.py)."""
        result = await self.importer.import_messages(user_id, messages)
        await self._unless_overtaken(user_id, sorted({m.session_id for m in messages}))
        return result

    # ------------------------------------------------------------------ STM
    async def get_stm(self, user_id: str, session_id: str) -> StmInfo:
        exists, owner = await self.store.session_owner(session_id)
        if not exists or owner != user_id:
            raise NotFound("no such session")
        stm, rebuilt = await self.stm.read(session_id, user_id)
        tokens = await self.stm.redis.hget(self.stm.names.stm_summary(session_id), "tokens")
        return StmInfo(session_id=session_id, summary=stm.summary, summary_kind=stm.summary_kind,
                       summary_tokens=int(tokens or 0), rehydrated=rebuilt,
                       turns=[StmTurnInfo(message_id=t.message_id, role=t.role, content=t.content,
                                          timestamp=t.timestamp) for t in stm.turns])

    # ------------------------------------------------------------------ dispatch of memory_requests
    async def handle(self, req: MemoryRequest) -> MemoryResponse:
        structlog.contextvars.bind_contextvars(request_id=req.request_id, user_id=req.user_id)
        try:  # a MeshError (not_found, bad_request, ...) is answered by the request server, in one place
            data = await self._dispatch(req)
            self.metrics.incr(f"requests.{req.type}")
            return MemoryResponse(request_id=req.request_id, user_id=req.user_id, data=data)
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "user_id")

    async def _dispatch(self, req: MemoryRequest) -> dict[str, Any]:
        match req:
            case CreateSessionRequest(data=d):
                s = await self.create_session(req.user_id, d.session_id, name=d.name, type_=d.type,
                                              metadata=d.metadata)
                return {"session": s.model_dump()}
            case GetSessionRequest(data=d):
                session = await self.get_session(req.user_id, d.session_id)
                links = await self.store.session_links(req.user_id, d.session_id)
                return {"session": session.model_dump(), "links": [link.model_dump() for link in links]}
            case StoreMessageRequest(data=d):
                return {"message": (await self.store_message(req.user_id, d)).model_dump()}
            case GetMessagesRequest(data=d):
                messages = await self.get_messages(req.user_id, d.session_id, d.limit, d.offset, d.newest_first)
                return {"messages": [m.model_dump() for m in messages]}
            case SearchMessagesRequest(data=d):
                found = await self.search_messages(req.user_id, d.query, session_id=d.session_id, limit=d.limit,
                                                   threshold=d.threshold)
                return {"messages": [m.model_dump() for m in found]}
            case StoreContextRequest(data=d):
                item = await self.store.store_context(req.user_id, d.session_id, d.context_type, d.key, d.value,
                                                      relevance_score=d.relevance_score, metadata=d.metadata,
                                                      ttl_seconds=d.ttl_seconds, merge=d.merge)
                await self.cache.invalidate(d.session_id, req.user_id)
                return {"context": item.model_dump()}
            case GetContextRequest(data=d):
                items = await self.store.get_context(req.user_id, d.session_id, d.context_type)
                return {"context": [i.model_dump() for i in items]}
            case UpdateSessionActivityRequest(data=d):
                s = await self.update_session_activity(req.user_id, d.session_id, status=d.status, name=d.name,
                                                       metadata=d.metadata, relevance_score=d.relevance_score)
                return {"session": s.model_dump()}
            case GetUserSessionsRequest(data=d):
                sessions = await self.get_user_sessions(req.user_id, d.limit, d.status)
                return {"sessions": [s.model_dump() for s in sessions]}
            case DeleteSessionRequest(data=d):
                await self.delete_session(req.user_id, d.session_id)
                return {"deleted": d.session_id}
            case GetSessionSummaryRequest(data=d):
                return {"summary": (await self.get_session_summary(req.user_id, d.session_id)).model_dump()}
            case CleanupExpiredRequest():
                return {"deleted": await self.store.cleanup_expired_data(req.user_id)}
            case LinkSessionsRequest(data=d):
                link = await self.store.link_sessions(req.user_id, d.source_session_id, d.target_session_id,
                                                      d.relation_type, d.strength)
                await self.cache.invalidate(d.source_session_id, req.user_id)
                await self.cache.invalidate(d.target_session_id, None)
                return {"link": link.model_dump()}
            case GetPreferencesRequest(data=d):
                return {"preferences": await self.store.get_preferences(req.user_id, d.keys)}
            case SetPreferenceRequest(data=d):
                await self.store.set_preference(req.user_id, d.key, d.value, d.sensitive)
                return {"key": d.key, "sensitive": d.sensitive}
            case GetStmRequest(data=d):
                return {"stm": (await self.get_stm(req.user_id, d.session_id)).model_dump()}
            case ImportMessagesRequest(data=d):
                return (await self.import_messages(req.user_id, d.messages)).model_dump()
            case MemoryDeleteUserRequest():
                return {"deletion": (await self.delete_user(req.user_id)).model_dump()}
            case MemoryPingRequest():
                return self._ping() if self._ping else {"pong": True}
        raise AssertionError(f"unhandled request type {req.type}")  # pragma: no cover
