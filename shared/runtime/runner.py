"""Process entry: run ``main(stop)`` until SIGTERM/SIGINT sets ``stop``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff


def redis_client(url: str) -> aioredis.Redis:
    """Bytes in, bytes out (bad UTF-8 must reach the codec, not crash the reader).

    A command that meets a dropped connection (Redis restarted) is retried on a fresh
    one a few times before the error reaches the caller's own back-off loop; work is
    idempotent by message_id, so a retried write is harmless.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=4)
    return aioredis.from_url(url, decode_responses=False, socket_timeout=10, socket_connect_timeout=5,
                             health_check_interval=30, retry=retry,
                             retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    async def _amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(_amain())


async def serve_until(stop: asyncio.Event, run_coro: Awaitable[None], on_stop: Callable[[], None]) -> None:
    """Run a service until it ends or ``stop`` is set; then ask it to stop and wait for its drain."""
    task = asyncio.ensure_future(run_coro)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    on_stop()
    waiter.cancel()
    await task
