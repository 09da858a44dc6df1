"""A service's task runner: a failing core task stops and drains the others before its error ends the service."""

from __future__ import annotations

import asyncio

import pytest

from shared.runtime.drain import run_service
from shared.runtime.metrics import Metrics


async def test_a_failing_core_task_stops_the_others_and_they_drain_before_the_error_is_raised() -> None:
    stopping = asyncio.Event()
    stop = asyncio.Event()
    drained: list[str] = []

    async def consumer() -> None:  # runs until told, then finishes what it holds
        await stopping.wait()
        await asyncio.sleep(0)
        drained.append("consumer")

    async def requests() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def maintenance() -> None:
        await stop.wait()
        drained.append("maintenance")

    core = [asyncio.create_task(consumer()), asyncio.create_task(requests())]
    background = [asyncio.create_task(maintenance())]
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(run_service(core, background, stop, 5.0, what="t", metrics=Metrics(),
                                           stop_core=stopping.set), 5)
    assert drained == ["consumer", "maintenance"]  # the consumer drained, then the background noticed the stop
    assert all(t.done() for t in core + background)


async def test_core_tasks_that_end_cleanly_end_the_service_quietly() -> None:
    stop = asyncio.Event()

    async def done() -> None:
        return None

    await run_service([asyncio.create_task(done())], [], stop, 1.0, what="t", metrics=Metrics(),
                      stop_core=lambda: None)
    assert stop.is_set()
