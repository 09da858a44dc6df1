"""The HTTP gateway: the mesh for web apps, talking to the services only over Redis.

Every route but ``/api/v1/health`` needs an API key (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``,
services/gateway/auth.py) allowed to act for the path's ``user_id``. Errors are JSON
``{"error": {"code", "message"}}`` with the bus's codes: 401 ``unauthorized``, 403 ``forbidden``, 404
``not_found``, 413 / 422 ``bad_request``, 503 ``unavailable``, 504 ``timeout``. OpenAPI at ``/openapi.json``,
docs at ``/docs``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path as Path_
from typing import Annotated, Any

import redis.asyncio as aioredis
import redis.exceptions
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from services.gateway.auth import Scope, lookup, parse_keys
from services.gateway.body_limit import BodyLimit
from services.gateway.config import GatewaySettings
from shared.contracts import LTM_RESPONSE, AIResponse, LTMResponse, Memory, Names, UserInput, encode, new_id
from shared.contracts.memory_api import (
    MEMORY_RESPONSE,
    GetUserSessionsRequest,
    ImportMessage,
    ImportMessagesData,
    ImportMessagesRequest,
    MemoryResponse,
)
from shared.contracts.messages import (
    AddData,
    AddRequest,
    DocAddData,
    DocAdded,
    DocAddRequest,
    DocDeleted,
    DocDeleteData,
    DocDeleteRequest,
    DocSearchData,
    DocSearchRequest,
    DocSearchResult,
    ListData,
    ListRequest,
    OptimizeRequest,
    ProfileGetRequest,
    SearchData,
    SearchEntitiesData,
    SearchEntitiesRequest,
    SearchRequest,
    StatsRequest,
)
from shared.contracts.ping import MESH_VERSION
from shared.runtime import prom
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.replies import ReplyWaiter
from shared.runtime.requests import RpcClient, Unavailable

log = get_logger(__name__)
UserId = Annotated[str, Path(min_length=1, max_length=256)]


class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _fields(errors: Sequence[Any]) -> str:
    """A validation failure's fields and reasons, for a 422's message (FastAPI's and pydantic's errors alike)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


_STATUS = {"bad_request": 422, "unknown_type": 400, "not_found": 404, "expired": 504, "unavailable": 503,
           "internal": 500}


@dataclass
class Bus:
    redis: aioredis.Redis
    names: Names
    ltm: RpcClient[LTMResponse]
    memory: RpcClient[MemoryResponse]
    replies: ReplyWaiter
    settings: GatewaySettings

    async def ltm_call(self, request: Any) -> LTMResponse:
        return _checked(await _call(self.ltm, request, self.settings.gateway_timeout_s))

    async def memory_call(self, request: Any) -> MemoryResponse:
        return _checked(await _call(self.memory, request, self.settings.gateway_timeout_s))


async def _call(client: RpcClient[Any], request: Any, timeout: float) -> Any:
    try:
        return await client.call(request, timeout)
    except TimeoutError:
        raise GatewayError(504, "timeout", f"no answer within {timeout:g}s") from None
    except Unavailable as exc:
        raise GatewayError(503, "unavailable", f"the bus is unavailable: {exc}") from None


def _checked(resp: Any) -> Any:
    if not resp.success:
        code = resp.error.code.value if resp.error else "internal"
        raise GatewayError(_STATUS.get(code, 500), code, resp.error.message if resp.error else "failed")
    return resp


# --------------------------------------------------------------------------- bodies
class ChatIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    session_id: str | None = Field(default=None, min_length=1, max_length=256, description="new session if absent")
    content: str = Field(min_length=1)
    timeout_s: float | None = Field(default=None, gt=0, le=600)


class ChatOut(BaseModel):
    message_id: str
    session_id: str
    reply: str
    ltm: str
    memories_used: int
    model: str
    latency_ms: float


class MemoryIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    content: str = Field(min_length=1)
    type: str = "fact"
    confidence: float = Field(default=0.9, ge=0, le=1)


class EntitySearchIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1)
    limit: int = Field(default=10, ge=1, le=100)


class ImportIn(BaseModel):
    messages: list[ImportMessage] = Field(min_length=1)


class Memories(BaseModel):
    user_id: str
    memories: list[Memory]


