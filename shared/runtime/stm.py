"""Short-term memory format in Redis (layout documented in shared/contracts/names.py).

The memory service is the only writer; chat-ai reads with :func:`read_stm`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from shared.contracts.names import Names


@dataclass(frozen=True, slots=True)
class Turn:
    message_id: str
    role: str  # "user" | "ai"
    content: str
    timestamp: float

    def member(self) -> str:
        """The sorted-set member: deterministic, so re-adding the same turn is a no-op."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def parse(cls, raw: bytes | str) -> Turn:
        d = json.loads(raw)
        return cls(message_id=d["message_id"], role=d["role"], content=d["content"], timestamp=float(d["timestamp"]))


@dataclass(slots=True)
class Stm:
    turns: list[Turn] = field(default_factory=list)
    summary: str = ""
    summary_kind: str = ""
    exists: bool = False
    owner: str | None = None  # the meta's user_id ("" for a session without one); None when there is no meta

    def readable_by(self, user_id: str | None) -> bool:
        """Whether a turn of ``user_id`` may see this STM: only the session's own user (a session id is not a
        secret: another user's input naming it must not read it, nor an input with no user_id). An STM without a
        meta (``owner`` None) holds nothing: :func:`read_stm` never returns turns or a summary without their owner."""
        return self.owner is None or self.owner == (user_id or "")


async def read_stm(redis: aioredis.Redis, names: Names, session_id: str) -> Stm:
    """The session's STM as Redis holds it. The meta key is the STM's presence and its owner: turns or a summary
    found without it are leftovers (a summary written after its session's keys expired or were dropped) whose owner
    nobody can vouch for, so they are not returned; the reader asks memory to rebuild the STM, which checks the
    session's owner in PostgreSQL."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrange(names.stm_turns(session_id), 0, -1)
        pipe.hmget(names.stm_summary(session_id), ["text", "kind"])
        pipe.hmget(names.stm_meta(session_id), ["user_id"])
        members, (text, kind), (owner,) = await pipe.execute()
    if owner is None:
        return Stm()
    turns: list[Turn] = []
    seen: set[str] = set()
    for m in members:
        try:
            turn = Turn.parse(m)
        except (ValueError, KeyError):
            continue
        if turn.message_id not in seen:  # a turn is one message, whatever its member's spelling
            seen.add(turn.message_id)
            turns.append(turn)
    decode = lambda v: v.decode() if isinstance(v, bytes) else (v or "")  # noqa: E731
    return Stm(turns=turns, summary=decode(text), summary_kind=decode(kind), exists=True, owner=decode(owner))
