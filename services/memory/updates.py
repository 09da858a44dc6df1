"""Which stored messages become a MemoryUpdate, and how: one rule for the streams, store_message and imports.

A human or AI message with a user becomes one MemoryUpdate (``source`` "user"/"ai", meta ``session_id`` and
``message_id``). Not published: system messages, messages without a user, and the offline responder's replies
(``meta.model`` "offline" or "offline (...)"): they only repeat memories the user's own turns already gave, so
indexing them would store each memory again, worded as the assistant. They are still stored and kept in STM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio.client import Pipeline

from services.memory.store import StoredMessage
from shared.contracts import MemoryUpdate
from shared.contracts.messages import OFFLINE_MODEL, MemoryUpdateMeta
from shared.runtime.metrics import Metrics

Publish = Callable[[Pipeline, MemoryUpdate], None]
"""Queues the commands that emit a MemoryUpdate into the write's pipeline."""


def is_offline_reply(role: str, metadata: Mapping[str, Any]) -> bool:
    """An AI message written by chat_ai's offline responder: ``meta.model`` is OFFLINE_MODEL, or starts with it
    when a failed LLM call fell back to it (``"offline (llm error: ...)"``)."""
    model = metadata.get("model")
    return role == "ai" and isinstance(model, str) and model.startswith(OFFLINE_MODEL)


def publishable(m: StoredMessage) -> bool:
    """Whether the message becomes a MemoryUpdate (the rule above)."""
    return bool(m.user_id) and m.role in ("human", "ai") and not is_offline_reply(m.role, m.metadata)


def memory_update(m: StoredMessage, metrics: Metrics) -> MemoryUpdate | None:
    """The MemoryUpdate of a stored message, or None when it is not for long-term memory (offline replies counted)."""
    if not publishable(m):
        if m.user_id and is_offline_reply(m.role, m.metadata):
            metrics.incr("offline_replies_not_published")
        return None
    return MemoryUpdate(
        user_id=m.user_id, content=m.content, source="user" if m.role == "human" else "ai", timestamp=m.timestamp,
        meta=MemoryUpdateMeta(session_id=m.session_id, message_id=m.message_id),
    )
