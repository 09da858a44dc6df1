"""The salience of stored messages, for the STM summary (``STM_SALIENCE_WEIGHT`` > 0; off by default).

The score is the one ltm stores on its memories: the salience model of services/ltm/salience (numpy, 0.04 ms a
turn), over the turn's all-MiniLM-L6-v2 token vectors, its sentence vector and the session's state so far. memory
computes it itself, in the same forward pass that embeds the message for ``search_messages`` (memory cannot read
ltm's scores: the services share only the bus), and stores it in ``conversation_messages.salience``; the summary
reads it when it folds the turn (services/memory/summary.py :func:`salience_factor`). Each process keeps the state
of ``sessions`` sessions (LRU; a session it has not seen starts from zero, as in ltm). What it is worth, measured on
the dev splits: ``python -m mesh eval stm`` (docs/memory.md, "Salience").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from services.ltm.salience.infer import SalienceModel, SessionStates, TextTurn, session_key
from services.memory.store import NOBODY, StoredMessage, Unembedded

if TYPE_CHECKING:
    from services.memory.carry import Embedded


class MessageSalience:
    def __init__(self, sessions: int = 10_000, model: SalienceModel | None = None) -> None:
        self.model = model or SalienceModel.load()
        self.states = SessionStates(sessions)

    def score(self, pending: Sequence[Unembedded], vectors: dict[str, np.ndarray],
              token_vectors: dict[str, np.ndarray]) -> list[float]:
        """The messages' salience, oldest first (each session's turns in order)."""
        turns = [TextTurn(session_key(m.user_id, m.session_id), m.content, m.ai) for m in pending]
        return self.model.score_texts(turns, vectors, token_vectors, self.states)

    def score_embedded(self, messages: Sequence[StoredMessage], embedded: Mapping[str, Embedded]) -> dict[str, float]:
        """The scores of messages embedded on the write path (services/memory/carry.py), by message_id, in order: what
        the background pass would have stored (their vectors are stored already, so that pass will not see them);
        only messages with token vectors."""
        tokens = {m.content: toks for m in messages
                  if m.message_id in embedded and (toks := embedded[m.message_id].tokens) is not None}
        scored = [m for m in messages if m.message_id in embedded and m.content in tokens]
        if not scored:
            return {}
        scores = self.score(
            [Unembedded(m.user_id or NOBODY, m.message_id, m.content, m.session_id, m.role == "ai") for m in scored],
            {m.content: embedded[m.message_id].vector for m in scored}, tokens)
        return {m.message_id: s for m, s in zip(scored, scores, strict=True)}

    def forget(self, user_id: str) -> None:
        """After a user's deletion: no state derived from their turns stays in the process (other users' sessions
        keep theirs)."""
        self.states.drop_users([user_id])
