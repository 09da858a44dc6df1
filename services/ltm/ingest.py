"""The ingest path's mechanics: embedding in small passes, ingest's own model, vector caches.

Ingest works in steps (a spaCy call over a few turns, one embedding forward pass over a few hundred tokens).
Embedding passes are kept small on purpose: on this kind of CPU (2 cores, no AVX-512, measured with the ONNX
model) one forward pass over 64 texts costs more per text than passes over 4-8 texts (about 0.22 ms per token at
4-8 short texts against 0.4 at 64; for long turns 1-4 texts a pass), and a small pass waits little for padding.

Searches do not wait for ingest's passes: with LTM_INGEST_MODEL=own (the default) ingest embeds with a second
copy of the model (:class:`IngestModel`), whose passes run beside a search's embedding instead of before it
(measured on LongMemEval turns, search p95 while ingesting against quiet: x1.3-1.6 with its own model, x1.5-2.9
with one model shared). Letting in-flight requests go first between ingest steps (a gate) was tried and did not
help once ingest has its own model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from shared.runtime.embedding import Embedder, SyncEmbedder

T = TypeVar("T")
SALIENCE_TOKENS = 64  # token vectors the salience model reads (services/ltm/salience/infer.py MAX_TOKENS)
MAX_TOKENS = 256  # all-MiniLM-L6-v2 sees no more of a text (sentence-transformers' max_seq_length)


class IngestModel(SyncEmbedder):
    """A second copy of the model for ingest (LTM_INGEST_MODEL=own): its passes hold a lock of their own, so a
    search's embedding runs beside an ingest pass instead of after it (SyncEmbedder's lock is one per class)."""

    _lock = threading.Lock()


_ingest_model: IngestModel | None = None
_ingest_model_lock = threading.Lock()


def ingest_model() -> IngestModel:
    """The process's one ingest model (loaded on first use, EMBEDDING_* settings)."""
    global _ingest_model
    with _ingest_model_lock:
        if _ingest_model is None:
            _ingest_model = IngestModel()
    return _ingest_model


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


async def embed_in_steps(embedder: Embedder, texts: Sequence[str], budget_tokens: int,
                         turn: Callable[[], Awaitable[None]] | None = None, *, with_tokens: set[str] | None = None,
                         tokens_out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The vector of every distinct text, in forward passes of at most ``budget_tokens`` padded tokens (texts
    sorted by length, so that a pass pads little); ``turn`` is awaited before each pass (requests first). The
    texts in ``with_tokens`` also get their token vectors in ``tokens_out`` (the same pass: the salience model's)."""
    want = with_tokens or set()
    sink: dict[str, np.ndarray] = tokens_out if tokens_out is not None else {}
    distinct = sorted(set(texts), key=lambda t: (tokens(t), t))
    out: dict[str, np.ndarray] = {}
    run: list[str] = []
    for text in distinct:
        # sorted ascending: the padded size of a pass is its count times its last (longest) text
        if run and (len(run) + 1) * tokens(text) > budget_tokens:
            if turn is not None:
                await turn()
            await _pass(embedder, run, out, want, sink)
            run = []
        run.append(text)
    if run:
        if turn is not None:
            await turn()
        await _pass(embedder, run, out, want, sink)
    return out


async def _pass(embedder: Embedder, run: list[str], out: dict[str, np.ndarray], want: set[str],
                sink: dict[str, np.ndarray]) -> None:
    if want and not want.isdisjoint(run):
        vecs, toks = await embedder.embed_many_with_tokens(run, SALIENCE_TOKENS)
        sink.update((text, tok) for text, tok in zip(run, toks, strict=True) if text in want)
    else:
        vecs = await embedder.embed_many(run)
    for text, vec in zip(run, vecs, strict=True):
        out[text] = vec
