"""The ingest path's front (:class:`Extraction`), on the mesh's one batching pump (shared/runtime/batching.py)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from services.ltm.extraction.llm import LlmExtractor
from services.ltm.extraction.rules import RuleExtractor
from services.ltm.extraction.types import Extracted, Turn
from shared.runtime.batching import Batcher


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
