"""Requests first (shared/runtime/priority.py): background work waits while a request is served, never longer
than its bound, and not at all when nothing is served."""

from __future__ import annotations

import asyncio
import time

from shared.runtime.metrics import Metrics
from shared.runtime.priority import Foreground


async def test_background_waits_for_requests_in_flight_but_never_longer_than_its_bound() -> None:
    fg = Foreground(0.3, Metrics())
    await fg.turn()  # nothing served: at once
    assert fg.metrics is not None and fg.metrics.get("background.yielded") == 0

    async def request(seconds: float) -> None:
        with fg.serving():
            await asyncio.sleep(seconds)

    short = asyncio.create_task(request(0.1))
    await asyncio.sleep(0)
    started = time.perf_counter()
    await fg.turn()  # waits for the short request to finish
    assert time.perf_counter() - started >= 0.05 and short.done()  # order, not speed

    long = asyncio.create_task(request(2.0))
    await asyncio.sleep(0)
    started = time.perf_counter()
    await fg.turn()  # a long request: background gets its turn after the bound anyway
    assert time.perf_counter() - started >= 0.29 and not long.done()
    assert fg.metrics is not None and fg.metrics.get("background.yield_expired") == 1
    long.cancel()
    await asyncio.gather(long, return_exceptions=True)
    assert not fg.busy  # a cancelled request leaves the count right


async def test_off_when_the_bound_is_zero() -> None:
    fg = Foreground(0.0, Metrics())
    with fg.serving():
        await fg.turn()
    assert fg.metrics is not None and fg.metrics.get("background.yielded") == 0
