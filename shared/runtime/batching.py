"""The mesh's one batching pump: concurrent single calls coalesced into batch calls (ltm's ingest stages, the
embedding model's passes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from shared.runtime.errors import is_transient

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Coalesce concurrent single calls into batch calls: what arrives while a batch runs goes in the next."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 32) -> None:
        self.run, self.max_batch = run, max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: list[T]) -> list[R]:
        """Several items at once, in one batch where they fit (each still fails on its own)."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futs, strict=True))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump())
        return list(await asyncio.gather(*futs))

    async def _pump(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            await self._settle(batch)

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Run a batch and hand each waiter its result. A batch that fails for a reason that will not pass (one
        item's own fault: a value no stage can take) is run again an item at a time, so only that item fails: its
        neighbours in the batch must not share its fate (nor, redelivered together, its dead letter). A passing
        failure (a store down) is every item's and is handed to all at once."""
        try:
            results = await self.run([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the waiters, each of which raises it
            if len(batch) > 1 and not is_transient(exc):
                for one in batch:
                    await self._settle([one])
                return
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)
