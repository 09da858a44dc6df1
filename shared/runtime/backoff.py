"""Exponential back-off with jitter, interruptible by a stop event."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return delay * (0.5 + random.random() / 2)

    async def sleep(self, stop: asyncio.Event | None = None) -> None:
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
