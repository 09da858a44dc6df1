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
