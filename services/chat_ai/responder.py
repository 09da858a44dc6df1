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


def offline_reply(user_text: str, memories: list[Memory], stm: Stm, max_memories: int = 3) -> Reply:
    """An honest, deterministic answer built only from retrieved memories and the STM."""
    lines = [OFFLINE_PREFIX]
    if memories:
        lines.append("From our earlier conversations I remember:")
        for m in memories[:max_memories]:
            who = "you said" if (m.source.speaker in (None, "user")) else "I said"
            lines.append(f'- {who}: "{m.content}"')
    elif stm.summary:
        lines.append(f"Earlier in this conversation: {stm.summary}")
    else:
        lines.append("I have nothing stored that relates to this yet.")
    previous = [t for t in stm.turns if t.role == "user"]
    if previous and not memories:
        lines.append(f'Your last message before this one was: "{previous[-1].content}"')
    lines.append(f'You just said: "{user_text}"')
    return Reply(text="\n".join(lines), model=OFFLINE_MODEL)


async def llm_reply(model: ChatModel, messages: list[dict[str, str]], max_tokens: int) -> Reply:
    text = await model.complete(messages, max_tokens=max_tokens)
    return Reply(text=text.strip(), model=model.name)
