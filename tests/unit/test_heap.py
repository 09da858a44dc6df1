"""shared/runtime/heap.py: start-up objects frozen out of collections; collections timed only while asked."""

from __future__ import annotations

import gc

from shared.runtime import heap
from shared.runtime.prom import REGISTRY


def test_freeze_startup_moves_the_heap_out_of_collections() -> None:
    try:
        kept = [[i] for i in range(50_000)]  # long-lived containers, as a model's would be
        assert heap.freeze_startup() >= len(kept)
        assert REGISTRY.get_sample_value("python_gc_collections_total", {"generation": "2"}) >= 1
    finally:
        gc.unfreeze()


def test_pauses_are_timed_only_inside_the_block() -> None:
    callbacks = list(gc.callbacks)
    with heap.timed_pauses() as longest:
        assert len(gc.callbacks) == len(callbacks) + 1
        gc.collect()
    assert longest[2] > 0.0
    assert gc.callbacks == callbacks  # nothing left behind to run at the recursion limit later
