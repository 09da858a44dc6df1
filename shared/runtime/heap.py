"""The heap after start-up, and the garbage collector's pauses.

A full collection (generation 2) walks every object the collector tracks, and the event loop stands still meanwhile,
with every request in flight. After start-up that is mostly what start-up built: spaCy's pipeline and the ONNX
model are ~260k objects, a full collection over them 0.14 s on the 2-core machine (ltm's search index holds
nothing per memory that the collector tracks: services/ltm/search_index.py). Those objects live as long as the
process, so :func:`freeze_startup` (``gc.freeze``, once a service has loaded what it needs and before it says it is
ready) takes them out of every later collection. ``python_gc_collections_total{generation}`` (prometheus_client's
collector, from ``gc.get_stats``) counts the collections.

:func:`timed_pauses` times each collection while it is open, for tests and benches only: a ``gc.callbacks`` entry is
a Python call at whatever depth the collection starts, and at the recursion limit (a deeply nested hostile message
being parsed) that call itself raises, an "unraisable" exception; so no service keeps one installed.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.gc_collector import GCCollector

from shared.runtime.prom import REGISTRY

GCCollector(registry=REGISTRY)


def freeze_startup() -> int:
    """Collect once, then move every object alive now out of the collector's sight; how many were moved."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def timed_pauses() -> Iterator[dict[int, float]]:
    """While open, the longest pause of each generation so far (seconds), in the dict it yields."""
    longest = {0: 0.0, 1: 0.0, 2: 0.0}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            generation = int(info.get("generation", 2))
            longest[generation] = max(longest.get(generation, 0.0), time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    try:
        yield longest
    finally:
        gc.callbacks.remove(on_gc)
