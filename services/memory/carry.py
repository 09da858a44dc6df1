"""One embedding per message (``MEMORY_CARRY_VECTORS``): memory embeds a message as it stores it and sends the vector
on its MemoryUpdate, with the turn's salience, so that ltm's ingest does not embed the same text again.

memory embedded every stored message anyway (for ``search_messages``), in the background; ltm then embedded each
published one again at ingest, its costliest step. Here the pass of a message that will be published runs on the
write path instead: one forward pass of the float model with the turn's token vectors (shared/runtime/embedding.py),
whose sentence vector is stored in ``conversation_messages.embedding`` by the same INSERT and carried on the update
(shared/runtime/carried.py). A message that is not published (an offline reply) is left to the background job, as
before (services/memory/api.py ``MemoryApi._embeds_now``).

The salience carried is ltm's: the model of services/ltm/salience over the session's turns as ltm would see them,
the published updates in the order they are published (new messages only: a redelivered message is published
again but scored once, and then carries no vector, so ltm embeds and scores it itself). Its per-session state is
kept here, apart from the STM summary's (services/memory/salience.py, which also reads unpublished turns). A
failed pass loses nothing: the message is stored without a vector (the background job embeds it later) and its
update goes out without one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.ltm.salience.infer import SalienceModel, SessionStates, TextTurn, session_key
from services.memory.store import StoredMessage
from shared.contracts.messages import CarriedEmbedding
from shared.runtime.carried import carry, model_id
from shared.runtime.embedding import Embedder
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.passes import MAX_TOKENS, embed_in_steps

log = get_logger(__name__)


@dataclass(slots=True)
class Embedded:
    """A message's vector, and its token vectors when the model gives them (the salience model reads them)."""

    vector: np.ndarray
    tokens: np.ndarray | None
    model: str


class Carrier:
    def __init__(self, embedder: Callable[[], Awaitable[Embedder]], metrics: Metrics, sessions: int = 10_000,
                 salience: SalienceModel | None = None) -> None:
        self._embedder = embedder
        self.metrics = metrics
        self.salience = salience or SalienceModel.load()
        self.states = SessionStates(sessions)  # ltm's view of each session: published new turns, in order

    async def embed(self, m: StoredMessage) -> Embedded | None:
        """The message's vectors, from one forward pass; None when the pass failed (counted, logged)."""
        return (await self.embed_many([m], MAX_TOKENS)).get(m.message_id)

    async def embed_many(self, messages: Sequence[StoredMessage], budget_tokens: int) -> dict[str, Embedded]:
        """Each message's vectors (by message_id), in passes of ``budget_tokens`` (an import); {} when a pass failed
        (counted, logged: the messages are stored all the same and embedded by the background job)."""
        try:
            embedder = await self._embedder()
            model, tokens = model_id(embedder.model), embedder.model.has_tokens
            token_vectors: dict[str, np.ndarray] = {}
            vectors = await embed_in_steps(embedder, [m.content for m in messages], budget_tokens,
                                           with_tokens={m.content for m in messages} if tokens else None,
                                           tokens_out=token_vectors)
        except Exception as exc:  # noqa: BLE001 - the messages are stored all the same; the background embeds them
            self.metrics.incr("carry.embed_failed", len(messages))
            log.warning("memory.carry_embed_failed", error=type(exc).__name__, messages=len(messages))
            return {}
        return {m.message_id: Embedded(vectors[m.content], token_vectors.get(m.content), model) for m in messages}

    def carried(self, m: StoredMessage, e: Embedded) -> CarriedEmbedding:
        """The update's ``embedding``; advances the session's salience state (call once per new published turn)."""
        score = None
        if e.tokens is not None:
            turn = TextTurn(session_key(m.user_id, m.session_id), m.content, m.role == "ai")
            score = self.salience.score_texts([turn], {m.content: e.vector}, {m.content: e.tokens}, self.states)[0]
        self.metrics.incr("carry.vectors")
        return carry(e.vector, e.model, score)

    def forget(self, user_id: str) -> None:
        """After a user's deletion: no state derived from their turns stays in the process (other users' sessions
        keep theirs)."""
        self.states.drop_users([user_id])
