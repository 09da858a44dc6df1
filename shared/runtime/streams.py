"""A consumer-group worker for one Redis stream.

The loop: short blocking XREADGROUP reads (so shutdown is prompt), handlers run
with bounded concurrency, XACK only after the handler returned (its work is
durable). Failures are sorted three ways:

* bad input (:class:`DecodeError`) or any :class:`MeshError`: dead-lettered with its reason and acked at once;
* passing failures (a store is down, see :mod:`shared.runtime.errors`): retried in
  place with back-off until it works or the worker stops (then left pending);
* anything else: left pending; it is claimed again after ``claim_idle_ms``
  (XAUTOCLAIM, by this or any consumer) and dead-lettered after ``max_deliveries``.

Connection errors on the loop itself back off and reconnect; a vanished group
(FLUSHALL, stream deleted) is recreated.

**Intake.** A consumer reads no more entries than can start now (an entry read but queued locally would look idle to
the other consumers): at most ``concurrency`` handlers in flight, and with ``intake`` at most ``intake()`` of them
in their first stage, which a handler leaves by calling :func:`leave_intake`. chat_ai's first stage is the wait for
memory: a burst of turns then waits in the stream, where its clock does not run against ``LTM_TIMEOUT_MS``, instead
of in ltm's request list, where it does (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from shared.contracts import STREAM_FIELD, DeadLetterReason
from shared.contracts.errors import MeshError
from shared.contracts.names import Names
from shared.runtime import prom
from shared.runtime.backoff import Backoff
from shared.runtime.deadletter import DEAD_LETTER_MAXLEN, dead_letter_fields
from shared.runtime.drain import drain_within
from shared.runtime.errors import REDIS_ERRORS, is_redis_down, is_transient, redis_failed
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.runner import batch

log = get_logger(__name__)

CONSUMER_IDLE_S = 24 * 3600  # a consumer of a group idle this long, with nothing pending, is removed
TRIM_EVERY_S = 30.0  # how often a consumer trims its stream (when it has a retention)
# A passing failure (is_transient) is retried in place, since a store down fails every entry alike; after this many
# attempts, while more than this many other entries went through meanwhile, it is the entry's own (_process). A
# consumer with concurrency 1 sees no others while it retries: it retries in place, as through an outage.
OWN_TRANSIENT_AFTER = 5

Handler = Callable[[str, bytes | str | None], Awaitable[None]]
"""``handler(entry_id, raw_json)``: decode, do the work durably, return. Raise to fail."""

_LEAVE_INTAKE: ContextVar[Callable[[], None] | None] = ContextVar("leave_intake", default=None)


def leave_intake() -> None:
    """The running handler's entry has passed its first stage: its consumer may read another entry in its place
    (this one stays in flight, acknowledged when its handler returns). A no-op outside a consumer's handler, when
    the consumer has no ``intake`` limit, and after the first call."""
    leave = _LEAVE_INTAKE.get()
    if leave is not None:
        leave()


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _field(fields: dict[Any, Any]) -> bytes | str | None:
    value = fields.get(STREAM_FIELD.encode())
    return fields.get(STREAM_FIELD) if value is None else value


class StreamConsumer:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        metrics: Metrics,
        concurrency: int = 1,
        batch: int = 32,
        block_ms: int = 1000,
        claim_idle_ms: int = 15_000,
        max_deliveries: int = 5,
        retention_s: float | None = None,
        drain_s: float = 10.0,
        operation: str | None = None,
        intake: Callable[[], int] | None = None,
    ) -> None:
        """``retention_s``: entries older than this that every group of the stream has read and acknowledged
        are trimmed (XTRIM MINID, checked every TRIM_EVERY_S); None keeps everything. ``drain_s``: on stop,
        handlers still running after this long are cancelled, their entries left pending for another consumer.
        ``intake``: how many handlers may be in their first stage at once, asked before every read (module
        docstring); None: no stages, only ``concurrency``."""
        self.redis = redis
        self.stream, self.group, self.consumer = stream, group, consumer
        self.handler = handler
        self.metrics = metrics
        self.batch, self.block_ms = batch, block_ms
        self.claim_idle_ms, self.max_deliveries = claim_idle_ms, max_deliveries
        self.concurrency = concurrency
        self._sem = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._inflight_ids: set[str] = set()
        self.intake = intake
        self._staged: set[str] = set()  # in-flight entries still in their first stage (with ``intake``)
        self._succeeded = 0  # entries handled so far (a transient failure others do not have is the entry's own)
        self._freed = asyncio.Event()  # a handler ended or left its first stage
        self._stop = asyncio.Event()
        self._group_ready = False
        self._last_claim = 0.0
        self.retention_s = retention_s
        self.drain_s = drain_s
        self.operation = operation or "consume"  # memory_operations_total{operation} of each entry handled
        self._last_trim = time.monotonic()
        self.name = f"{stream}/{group}"

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        backoff = Backoff()
        log.info("consumer.start", stream=self.stream, group=self.group, consumer=self.consumer)
        while not self._stop.is_set():
            try:
                await self._ensure_group()
                if time.monotonic() - self._last_claim >= max(self.claim_idle_ms / 2000, 0.05):
                    self._last_claim = time.monotonic()
                    await self._claim()
                if self.retention_s is not None and time.monotonic() - self._last_trim >= TRIM_EVERY_S:
                    self._last_trim = time.monotonic()
                    await self._trim()
                await self._read()
                backoff.reset()
            except REDIS_ERRORS as exc:
                self._group_ready = False
                if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
                    continue  # the stream or group was deleted: made again at once
                redis_failed(exc, self.metrics, "consumer", stream=self.stream)
                await backoff.sleep(self._stop)
        await self.drain()
        log.info("consumer.stopped", stream=self.stream, group=self.group)

    async def drain(self) -> None:
        """Wait for in-flight handlers (their acks), at most ``drain_s``; the rest are cancelled, unacknowledged."""
        await drain_within(self._inflight, self.drain_s, what=self.name, metrics=self.metrics)

    # ------------------------------------------------------------------ reading
    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self) -> None:
        # Read no more than can start now: an entry read but queued locally would look idle
        # to the other consumers, which could claim it while it waits here.
        # Never block here for long: the loop must come round to heartbeat its in-flight entries.
        if self._free_slots() == 0:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), self.block_ms / 1000)
            except TimeoutError:
                pass
            return
        free = min(self.batch, self._free_slots())
        resp: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=free, block=self.block_ms
        )
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                await self._dispatch(_s(entry_id), fields)

    async def _claim(self) -> None:
        """Keep our own work alive, dead-letter poison entries, take over entries idle past claim_idle_ms."""
        self.metrics.incr("claim_runs")
        if self._inflight_ids:
            # Heartbeat: reset the idle time of entries we are still working on, so that a slow
            # handler is not taken over by another consumer while this one is alive.
            await self.redis.xclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                    message_ids=list(self._inflight_ids), justid=True)
        pending: Any = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=100, idle=self.claim_idle_ms
        )
        for p in pending:
            delivered = int(p["times_delivered"])
            entry_id = _s(p["message_id"])
            if delivered >= self.max_deliveries and entry_id not in self._inflight_ids:
                rows = await self.redis.xrange(self.stream, entry_id, entry_id)
                raw = _field(rows[0][1]) if rows and rows[0][1] else None
                await self._dead_and_ack(entry_id, raw, DeadLetterReason.MAX_RETRIES,
                                         f"failed {delivered} deliveries")
        start = "0-0"
        for _ in range(10):
            if self._free_slots() == 0:
                break  # take over only what can start now
            res: Any = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
                start_id=start, count=min(self.batch, self._free_slots()),
            )
            start, claimed = _s(res[0]), list(res[1])
            for raw_id, fields in claimed:
                entry_id = _s(raw_id)
                if fields is None:  # deleted from the stream while pending
                    await self.redis.xack(self.stream, self.group, entry_id)
                    continue
                if entry_id in self._inflight_ids:
                    continue  # ours, still being handled
                self.metrics.incr("claimed")
                await self._dispatch(entry_id, fields)
            if start == "0-0":
                break

    async def _trim(self) -> None:
        """Drop what no group needs any more: older than the retention and, for every group, delivered and
        acknowledged (below its oldest pending entry and not after its last delivered one). A group created
        later starts at 0 and finds what is younger than the retention."""
        assert self.retention_s is not None
        floor = (int((time.time() - self.retention_s) * 1000), 0)
        groups: Any = await self.redis.xinfo_groups(self.stream)
        for g in groups:
            name = _s(g["name"])
            last = _id(_s(g["last-delivered-id"]))
            floor = min(floor, (last[0], last[1] + 1))
            if int(g.get("pending") or 0):
                summary: Any = await self.redis.xpending(self.stream, name)
                if summary and summary.get("min"):
                    floor = min(floor, _id(_s(summary["min"])))
        if floor > (0, 0):
            removed = await self.redis.xtrim(self.stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
            if removed:
                self.metrics.incr("trimmed", int(removed))
        await self._reap_consumers()

    async def _reap_consumers(self) -> None:
        """Remove this group's consumers idle longer than CONSUMER_IDLE_S with nothing pending (copies that
        stopped or were killed: their names would stay in the group for good). One with entries pending is
        kept: _claim takes its entries over first."""
        consumers: Any = await self.redis.xinfo_consumers(self.stream, self.group)
        for c in consumers:
            name = _s(c["name"])
            if name != self.consumer and int(c.get("pending") or 0) == 0 \
                    and int(c.get("idle") or 0) > CONSUMER_IDLE_S * 1000:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)
                self.metrics.incr("consumers_reaped")
                log.info("consumer.reaped", stream=self.stream, group=self.group, consumer=name)

    def _free_slots(self) -> int:
        free = self.concurrency - len(self._inflight)
        if self.intake is not None:
            free = min(free, self.intake() - len(self._staged))
        return max(0, free)

    # ------------------------------------------------------------------ handling
    async def _dispatch(self, entry_id: str, fields: dict[Any, Any]) -> None:
        await self._sem.acquire()
        self._inflight_ids.add(entry_id)
        if self.intake is not None:
            self._staged.add(entry_id)
        task = asyncio.create_task(self._process(entry_id, fields))
        self._inflight.add(task)

        def _done(t: asyncio.Task[None]) -> None:
            self._inflight.discard(t)
            self._inflight_ids.discard(entry_id)
            self._staged.discard(entry_id)
            self._freed.set()
            self._sem.release()
            if not t.cancelled() and t.exception() is not None:  # never dropped unseen; the entry stays pending
                self.metrics.incr("task_errors")
                log.error("consumer.task_failed", stream=self.stream, entry_id=entry_id, exc_info=t.exception())

        task.add_done_callback(_done)

    async def _process(self, entry_id: str, fields: dict[Any, Any]) -> None:
        if self.intake is not None:
            _LEAVE_INTAKE.set(lambda: self._leave_intake(entry_id))  # this task's context only
        raw = _field(fields)
        backoff = Backoff(base=0.2, cap=5.0)
        failures, others_before = 0, 0
        while True:
            try:
                await self.handler(entry_id, raw)
            except MeshError as err:  # DecodeError included: this entry fails the same way every time
                reason, message = err.reason, err.message
                self.metrics.incr(f"rejected.{reason.value}")
                log.warning("consumer.rejected", stream=self.stream, entry_id=entry_id,
                            reason=reason.value, error=message)
                await self._retry_redis(
                    lambda r=reason, m=message: self._dead_and_ack(entry_id, raw, r, m))  # type: ignore[misc]
                return
            except Exception as exc:
                if is_transient(exc) and not self._stop.is_set():
                    failures += 1
                    others_before = self._succeeded if failures == 1 else others_before
                    if failures > OWN_TRANSIENT_AFTER and self._succeeded - others_before > OWN_TRANSIENT_AFTER:
                        # other entries went through all along: not an outage but this entry's own failure (a
                        # dependency that fails on this input only). Left pending: claimed again later and
                        # dead-lettered after max_deliveries, instead of retried in place for good.
                        self.metrics.incr("transient_own")
                        log.warning("consumer.transient_own", stream=self.stream, entry_id=entry_id,
                                    attempts=failures, error=f"{type(exc).__name__}: {exc}")
                        return
                    self.metrics.incr("transient_errors")
                    log.warning("consumer.transient_error", stream=self.stream, entry_id=entry_id,
                                error=f"{type(exc).__name__}: {exc}")
                    await backoff.sleep(self._stop)
                    continue
                self.metrics.incr("handler_errors")
                log.exception("consumer.handler_error", stream=self.stream, entry_id=entry_id)
                return  # left pending: claimed again later, dead-lettered after max_deliveries
            else:
                self._succeeded += 1
                self.metrics.incr("processed")
                prom.OPERATIONS.labels(self.metrics.service, self.operation).inc()
                await self._retry_redis(lambda: self.redis.xack(self.stream, self.group, entry_id))
                return

    def _leave_intake(self, entry_id: str) -> None:
        if entry_id in self._staged:
            self._staged.discard(entry_id)
            self._freed.set()

    async def _retry_redis(self, op: Callable[[], Awaitable[Any]]) -> None:
        """An ack or dead-letter must not be lost to a Redis blip; give up only on shutdown."""
        backoff = Backoff()
        while True:
            try:
                await op()
                return
            except REDIS_ERRORS as exc:
                if not is_redis_down(exc):
                    raise
                if self._stop.is_set():
                    return  # stays pending; another consumer will claim it
                await backoff.sleep(self._stop)

    async def _dead_and_ack(self, entry_id: str, raw: Any, reason: DeadLetterReason, message: str) -> None:
        fields = dead_letter_fields(raw, reason.value, message, entry_id=entry_id, group=self.group,
                                    consumer=self.consumer)
        async with batch(self.redis) as pipe:  # on a cluster two slots: a crash between gives a second dead letter
            pipe.xadd(Names.dead(self.stream), fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, entry_id)
            await pipe.execute()
        self.metrics.incr("dead_lettered")
