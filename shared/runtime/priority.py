"""Requests first: background work of a process (ltm's ingest) steps aside while requests are in flight.

A search waits on the same CPU as ingest's embedding passes and spaCy steps; on a busy mesh that wait is what
makes a chat turn miss its ``LTM_TIMEOUT_MS``. The request server marks each request it serves
(:meth:`Foreground.serving`); background work calls :meth:`Foreground.turn` between its small steps (one
embedding pass, one extraction step, one write), which returns at once when no request is in flight and otherwise
waits until none is, at most ``max_wait_s`` (so ingest never starves: it still gets a step in every
``max_wait_s``). ``max_wait_s`` = 0 turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from shared.runtime.metrics import Metrics


class Foreground:
    def __init__(self, max_wait_s: float, metrics: Metrics | None = None) -> None:
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._serving = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def serving(self) -> Iterator[None]:
        self._serving += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._serving -= 1
            if self._serving == 0:
                self._idle.set()

    @property
    def busy(self) -> bool:
        return self._serving > 0

    async def turn(self) -> None:
        """Background work's turn: now if nothing is served, else when nothing is (at most ``max_wait_s``)."""
        if self._serving == 0 or self.max_wait_s <= 0:
            return
        if self.metrics is not None:
            self.metrics.incr("background.yielded")
        try:
            await asyncio.wait_for(self._idle.wait(), self.max_wait_s)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.incr("background.yield_expired")


__all__ = ["Foreground"]
