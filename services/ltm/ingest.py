"""The ingest path's mechanics: requests ahead of ingest, embedding in small steps, vector caches.

Ingest works in steps (a spaCy call over a few turns, one embedding forward pass over a few hundred tokens).
Before each step it lets the requests that are in flight go first (:class:`RequestGate`), so that a search never
queues behind a backlog of ingest work in the same process; a step waits at most ``max_wait_s``, so ingest is
never starved by a steady stream of requests.

Embedding passes are kept small on purpose: on this kind of CPU (2 cores, no AVX-512, measured with the ONNX
model) one forward pass over 64 texts costs more per text than passes over 4-8 texts (about 0.3 ms per token at
8 short texts against 0.45 at 64), and a small pass also lets a search's embedding in between.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from shared.runtime.embedding import Embedder

T = TypeVar("T")
MAX_TOKENS = 256  # all-MiniLM-L6-v2 sees no more of a text (sentence-transformers' max_seq_length)


def tokens(text: str) -> int:
    """About how many WordPiece tokens the model reads of ``text`` (4 characters a token, at most 256)."""
    return min(MAX_TOKENS, len(text) // 4 + 2)


def steps(items: Sequence[T], size: Callable[[T], int], budget: int) -> Iterable[list[T]]:
    """``items`` in consecutive runs of at most ``budget`` (by ``size``), each holding at least one item."""
    run: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if run and used + n > budget:
            yield run
            run, used = [], 0
        run.append(item)
        used += n
    if run:
        yield run


class RequestGate:
    """Requests first: ``async with gate.request()`` around a request's work; ingest ``await gate.turn()``
    before each step, which returns once no request is in flight (or after ``max_wait_s``)."""

    def __init__(self, max_wait_s: float = 0.2) -> None:
        self.max_wait_s = max_wait_s
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.waited = 0  # steps that waited for requests (for tests and metrics)

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def turn(self) -> None:
        if self.active == 0:
            return
        self.waited += 1
        try:
            await asyncio.wait_for(self._idle.wait(), self.max_wait_s)
        except TimeoutError:
            pass


class VectorCache:
    """A bounded LRU of vectors by key (entity names, the short texts of extracted memories)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        vec = self._data.get(key)
        if vec is not None:
            self._data.move_to_end(key)
        return vec

    def put(self, key: str, vec: np.ndarray) -> None:
        self._data[key] = vec
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


@dataclass(slots=True)
class Lookup:
    """What a cache held of some keys (``found``: key -> vector) and what it did not (``missing``: key -> text)."""

    found: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def fill(self, cache: VectorCache, vectors: dict[str, np.ndarray]) -> None:
        """The missing keys' vectors (by their text) into ``found`` and the cache."""
        for key, text in self.missing.items():
            self.found[key] = vectors[text]
            cache.put(key, vectors[text])


def from_cache(cache: VectorCache, wanted: dict[str, str]) -> Lookup:
    """Split ``wanted`` (key -> text to embed) into what ``cache`` holds and what it does not."""
    out = Lookup()
    for key, text in wanted.items():
        vec = cache.get(key)
        if vec is None:
            out.missing[key] = text
        else:
            out.found[key] = vec
    return out


async def embed_in_steps(embedder: Embedder, texts: Sequence[str], budget_tokens: int,
                         gate: RequestGate | None = None) -> dict[str, np.ndarray]:
    """The vector of every distinct text, in forward passes of at most ``budget_tokens`` padded tokens (texts
    sorted by length, so that a pass pads little), with the gate's turn before each pass."""
    distinct = sorted(set(texts), key=lambda t: (tokens(t), t))
    out: dict[str, np.ndarray] = {}
    run: list[str] = []
    for text in distinct:
        # sorted ascending: the padded size of a pass is its count times its last (longest) text
        if run and (len(run) + 1) * tokens(text) > budget_tokens:
            await _pass(embedder, run, out, gate)
            run = []
        run.append(text)
    if run:
        await _pass(embedder, run, out, gate)
    return out


async def _pass(embedder: Embedder, run: list[str], out: dict[str, np.ndarray], gate: RequestGate | None) -> None:
    if gate is not None:
        await gate.turn()
    for text, vec in zip(run, await embedder.embed_many(run), strict=True):
        out[text] = vec
