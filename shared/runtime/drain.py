"""Shutdown with a time limit: in-flight work finishes within the grace period or is cancelled.

A cancelled stream handler leaves its entry unacknowledged, so it stays pending in the group and another
consumer (or this one after a restart) claims it after ``CLAIM_IDLE_MS``; a cancelled request gets an
``unavailable`` reply (the requester may retry; the request may have been partly applied, and every
request type is idempotent or reports what it did). Nothing is dropped unseen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics

log = get_logger(__name__)


async def drain_within(tasks: set[asyncio.Task[Any]], grace_s: float, *, what: str, metrics: Metrics) -> int:
    """Wait up to ``grace_s`` for ``tasks``; cancel those still running and wait for them to unwind.
    Returns how many were cancelled (counted as ``drain_cancelled``)."""
    if not tasks:
        return 0
    _done, left = await asyncio.wait(set(tasks), timeout=max(0.0, grace_s))
    if not left:
        return 0
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    metrics.incr("drain_cancelled", len(left))
    log.warning("shutdown.drain_timeout", what=what, cancelled=len(left), grace_s=grace_s)
    return len(left)


async def run_service(core: list[asyncio.Task[Any]], background: list[asyncio.Task[Any]], stop: asyncio.Event,
                      grace_s: float, *, what: str, metrics: Metrics, stop_core: Callable[[], None]) -> None:
    """Run a service's tasks: ``core`` (consumers, request servers: each drains itself within the grace once
    stopped) until they end, then ``background`` (metrics flush, maintenance, cleanup) gets ``grace_s`` to
    notice ``stop`` and finish a pass it is in, and is cancelled after that. A core task that fails stops the
    others (``stop_core``: the service's stop) and its exception is raised once they have drained; a background
    task's is logged (it never decides the service's fate)."""
    try:
        try:
            await asyncio.wait(core, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in core:
                task.cancel()
            await asyncio.gather(*core, return_exceptions=True)
            raise
        failed = [t for t in core if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            log.error("shutdown.core_failed", what=what, task=failed[0].get_name(), exc_info=failed[0].exception())
            stop_core()
            await asyncio.gather(*core, return_exceptions=True)  # the others drain, each within its grace
            raise failed[0].exception()  # type: ignore[misc]
        await asyncio.gather(*core)  # all ended: a cancelled one raises here
    finally:
        stop.set()
        await drain_within(set(background), grace_s, what=f"{what} background", metrics=metrics)
        for task in background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("shutdown.background_failed", what=what, task=task.get_name(), exc_info=task.exception())
