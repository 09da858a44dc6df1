"""Prompt assembly: system, long-term memories, STM summary, recent turns, the input."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.contracts import Memory
from shared.runtime.stm import Stm


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d") if ts else "earlier"


def build_messages(system: str, memories: list[Memory], stm: Stm, user_text: str,
                   current_message_id: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    if memories:
        lines = [f"- ({m.type}, {_when(m.source.timestamp)}) {m.content}" for m in memories]
        messages.append({"role": "system", "content": "What you remember about this user:\n" + "\n".join(lines)})
    if stm.summary:
        messages.append({"role": "system", "content": "Summary of the conversation so far:\n" + stm.summary})
    for turn in stm.turns:
        if turn.message_id == current_message_id:
            continue  # the memory service may already have stored this very input
        messages.append({"role": "user" if turn.role == "user" else "assistant", "content": turn.content})
    messages.append({"role": "user", "content": user_text})
    return messages
