"""The ingest path's mechanics: vector caches; embedding in small passes is shared/runtime/passes.py.

Ingest works in steps (a spaCy call over a few turns, one embedding forward pass over a few hundred tokens).

Searches do not wait for ingest's passes: with LTM_INGEST_MODEL=own (the default) ingest embeds with a model of
its own (``dedicated_model("ingest")`` of shared/runtime/embedding.py, or the float model when queries have the
int8 copy), whose passes run beside a search's embedding instead of before it (measured on LongMemEval turns,
search p95 while ingesting against quiet: x1.3-1.6 with its own model, x1.5-2.9 with one model shared). Letting
in-flight requests go first between ingest steps (a gate) was tried and did not help once ingest has its own model.

That is all within one process. By default ingest runs in a child process of its own at a lower OS priority
(LTM_INGEST_PROCESSES, services/ltm/service.py), where a search waits for neither the GIL nor the event loop:
search p95 while ingesting 1.4-1.6x a quiet mesh against 2.5-3.2x in one process (docs/operations.md).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


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

    def clear(self) -> None:
        self._data.clear()

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
