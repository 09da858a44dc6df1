"""Embedding stored messages that have no vector yet: memory's background job and ``search_messages``' catch-up.

With MEMORY_CARRY_VECTORS the write path embeds what it publishes (services/memory/carry.py); what it does not
(offline replies, system messages, everything with ENABLE_LTM_PUBLISH=false or MEMORY_CARRY_VECTORS=false) is
embedded here: by the background job, in small passes that step aside for the stores and requests (``turn``), on a
copy of the model of its own (MEMORY_BACKGROUND_MODEL=own) so that a store never waits for the model behind one of
its passes; and by a ``search_messages`` for the user's pending messages first, so that nothing stored is missed.
Each pass claims its rows until their vectors are stored, so memory copies never embed the same messages; a message
the model refuses for its own sake is given up after MAX_EMBED_FAILURES passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection

from services.memory.salience import MessageSalience
from services.memory.store import MAX_EMBED_FAILURES, ConversationStore, Unembedded
from shared.runtime.embedding import Embedder, EmbeddingSettings, SyncEmbedder, dedicated_model
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.passes import embed_in_steps, steps, tokens
from shared.runtime.priority import background_executor

log = get_logger(__name__)

EMBED_BATCH = 128
EMBED_STEP_TOKENS = 256  # one background forward pass (shared/runtime/passes.py)


class Backfill:
    def __init__(self, store: ConversationStore, metrics: Metrics,
                 embedder: Callable[[], Awaitable[Embedder | None]] | None, salience: MessageSalience | None,
                 background_nice: int = 0) -> None:
        self.store, self.metrics, self.salience = store, metrics, salience
        self._embedder = embedder  # the write path's model (loaded on first need); None: MEMORY_EMBED_MESSAGES off
        self._embed_lock = asyncio.Lock()
        self._background_nice = background_nice  # BACKGROUND_NICE of the background embedding's passes
        self._background: Embedder | None = None
        self.background_model: SyncEmbedder | None = None  # MEMORY_BACKGROUND_MODEL=own: the background's copy
        self._catch_up: Embedder | None = None  # that copy at normal priority (search_messages' catch-up)

    async def run(self, user_id: str | None = None, turn: Callable[[], Awaitable[None]] | None = None) -> int:
        """Embed stored messages that have no embedding yet (one user's, or anyone's); returns how many.

        With ``turn`` (the background job) it works in steps of one small forward pass (EMBED_STEP_TOKENS), run in
        threads of background priority (BACKGROUND_NICE: ltm's searches on the same cores go first), and awaits
        ``turn`` before each, outside the lock: storing messages and serving requests go first, and a
        ``search_messages`` never waits behind more than one pass."""
        if self._embedder is None:
            return 0
        done = 0
        while True:
            if turn is not None:
                await turn()
            # one pass at a time per process (the model is the bottleneck anyway), its rows claimed until it is
            # stored: other memory copies' passes take the next ones instead of embedding these again
            async with self._embed_lock, self.store.pool.connection() as conn, conn.transaction():
                # a background step embeds one pass: read only what fits one (a message is at least ~8 tokens)
                limit = EMBED_BATCH if turn is None else EMBED_STEP_TOKENS // 8
                pending = await self.store.unembedded(user_id=user_id, limit=limit, conn=conn)
                if not pending:
                    return done
                embedder = await self._embedder()  # loaded only once there is work for it
                if embedder is None:
                    return done
                if turn is not None:  # this step: the oldest messages that fit one pass, at background priority
                    pending = next(iter(steps(pending, lambda m: tokens(m.content), EMBED_STEP_TOKENS)))
                    embedder = self.background_embedder(embedder)
                elif self.background_model is not None:  # a search's catch-up: beside the stores, not before them
                    embedder = self._catch_up_embedder()
                scored = self.salience is not None and getattr(embedder.model, "has_tokens", False)
                token_vectors: dict[str, Any] = {}
                failed: dict[str, Exception] = {}  # texts the model refuses for their own sake (not an outage)
                vectors = await embed_in_steps(embedder, [m.content for m in pending], EMBED_STEP_TOKENS,
                                               with_tokens={m.content for m in pending} if scored else None,
                                               tokens_out=token_vectors, failed=failed)
                if failed:
                    await self._count_failures([m for m in pending if m.content in failed], failed, conn)
                    pending = [m for m in pending if m.content in vectors]
                    if not pending:
                        continue
                scores: list[float | None] = [None] * len(pending)
                if scored and self.salience is not None:
                    scores = list(await asyncio.get_running_loop().run_in_executor(  # numpy, off the event loop
                        background_executor(self._background_nice), self.salience.score, pending, vectors,
                        token_vectors))
                await self.store.set_embeddings([(m.user_id, m.message_id, vectors[m.content], sal)
                                                 for m, sal in zip(pending, scores, strict=True)], conn)
                done += len(pending)
                self.metrics.incr("embedded", len(pending))

    async def _count_failures(self, refused: list[Unembedded], errors: dict[str, Exception],
                              conn: AsyncConnection) -> None:
        """Each refused message's failure counted on its row: after MAX_EMBED_FAILURES the background job no longer
        picks it up (never retried forever, and the messages stored after it are not held up)."""
        for m in refused:
            log.warning("memory.embed_failed", message_id=m.message_id, error=type(errors[m.content]).__name__)
        self.metrics.incr("embed_failed", len(refused))
        for m in await self.store.embed_failed(refused, conn):
            self.metrics.incr("embed_given_up")
            log.error("memory.embed_given_up", message_id=m.message_id, failures=MAX_EMBED_FAILURES)

    async def load_background_model(self, settings: EmbeddingSettings) -> None:
        """A copy of the model for the background job (MEMORY_BACKGROUND_MODEL=own), with a lock of its own: a
        message stored on the write path then never waits for the model behind a background pass (a long offline
        reply's pass takes ~50 ms here). Loaded at start (in a thread), like the write path's model."""
        self.background_model = await asyncio.to_thread(dedicated_model, "background", settings)

    def _catch_up_embedder(self) -> Embedder:
        """The background copy of the model at normal priority: ``search_messages`` embeds the user's pending messages
        with it (a user waits), and the write path's model stays free for the stores."""
        assert self.background_model is not None
        if self._catch_up is None or self._catch_up.model is not self.background_model:
            self._catch_up = Embedder(self.background_model)
        return self._catch_up

    def background_embedder(self, embedder: Embedder) -> Embedder:
        """The background job's front: its own copy of the model when loaded (:meth:`load_background_model`), else
        the same model; its passes in the background threads (BACKGROUND_NICE) when they have threads of their own.
        The embedder itself when neither applies."""
        executor = background_executor(self._background_nice)
        model = self.background_model or embedder.model
        if executor is None and model is embedder.model:
            return embedder
        if self._background is None or self._background.model is not model:
            self._background = Embedder(model, executor=executor)
        return self._background
