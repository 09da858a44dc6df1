"""Staying subscribed to one pub/sub channel through Redis restarts."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.asyncio.client import PubSub

from shared.contracts.codec import DecodeError, decode
from shared.runtime.backoff import Backoff
from shared.runtime.deadletter import dead_letter
from shared.runtime.errors import REDIS_ERRORS, is_redis_down
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.runner import pubsub_for

log = get_logger(__name__)

OnMessage = Callable[[bytes], Awaitable[None] | None]
T = TypeVar("T")


async def decoded(redis: aioredis.Redis, channel: str, adapter: TypeAdapter[T], raw: bytes, *,
                  max_content_bytes: int, metrics: Metrics, what: str) -> T | None:
    """A channel's message decoded, or None: a malformed one is counted (``<what>.rejected.<reason>``) and
    dead-lettered (a channel redelivers nothing)."""
    try:
        return decode(adapter, raw, max_content_bytes=max_content_bytes)
    except DecodeError as err:
        metrics.incr(f"{what}.rejected.{err.reason.value}")
        await dead_letter(redis, channel, raw, err.reason.value, err.message)
        return None


async def listen(client: aioredis.Redis, channel: str, on_message: OnMessage, stop: asyncio.Event, *,
                 metrics: Metrics, ready: asyncio.Event | None = None) -> None:
    """Call ``on_message(data)`` for each message on ``channel`` until ``stop`` is set.

    A lost connection is counted and logged, and the subscription is made again with back-off;
    ``ready`` is set while the subscription is confirmed and cleared while it is not, so a
    requester never sends a request whose reply it could miss.
    """
    backoff = Backoff()
    while not stop.is_set():
        pubsub: PubSub | None = None
        try:
            pubsub = await pubsub_for(client)
            await pubsub.subscribe(channel)
            while not stop.is_set():
                msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=0.5)
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    backoff.reset()
                    if ready is not None:
                        ready.set()
                elif msg["type"] == "message":
                    await _deliver(on_message, msg["data"], channel, metrics)
        except REDIS_ERRORS as exc:  # an outage, or a refusal (NOPERM on the channel): not ready until it is back
            if ready is not None:
                ready.clear()
            metrics.incr("pubsub.reconnects")
            if is_redis_down(exc):
                log.warning("pubsub.subscription_lost", channel=channel, error=str(exc))
            else:
                log.error("pubsub.subscription_failed", channel=channel, exc_info=exc)
            await backoff.sleep(stop)
        finally:
            try:
                if pubsub is not None:
                    await pubsub.aclose()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
    if ready is not None:
        ready.clear()


async def _deliver(on_message: OnMessage, data: bytes, channel: str, metrics: Metrics) -> None:
    """One message to the callback: its failure is that message's (counted, logged); the subscription goes on (a
    callback's error ending the listener would leave the process deaf to the channel until it restarts)."""
    try:
        result = on_message(data)
        if inspect.isawaitable(result):
            await result
    except Exception:  # any callback failure: counted and logged with its traceback, never silent
        metrics.incr("pubsub.handler_errors")
        log.exception("pubsub.handler_failed", channel=channel)
