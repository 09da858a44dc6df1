"""Who writes the reply: the configured LLM, or the offline responder, which says what it is."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.chat_ai.prompt import BlockTurn, MemoryBlock, date_label
from shared.contracts.messages import OFFLINE_MODEL, OFFLINE_REPLY_PREFIX
from shared.runtime.llm import ChatModel
from shared.runtime.stm import Stm
from shared.runtime.text import is_question

OFFLINE_PREFIX = f"{OFFLINE_REPLY_PREFIX} no language model is configured; I can only repeat what I remember]"
_WORD = re.compile(r"[a-z0-9']+")
_STOP_WORDS = (
    "a an the and or but if of to in on at for with by from about as is are was were be been being do does did have "
    "has had i me my mine you your we our they them their he she his her it its this that these those what which who "
    "whom where when why how can could would should will shall may might must not no so than too very just also any "
    "some there here again ever")
_STOP = frozenset(_STOP_WORDS.split())


@dataclass(slots=True)
class Reply:
    text: str
    model: str


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def quotable(turn: BlockTurn) -> bool:
    """The user's own statements: not the assistant's words, not questions, never an offline reply."""
    return (turn.speaker != "assistant" and not is_question(turn.content)
            and not turn.content.lstrip().startswith(OFFLINE_REPLY_PREFIX))


def pick_quotes(block: MemoryBlock, query: str, max_quotes: int = 3) -> list[BlockTurn]:
    """From the block, best entry first, the user statement of each entry that shares most words with the query
    (the result itself wins a tie); at most one per entry, ``max_quotes`` in all."""
    asked = _words(query)
    out: list[BlockTurn] = []
    for entry in block.entries:
        candidates = [t for t in entry.turns if quotable(t)]
        if not candidates:
            continue
        best = max(candidates, key=lambda t: (len(asked & _words(t.content)), t.anchor))
        out.append(best)
        if len(out) >= max_quotes:
            break
    return out


def offline_reply(user_text: str, block: MemoryBlock, stm: Stm, current_message_id: str = "") -> Reply:
    """An honest, deterministic answer built only from the memory block and the STM."""
    lines = [OFFLINE_PREFIX]
    quoted = pick_quotes(block, user_text)
    if quoted:
        lines.append("From our earlier conversations I remember that you said:")
        lines.extend(f'- ({date_label(t.timestamp)}) "{t.content}"' for t in quoted)
    elif stm.summary:
        lines.append(f"Earlier in this conversation: {stm.summary}")
    else:
        lines.append("I have nothing stored that relates to this yet.")
    previous = [t for t in stm.turns if t.role == "user" and t.message_id != current_message_id]
    if previous and not quoted:
        lines.append(f'Your last message before this one was: "{previous[-1].content}"')
    lines.append(f'You just said: "{user_text}"')
    return Reply(text="\n".join(lines), model=OFFLINE_MODEL)


async def llm_reply(model: ChatModel, messages: list[dict[str, str]], max_tokens: int) -> Reply:
    text = await model.complete(messages, max_tokens=max_tokens)
    return Reply(text=text.strip(), model=model.name)