def caller(request: Request, authorization: Annotated[str | None, Header()] = None,
           x_api_key: Annotated[str | None, Header()] = None) -> Scope:
    presented = x_api_key or (authorization[7:] if authorization and authorization.startswith("Bearer ") else None)
    scope = lookup(request.app.state.keys, presented)
    if scope is None:
        raise GatewayError(401, "unauthorized", "a valid API key is needed (Authorization: Bearer KEY)")
    return scope


def bus_of(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


Caller = Annotated[Scope, Depends(caller)]
BusDep = Annotated[Bus, Depends(bus_of)]


# --------------------------------------------------------------------------- the app
def create_app(settings: GatewaySettings | None = None, names: Names | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    names = names or Names.from_env()
    keys = parse_keys(settings.gateway_api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from shared.runtime.runner import redis_client

        redis = redis_client(settings.redis_url, settings.redis_cluster)
        tag = f"gateway-{settings.consumer_name}"
        metrics = Metrics(redis, names.metrics("gateway"))
        ltm: RpcClient[LTMResponse] = RpcClient(redis, queue=names.ltm_requests, adapter=LTM_RESPONSE,
                                                reply_channel=names.reply_channel(names.ltm_responses, tag),
                                                metrics=metrics)
        memory: RpcClient[MemoryResponse] = RpcClient(
            redis, queue=names.memory_requests, adapter=MEMORY_RESPONSE,
            reply_channel=names.reply_channel(names.memory_responses, tag), metrics=metrics)
        replies = ReplyWaiter(redis, names.ai_responses)
        await ltm.start()
        await memory.start()
        await replies.start()
        app.state.bus = Bus(redis, names, ltm, memory, replies, settings)
        log.info("gateway.ready", keys=len(keys))
        try:
            yield
        finally:
            await replies.close()
            await memory.close()
            await ltm.close()
            await redis.aclose()

    app = FastAPI(title="memory mesh gateway", version=MESH_VERSION, lifespan=lifespan)
    app.state.keys = keys

    def too_large() -> JSONResponse:
        return _error(413, "bad_request", f"request body over {settings.gateway_max_body_bytes} bytes")

    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_body_bytes, too_large=too_large)  # chunked bodies

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > settings.gateway_max_body_bytes):
            response: Any = too_large()
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        kind = f"{request.method} {getattr(route, 'path', 'unmatched')}"
        outcome = "ok" if response.status_code < 400 else str(response.status_code)
        prom.API_REQUESTS.labels("gateway", kind, outcome).inc()
        prom.API_DURATION.labels("gateway", kind).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(redis.exceptions.RedisError)
    async def bus_error(_request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        # Redis down, or refused by its ACL (NOPERM: a deployment whose gateway user lacks a right): logged with
        # the command's class, answered as JSON like every other error
        log.error("gateway.bus_error", error=type(exc).__name__, message=str(exc)[:200])
        code, status = ("unavailable", 503) if isinstance(exc, redis.exceptions.ConnectionError | \
                                                          redis.exceptions.TimeoutError) else ("internal", 500)
        return _error(status, code, f"the bus refused or failed: {type(exc).__name__}")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "bad_request", _fields(exc.errors()))

    def allowed(scope: Scope, user_id: str) -> None:
        if not scope.allows(user_id):
            raise GatewayError(403, "forbidden", "this key may not act for that user")

    def message(body: ChatIn, scope: Scope) -> UserInput:
        """The turn as the bus carries it, or the refusal (403, 413, 422) as JSON before anything is sent."""
        allowed(scope, body.user_id)
        size = len(body.content.encode("utf-8"))
        if size > settings.max_content_bytes:  # the bus would refuse it (MAX_CONTENT_BYTES): say so, not a 500
            raise GatewayError(413, "bad_request", f"content is {size} bytes, over the limit of "
                                                   f"{settings.max_content_bytes}")
        try:
            return UserInput.model_validate(
                {"message_id": new_id(), "user_id": body.user_id, "session_id": body.session_id or new_id(),
                 "content": body.content}, context={"max_content_bytes": settings.max_content_bytes})
        except ValidationError as exc:  # what the bus's model refuses beyond ChatIn's own checks (a blank session id)
            raise GatewayError(422, "bad_request", _fields(exc.errors())) from None

    async def turn(msg: UserInput, body: ChatIn, bus: Bus, sent: asyncio.Event | None = None) -> ChatOut:
        timeout = body.timeout_s or settings.gateway_timeout_s
        with bus.replies.expect(msg.message_id) as fut:
            await bus.redis.xadd(names.user_input, {"data": encode(msg)})
            if sent is not None:
                sent.set()
            try:
                reply: AIResponse = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise GatewayError(504, "timeout", f"no reply within {timeout:g}s") from None
        return ChatOut(message_id=msg.message_id, session_id=msg.session_id, reply=reply.content,
                       ltm=reply.meta.ltm, memories_used=reply.meta.memories_used, model=reply.meta.model,
                       latency_ms=reply.meta.latency_ms)

    @app.post("/v1/chat", response_model=ChatOut)
    async def chat(body: ChatIn, scope: Caller, bus: BusDep, stream: bool = False) -> Any:
        """Send one turn and wait for its reply (at most ``timeout_s``, default GATEWAY_TIMEOUT_S). ``stream=true``
        answers with server-sent events instead: ``accepted`` once the turn is on the bus, then ``reply`` (the same
        body) or ``error``. The services reply in one piece, so the reply is one event, not tokens."""
        msg = message(body, scope)  # before a stream starts: refusals stay plain JSON errors
        if not stream:
            return await turn(msg, body, bus)

        async def events() -> AsyncIterator[str]:
            sent = asyncio.Event()
            task = asyncio.create_task(turn(msg, body, bus, sent))
            waiter = asyncio.create_task(sent.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if sent.is_set():
                yield "event: accepted\ndata: {}\n\n"
            try:
                out = await task
                yield f"event: reply\ndata: {out.model_dump_json()}\n\n"
            except GatewayError as exc:
                payload = json.dumps({"error": {"code": exc.code, "message": exc.message}})
                yield f"event: error\ndata: {payload}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/sessions/{user_id}")
    async def sessions(user_id: UserId, scope: Caller, bus: BusDep,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
        allowed(scope, user_id)
        resp = await bus.memory_call(GetUserSessionsRequest(request_id=new_id(), type="get_user_sessions",
                                                            user_id=user_id, data={"limit": limit}))
        return {"user_id": user_id, **(resp.data or {})}

    @app.post("/api/v1/memories/{user_id}/search", response_model=Memories)
    async def search(user_id: UserId, scope: Caller, bus: BusDep, query: Annotated[str, Query(min_length=1)],
                     top_k: Annotated[int, Query(ge=1, le=100)] = 5) -> Memories:
        allowed(scope, user_id)
        resp = await bus.ltm_call(SearchRequest(request_id=new_id(), type="search", user_id=user_id,
                                                data=SearchData(query=query, limit=top_k)))
        return Memories(user_id=user_id, memories=resp.memories)

    @app.post("/api/v1/memories", response_model=Memories, status_code=201)
    async def add(body: MemoryIn, scope: Caller, bus: BusDep) -> Memories:
        allowed(scope, body.user_id)
        try:
            data = AddData(content=body.content, type=body.type, confidence=body.confidence)  # type: ignore[arg-type]
        except ValueError as exc:
            raise GatewayError(422, "bad_request", str(exc)) from None
        resp = await bus.ltm_call(AddRequest(request_id=new_id(), type="add", user_id=body.user_id, data=data))
        return Memories(user_id=body.user_id, memories=resp.memories)

    @app.get("/api/v1/memories/{user_id}/stats")
    async def stats(user_id: UserId, scope: Caller, bus: BusDep) -> dict[str, Any]:
        allowed(scope, user_id)
        resp = await bus.ltm_call(StatsRequest(request_id=new_id(), type="stats", user_id=user_id))
        return {"user_id": user_id, **(resp.data or {})}

    @app.get("/api/v1/memories/{user_id}", response_model=Memories)
    async def list_memories(user_id: UserId, scope: Caller, bus: BusDep,
                            limit: Annotated[int, Query(ge=1, le=200)] = 20,
                            offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> Memories:
        """A page of the user's memories, newest first (ltm's ``list``)."""
        allowed(scope, user_id)
        resp = await bus.ltm_call(ListRequest(request_id=new_id(), type="list", user_id=user_id,
                                              data=ListData(limit=limit, offset=offset)))
        return Memories(user_id=user_id, memories=resp.memories)

    @app.post("/api/v1/documents/{user_id}", response_model=DocAdded, status_code=201)
    async def doc_add(user_id: UserId, body: DocAddData, scope: Caller, bus: BusDep) -> DocAdded:
        """One document into the user's collection (text, Markdown or HTML; idempotent by text and source)."""
        allowed(scope, user_id)
        resp = await bus.ltm_call(DocAddRequest(request_id=new_id(), type="doc_add", user_id=user_id, data=body))
        return DocAdded.model_validate(resp.data)

    @app.post("/api/v1/documents/{user_id}/search", response_model=DocSearchResult)
    async def doc_search(user_id: UserId, scope: Caller, bus: BusDep, query: Annotated[str, Query(min_length=1)],
                         top_k: Annotated[int, Query(ge=1, le=50)] = 5) -> DocSearchResult:
        """Passages of the user's documents, best first, each with its document and headings."""
        allowed(scope, user_id)
        try:
            data = DocSearchData(query=query, top_k=top_k)
        except ValueError as exc:
            raise GatewayError(422, "bad_request", str(exc)) from None
        resp = await bus.ltm_call(DocSearchRequest(request_id=new_id(), type="doc_search", user_id=user_id,
                                                   data=data))
        return DocSearchResult.model_validate(resp.data)

    @app.delete("/api/v1/documents/{user_id}", response_model=DocDeleted)
    async def doc_delete(user_id: UserId, scope: Caller, bus: BusDep, doc_id: str | None = None) -> DocDeleted:
        """One document (``?doc_id=``) or, without it, every document of the user."""
        allowed(scope, user_id)
        try:
            data = DocDeleteData(doc_id=doc_id) if doc_id is not None else DocDeleteData(all=True)
        except ValueError as exc:
            raise GatewayError(422, "bad_request", str(exc)) from None
        resp = await bus.ltm_call(DocDeleteRequest(request_id=new_id(), type="doc_delete", user_id=user_id,
                                                   data=data))
        return DocDeleted.model_validate(resp.data)

    @app.post("/api/v1/conversation", response_model=ChatOut)
    async def conversation(body: ChatIn, scope: Caller, bus: BusDep) -> ChatOut:
        """The seed's name for a chat turn: the same as ``POST /v1/chat``."""
        return await turn(message(body, scope), body, bus)

    @app.post("/v1/users/{user_id}/import")
    async def import_history(user_id: UserId, body: ImportIn, scope: Caller, bus: BusDep) -> dict[str, Any]:
        """Past turns of one user (idempotent; ids derived when absent), through memory's ``import_messages``."""
        allowed(scope, user_id)
        resp = await bus.memory_call(ImportMessagesRequest(
            request_id=new_id(), type="import_messages", user_id=user_id,
            data=ImportMessagesData(messages=body.messages)))
        return {"user_id": user_id, **(resp.data or {})}

    @app.post("/api/v1/memories/{user_id}/optimize")
    async def optimize(user_id: UserId, scope: Caller, bus: BusDep) -> dict[str, Any]:
        allowed(scope, user_id)
        resp = await bus.ltm_call(OptimizeRequest(request_id=new_id(), type="optimize", user_id=user_id))
        return {"user_id": user_id, **(resp.data or {})}

    @app.get("/memory/user/{user_id}/summary")
    async def user_summary(user_id: UserId, scope: Caller, bus: BusDep) -> dict[str, Any]:
        """What the mesh holds of a user: memory counts by type and the profile."""
        allowed(scope, user_id)
        stats_resp = await bus.ltm_call(StatsRequest(request_id=new_id(), type="stats", user_id=user_id))
        profile = await bus.ltm_call(ProfileGetRequest(request_id=new_id(), type="profile_get", user_id=user_id))
        return {"user_id": user_id, "stats": stats_resp.data or {}, "profile": profile.user_profile or {}}

    @app.post("/memory/search/entities")
    async def search_entities(body: EntitySearchIn, scope: Caller, bus: BusDep) -> dict[str, Any]:
        allowed(scope, body.user_id)
        resp = await bus.ltm_call(SearchEntitiesRequest(request_id=new_id(), type="search_entities",
                                                        user_id=body.user_id,
                                                        data=SearchEntitiesData(query=body.query, limit=body.limit)))
        return {"user_id": body.user_id, **(resp.data or {})}

    @app.get("/memory/context/{user_id}")
    async def context(user_id: UserId, scope: Caller, bus: BusDep, query: Annotated[str, Query(min_length=1)],
                      max_tokens: Annotated[int, Query(ge=100, le=32_000)] = 1500) -> dict[str, Any]:
        """The memory block chat_ai would put in a prompt for this query (services/chat_ai/prompt.py)."""
        from services.chat_ai.prompt import memory_block

        allowed(scope, user_id)
        resp = await bus.ltm_call(SearchRequest(request_id=new_id(), type="search", user_id=user_id,
                                                data=SearchData(query=query, limit=10, max_tokens=max_tokens,
                                                                source_turns=True)))
        block = memory_block(resp.memories, max_tokens, 200)
        return {"user_id": user_id, "context": block.text, "memories_used": len(block.entries),
                "tokens": block.tokens}

    @app.get("/memory/status")
    async def status(scope: Caller, bus: BusDep) -> dict[str, Any]:
        """The bus: streams, groups' lag and pending, request lists, dead letters (admin keys only)."""
        from mesh.status import bus_status

        if not scope.admin:
            raise GatewayError(403, "forbidden", "the mesh's status is for admin keys")
        return await bus_status(bus.redis, names)

    async def _forget(user_id: str, scope: Scope, bus: Bus) -> dict[str, Any]:
        from mesh.forget import DeletionFailed, forget_user

        allowed(scope, user_id)
        try:
            # its Redis user reads no stream's entries: the services' own passes remove the user's
            out = await forget_user(bus.redis, names, user_id, timeout=settings.gateway_timeout_s, sweep=False)
        except DeletionFailed as exc:
            raise GatewayError(500, "internal", str(exc)) from None
        except TimeoutError:
            raise GatewayError(504, "timeout", "a service did not confirm the deletion in time") from None
        except Unavailable as exc:
            raise GatewayError(503, "unavailable", str(exc)) from None
        return {"user_id": user_id, "deleted": out["total"], "memory": out["memory"], "ltm": out["ltm"]}

    @app.delete("/memory/user/{user_id}")
    async def delete_user(user_id: UserId, scope: Caller, bus: BusDep) -> dict[str, Any]:
        """The whole user, in every store (conversation store, STM, long-term memory, streams)."""
        return await _forget(user_id, scope, bus)

    @app.delete("/api/v1/memories/{user_id}/all")
    async def delete_all(user_id: UserId, scope: Caller, bus: BusDep) -> dict[str, Any]:
        return await _forget(user_id, scope, bus)

    console = (Path_(__file__).parent / "console.html").read_text(encoding="utf-8")

    @app.get("/console", response_class=HTMLResponse, include_in_schema=False)
    async def console_page() -> HTMLResponse:
        """The web console: one static page (no build step) that calls the routes above with the key typed in."""
        return HTMLResponse(console, headers={"Content-Security-Policy": "default-src 'self'; "
                                              "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    @app.get("/api/v1/health")
    async def health(request: Request) -> JSONResponse:
        """Redis and each service, from a ping over the bus (no key needed)."""
        from mesh.ready import Pinger

        bus: Bus = request.app.state.bus
        started = time.perf_counter()
        try:
            redis_ok = bool(await bus.redis.ping())
        except Exception:  # noqa: BLE001 - reported, not raised
            redis_ok = False
        services: dict[str, Any] = {}
        if redis_ok:
            async with Pinger(bus.redis, names, ["memory", "ltm", "chat_ai"]) as pinger:
                answers = await pinger.ping_all(2.0)
            services = {name: {"up": bool(infos), **({"version": infos[0].version, "backend": infos[0].backend}
                                                     if infos else {})} for name, infos in answers.items()}
        ok = redis_ok and all(s["up"] for s in services.values())
        body = {"ok": ok, "redis": redis_ok, "services": services, "ms": round((time.perf_counter() - started) * 1000)}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app
