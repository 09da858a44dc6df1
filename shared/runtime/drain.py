"""Shutdown with a time limit: in-flight work finishes within the grace period or is cancelled.

A cancelled stream handler leaves its entry unacknowledged, so it stays pending in the group and another
consumer (or this one after a restart) claims it after ``CLAIM_IDLE_MS``; a cancelled request gets an
``unavailable`` reply (the requester may retry; the request may have been partly applied, and every
request type is idempotent or reports what it did). Nothing is dropped unseen.
"""

from __future__ import annotations

import asyncio
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
                      grace_s: float, *, what: str, metrics: Metrics) -> None:
    """Run a service's tasks: ``core`` (consumers, request servers: each drains itself within the grace once
    stopped) until they end, then ``background`` (metrics flush, maintenance, cleanup) gets ``grace_s`` to
    notice ``stop`` and finish a pass it is in, and is cancelled after that. A core task's exception is raised
    once the rest are stopped; a background task's is logged (it never decides the service's fate)."""
    try:
        await asyncio.gather(*core)
    finally:
        stop.set()
        await drain_within(set(background), grace_s, what=f"{what} background", metrics=metrics)
        for task in background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("shutdown.background_failed", what=what, task=task.get_name(), exc_info=task.exception())
