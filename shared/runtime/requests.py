"""Request/response over Redis: a list of requests, replies published on a channel.

:class:`RequestServer` is the worker side (BLPOP, any number of competing workers; newest first while the list
is congested, see ``RequestServer._pop``);
:class:`RpcClient` is the requester side, built like a JSON-RPC client: one shared
subscription per process, a pending map keyed by ``request_id``, the subscription
ready before anything is sent, the timeout armed after the send, the entry removed
on every path and late replies dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, TypeAdapter

from shared.contracts import DecodeError, ErrorCode, ErrorInfo, decode, encode
from shared.contracts.errors import MeshError
from shared.contracts.messages import RequestEnvelope
from shared.runtime import prom
from shared.runtime.backoff import Backoff
from shared.runtime.deadletter import dead_letter
from shared.runtime.drain import drain_within
from shared.runtime.errors import REDIS_ERRORS, is_transient, redis_failed
from shared.runtime.fence import RECEIVED_AT
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.priority import Foreground
from shared.runtime.pubsub import listen

log = get_logger(__name__)


Req = TypeVar("Req")
Resp = TypeVar("Resp", bound=BaseModel)
ErrorReply = Callable[[str, ErrorInfo, str | None], BaseModel]
"""``error_reply(request_id, error, user_id)`` builds the failure response."""


def _expired(raw: bytes | str) -> bool:
    """Whether a request still in the list is past its deadline (read without decoding the rest; a request that
    does not parse is not: it is rejected when taken)."""
    try:
        deadline = json.loads(raw).get("deadline")
        return isinstance(deadline, int | float) and time.time() > deadline
    except (ValueError, AttributeError, RecursionError):
        return False


SLOW_LOG_EVERY_S = 1.0  # requests.slow: at most one line a second per server (the others counted, and said in it)


class RequestServer(Generic[Req]):
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        queue: str,
        reply_channel: str,
        adapter: TypeAdapter[Req],
        handler: Callable[[Req], Awaitable[BaseModel]],
        error_reply: ErrorReply,
        metrics: Metrics,
        max_content_bytes: int,
        concurrency: int = 8,
        block_s: float = 1.0,
        max_payload_bytes: int | None = None,  # whole-request limit when batches need more than payload_limit()
        foreground: Foreground | None = None,  # marks each request served (background work steps aside)
        drain_s: float = 10.0,  # on stop, requests still running after this long get an `unavailable` reply
        context: dict[str, Any] | None = None,  # validation context of every request (decode's ``context``)
        slow_ms: float = 0.0,  # REQUEST_SLOW_MS: a request this slow from its send to its reply is logged (0: none)
    ) -> None:
        self.redis, self.queue, self.reply_channel = redis, queue, reply_channel
        self.adapter, self.handler, self.error_reply = adapter, handler, error_reply
        self.metrics, self.max_content_bytes = metrics, max_content_bytes
        self.max_payload_bytes = max_payload_bytes
        self.context = context
        self.foreground = foreground
        self.block_s = block_s
        self.drain_s = drain_s
        self.slow_ms = slow_ms
        self._slow_logged_at = -SLOW_LOG_EVERY_S  # see _note_slow
        self._slow_unlogged = 0
        self._sem = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._congested = False  # see _pop
        self._drop_oldest = False  # see _pop

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        backoff = Backoff()
        log.info("requests.start", queue=self.queue)
        while not self._stop.is_set():
            try:
                await self._sem.acquire()
                try:
                    raw = await self._pop()
                except BaseException:
                    self._sem.release()
                    raise
                if raw is None:
                    self._sem.release()
                    continue
                backoff.reset()
                task = asyncio.create_task(self._serve(raw))
                self._inflight.add(task)
                task.add_done_callback(self._done)
            except REDIS_ERRORS as exc:  # an outage, or an error an operator must fix (NOPERM): wait, never stop
                redis_failed(exc, self.metrics, "requests", queue=self.queue)
                await backoff.sleep(self._stop)
        await drain_within(self._inflight, self.drain_s, what=self.queue, metrics=self.metrics)
        log.info("requests.stopped", queue=self.queue)

    async def _pop(self) -> bytes | str | None:
        """The next request: the oldest (BLPOP, blocking briefly) while the list keeps up; the newest (RPOP) while it
        is congested, i.e. since a request was found expired when taken, until the list is empty or its oldest
        request has time left again. Under overload the requests with time left go first and the ones whose
        requester gave up expire unserved, instead of every request waiting out its deadline behind them (adaptive
        LIFO). Newest first only while the oldest has expired: once requesters send no more than the list keeps up
        with (chat_ai adapts how many it sends, services/chat_ai/recall_limit.py), newest first would leave the
        few oldest at the bottom, below a steady trickle of new ones, until they expire. While the oldest has
        expired, every other pop takes it (to be dropped as expired, at the cost of its decoding), so the bottom
        of the list drains and shows when the list keeps up again."""
        if self._drop_oldest:
            self._drop_oldest = False
            raw = await self.redis.lpop(self.queue)
            if raw is not None:
                return raw  # type: ignore[return-value]
        if self._congested:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpop(self.queue)
                pipe.lindex(self.queue, 0)
                raw, oldest = await pipe.execute()
            if raw is None or oldest is None or not _expired(oldest):
                self._congested = False
            else:
                self._drop_oldest = True
            if raw is not None:
                return raw  # type: ignore[no-any-return]
        item = await self.redis.blpop([self.queue], timeout=self.block_s)
        return None if item is None else item[1]

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._sem.release()
        if not task.cancelled() and task.exception() is not None:  # never dropped unseen
            self.metrics.incr("task_errors")
            log.error("requests.task_failed", queue=self.queue, exc_info=task.exception())

    async def _serve(self, raw: bytes | str) -> None:
        started = time.perf_counter()
        kind, outcome = "unknown", "unfinished"  # if it raises (cancelled at shutdown)
        try:
            kind, outcome = await self._serve_one(raw)
        finally:
            service = self.metrics.service
            prom.API_REQUESTS.labels(service, kind, outcome).inc()
            prom.API_DURATION.labels(service, kind).observe(time.perf_counter() - started)
            if outcome == "ok":
                prom.OPERATIONS.labels(service, kind).inc()

    async def _serve_one(self, raw: bytes | str) -> tuple[str, str]:
        """Serve one request; returns its type and outcome (``ok`` or the reply's error code) for the metrics."""
        started = time.perf_counter()
        taken = time.time()
        try:
            request = decode(self.adapter, raw, max_content_bytes=self.max_content_bytes,
                             max_payload_bytes=self.max_payload_bytes, context=self.context)
        except DecodeError as err:
            self.metrics.incr(f"rejected.{err.reason.value}")
            log.warning("requests.rejected", queue=self.queue, reason=err.reason.value, error=err.message,
                        request_id=err.request_id)
            await self._safe(dead_letter(self.redis, self.queue, raw, err.reason.value, err.message))
            if err.request_id:
                await self._reply(err.reply_to, self.error_reply(err.request_id, err.info(), err.user_id))
            return "invalid", err.info().code.value
        envelope: RequestEnvelope = request  # type: ignore[assignment]  # every member of the union is one
        kind = str(getattr(envelope, "type", "unknown"))
        # when the request was made, for a deletion fence (shared/runtime/fence.py): its send time, never later than
        # when it was taken; this request's task's own context
        RECEIVED_AT.set(taken if envelope.sent_at is None else min(envelope.sent_at, taken))
        if envelope.expired():
            self._congested = True  # the list is behind: newest first until it empties (_pop)
            self.metrics.incr("expired")
            log.info("requests.expired", queue=self.queue, request_id=envelope.request_id)
            return kind, "expired"
        outcome = "ok"
        try:
            if self.foreground is not None:
                with self.foreground.serving():
                    response = await self.handler(request)
            else:
                response = await self.handler(request)
            self.metrics.incr("served")
        except asyncio.CancelledError:  # shutdown ran out of grace: say so rather than leave the requester waiting
            info = ErrorInfo(code=ErrorCode.UNAVAILABLE, message="the worker shut down before finishing; try again")
            await self._reply(envelope.reply_to, self.error_reply(envelope.request_id, info,
                                                                  getattr(envelope, "user_id", None)))
            raise
        except MeshError as exc:  # the one place a request's error becomes its reply
            outcome = exc.code.value
            self.metrics.incr(f"failed.{exc.code.value}")
            log.info("requests.refused", request_id=envelope.request_id, code=exc.code.value, error=exc.message)
            response = self.error_reply(envelope.request_id, exc.info(), getattr(envelope, "user_id", None))
        except Exception as exc:
            transient = is_transient(exc)
            code = ErrorCode.UNAVAILABLE if transient else ErrorCode.INTERNAL
            outcome = code.value
            self.metrics.incr(f"failed.{code.value}")
            if transient:
                log.warning("requests.unavailable", request_id=envelope.request_id, error=str(exc))
            else:
                log.exception("requests.failed", request_id=envelope.request_id)
            message = "a store is unavailable, try again" if transient else f"{type(exc).__name__}"
            response = self.error_reply(envelope.request_id, ErrorInfo(code=code, message=message),
                                        getattr(envelope, "user_id", None))
        await self._reply(envelope.reply_to, response)
        served_ms = (time.perf_counter() - started) * 1000
        self.metrics.incr("latency_ms_total", int(served_ms))
        self._note_slow(envelope, kind, outcome, taken, served_ms)
        return kind, outcome

    def _note_slow(self, envelope: RequestEnvelope, kind: str, outcome: str, taken: float, served_ms: float) -> None:
        """``requests.slow``: where a slow request's time went, as this process saw it. ``queued_ms``: from its
        ``sent_at`` (the requester's clock) to when it was taken here (the list, or this process's concurrency
        limit); ``served_ms``: from then to its reply (the handler's own work, and the CPU it shared);
        ``in_flight``: the requests this process was serving meanwhile (this one included)."""
        if self.slow_ms <= 0:
            return
        queued_ms = max(0.0, (taken - envelope.sent_at) * 1000) if envelope.sent_at is not None else 0.0
        if queued_ms + served_ms < self.slow_ms:
            return
        self.metrics.incr("slow")
        now = time.monotonic()
        if now - self._slow_logged_at < SLOW_LOG_EVERY_S:  # an overloaded process: counted, logged once a second
            self._slow_unlogged += 1
            return
        log.warning("requests.slow", queue=self.queue, type=kind, outcome=outcome, request_id=envelope.request_id,
                    user_id=getattr(envelope, "user_id", None), queued_ms=round(queued_ms, 1),
                    served_ms=round(served_ms, 1), in_flight=len(self._inflight), unlogged=self._slow_unlogged)
        self._slow_logged_at, self._slow_unlogged = now, 0

    async def _reply(self, reply_to: str | None, response: BaseModel) -> None:
        try:
            data = encode(response)
        except ValueError:  # pydantic cannot serialise it (a value nested past its limit): say so, never go silent
            self.metrics.incr("reply_unencodable")
            log.exception("requests.reply_unencodable")
            request_id = str(getattr(response, "request_id", ""))
            info = ErrorInfo(code=ErrorCode.INTERNAL, message="the reply could not be encoded")
            data = encode(self.error_reply(request_id, info, getattr(response, "user_id", None)))
        await self._safe(self.redis.publish(reply_to or self.reply_channel, data))

    async def _safe(self, op: Awaitable[Any]) -> None:
        try:
            await op
        except REDIS_ERRORS as exc:
            self.metrics.incr("reply_failed")
            log.warning("requests.reply_failed", error=str(exc))


# A request list longer than this is cut to its newest requests by the requester that pushed past it: while no
# server pops it (ltm down, chat_ai still answering without memory) it would grow by one request a turn.
MAX_QUEUE = 10_000


class Unavailable(Exception):
    """The requester could not reach the bus (Redis failed the send, or see :class:`NotSubscribed`)."""


class NotSubscribed(Unavailable):
    """The reply subscription was not up for the whole wait: nothing was sent."""


class RpcClient(Generic[Resp]):
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        queue: str,
        reply_channel: str,
        adapter: TypeAdapter[Resp],
        metrics: Metrics,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self.redis, self.queue, self.reply_channel = redis, queue, reply_channel
        self.adapter, self.metrics, self.max_queue = adapter, metrics, max_queue
        self._pending: dict[str, asyncio.Future[Resp]] = {}
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_reply = 0.0  # time.monotonic() of the last reply heard, in time or late: the server is alive

    async def start(self, timeout: float = 5.0) -> None:
        self._task = asyncio.create_task(
            listen(self.redis, self.reply_channel, self._deliver, self._stop, metrics=self.metrics, ready=self._ready))
        self._task.add_done_callback(self._listener_ended)
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            log.warning("rpc.not_ready", channel=self.reply_channel)

    async def close(self) -> None:
        self._stop.set()
        if self._task:
            await self._task
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()

    async def call(self, request: RequestEnvelope, timeout: float) -> Resp:
        """Send and wait at most ``timeout`` seconds in all (raises TimeoutError or Unavailable)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                raise NotSubscribed("reply subscription is not ready") from None
        request_id = request.request_id
        sent = time.time()
        request = request.model_copy(update={"reply_to": self.reply_channel, "deadline": sent + timeout,
                                             "sent_at": sent})
        fut: asyncio.Future[Resp] = loop.create_future()
        self._pending[request_id] = fut
        try:
            if await self.redis.rpush(self.queue, encode(request)) > self.max_queue:
                # nobody serves the list (ltm down) or far too slowly: its oldest requests go, not Redis's memory
                await self.redis.ltrim(self.queue, -self.max_queue, -1)
                self.metrics.incr("rpc.queue_trimmed")
            remaining = max(0.0, timeout - (loop.time() - start))
            return await asyncio.wait_for(fut, remaining)
        except REDIS_ERRORS as exc:
            raise Unavailable(str(exc)) from exc
        finally:
            self._pending.pop(request_id, None)

    def _listener_ended(self, task: asyncio.Task[None]) -> None:
        """The reply listener ends only on close; ended otherwise (a bug), no call may wait for a reply: every call
        raises NotSubscribed from now on, and the failure is logged, never dropped unseen."""
        self._ready.clear()
        if not task.cancelled() and task.exception() is not None:
            self.metrics.incr("rpc.listener_failed")
            log.error("rpc.listener_failed", channel=self.reply_channel, exc_info=task.exception())

    def _deliver(self, raw: bytes | str) -> None:
        try:
            response = decode(self.adapter, raw, max_content_bytes=1 << 30)
        except DecodeError as err:
            self.metrics.incr("rpc.bad_reply")
            log.warning("rpc.bad_reply", error=err.message)
            return
        self.last_reply = time.monotonic()
        fut = self._pending.get(str(getattr(response, "request_id", "")))
        if fut is None or fut.done():
            self.metrics.incr("rpc.late_reply")
            return
        fut.set_result(response)
