"""Batching: concurrent single calls coalesced into batch calls; :class:`Extraction`, the ingest path's front."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

from services.ltm.extraction.llm import LlmExtractor
from services.ltm.extraction.rules import RuleExtractor
from services.ltm.extraction.types import Extracted, Turn
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
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump())
        return await fut

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


class Extraction:
    """The ingest path's front: ``await extract(turn)``; batched, rules or LLM."""

    def __init__(self, rules: RuleExtractor | None = None, llm: LlmExtractor | None = None,
                 max_batch: int = 32, executor: Executor | None = None) -> None:
        self.rules = rules or RuleExtractor()
        self.llm = llm
        self.executor = executor  # where the rules run (priority.background_executor; None: the default one)
        self._batcher: Batcher[Turn, list[Extracted]] = Batcher(self._run, max_batch)

    @property
    def method(self) -> str:
        return "llm" if self.llm is not None else "rules"

    async def _run(self, turns: list[Turn]) -> list[list[Extracted]]:
        if self.llm is not None:
            return await self.llm.extract_batch(turns)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.rules.extract_batch, turns)

    async def extract(self, turn: Turn) -> list[Extracted]:
        return await self._batcher.submit(turn)
