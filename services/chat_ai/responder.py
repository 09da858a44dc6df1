"""Who writes the reply: the configured LLM, or the offline responder, which says what it is."""

from __future__ import annotations

from dataclasses import dataclass

from shared.contracts import Memory
from shared.runtime.llm import ChatModel
from shared.runtime.stm import Stm

OFFLINE_MODEL = "offline"
OFFLINE_PREFIX = "[offline responder: no language model is configured; I can only repeat what I remember]"


@dataclass(slots=True)
class Reply:
    text: str
    model: str


def pick_memories(memories: list[Memory], session_id: str, max_memories: int = 3, band: float = 0.75) -> list[Memory]:
    """What the offline responder quotes: the user's own words from other sessions, close to the best match.

    The current session is already in the STM, and the assistant's earlier replies are not facts
    about the user; a memory far below the best score is noise to a reader.
    """
    own = [m for m in memories if m.source.speaker in (None, "user") and m.source.session_id != session_id]
    if not own:
        return []
    top = max(m.score for m in own)
    return [m for m in own if m.score >= band * top][:max_memories]


def offline_reply(user_text: str, memories: list[Memory], stm: Stm, session_id: str = "") -> Reply:
    """An honest, deterministic answer built only from retrieved memories and the STM."""
    lines = [OFFLINE_PREFIX]
    quoted = pick_memories(memories, session_id)
    if quoted:
        lines.append("From our earlier conversations I remember that you said:")
        lines.extend(f'- "{m.content}"' for m in quoted)
    elif stm.summary:
        lines.append(f"Earlier in this conversation: {stm.summary}")
    else:
        lines.append("I have nothing stored that relates to this yet.")
    previous = [t for t in stm.turns if t.role == "user"]
    if previous and not quoted:
        lines.append(f'Your last message before this one was: "{previous[-1].content}"')
    lines.append(f'You just said: "{user_text}"')
    return Reply(text="\n".join(lines), model=OFFLINE_MODEL)


async def llm_reply(model: ChatModel, messages: list[dict[str, str]], max_tokens: int) -> Reply:
    text = await model.complete(messages, max_tokens=max_tokens)
    return Reply(text=text.strip(), model=model.name)
