"""The ingest stages' batching pump: concurrent calls coalesced, and one item's own failure kept to that item."""

from __future__ import annotations

import asyncio

import pytest

from shared.runtime.batching import Batcher
from shared.runtime.errors import TransientError


async def test_one_bad_item_fails_alone_and_its_batch_neighbours_succeed() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if 13 in items:
            raise ValueError("year is out of range")  # the item's own fault: the same every time
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(run, max_batch=8)
    results = await asyncio.gather(*(batcher.submit(i) for i in (11, 12, 13, 14)), return_exceptions=True)
    assert results[:2] == [22, 24] and results[3] == 28
    assert isinstance(results[2], ValueError)
    assert calls[0] == [11, 12, 13, 14] and sorted(calls[1:]) == [[11], [12], [13], [14]]


async def test_a_passing_failure_is_every_items_at_once() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        raise TransientError("store down")

    batcher: Batcher[int, int] = Batcher(run, max_batch=8)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, TransientError) for r in results)
    assert calls == [[0, 1, 2]]  # not run again item by item: the store is down for all of them


async def test_batches_coalesce_what_arrives_while_one_runs() -> None:
    release = asyncio.Event()
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await release.wait()
        return items

    batcher: Batcher[int, int] = Batcher(run, max_batch=2)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert calls == [[0, 1], [2, 3], [4]]


async def test_a_single_item_batch_fails_once() -> None:
    calls = 0

    async def run(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        raise ValueError("bad")

    batcher: Batcher[int, int] = Batcher(run)
    with pytest.raises(ValueError):
        await batcher.submit(1)
    assert calls == 1


async def test_a_text_the_model_refuses_fails_only_its_own_caller() -> None:
    import numpy as np

    from shared.runtime.embedding import Embedder

    class Model:  # a remote model that answers 400 to any pass holding the one text it refuses
        passes: list[list[str]] = []

        def encode(self, texts: list[str]) -> np.ndarray:
            self.passes.append(list(texts))
            if "bad" in texts:
                raise ValueError("400: input refused")
            return np.ones((len(texts), 4), dtype=np.float32)

    model = Model()
    embedder = Embedder(model, max_batch=8)  # type: ignore[arg-type]
    results = await asyncio.gather(*(embedder.embed(t) for t in ("a", "bad", "c")), return_exceptions=True)
    assert isinstance(results[1], ValueError)
    assert all(isinstance(r, np.ndarray) for r in (results[0], results[2]))
    assert model.passes[0] == ["a", "bad", "c"]  # one pass first, then a text at a time
