"""A summary the background fold saves makes the session's cached reads stale, as a write does (without servers:
the integration test tests/integration/test_memory_store.py reads through the real cache)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.memory.stm import StmWriter
from services.memory.store import Backlog
from services.memory.summary import SummaryState
from shared.contracts import Names
from shared.runtime.stm import Turn


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []


class FakeStore:
    def __init__(self, events: Events) -> None:
        self.events = events

    async def save_summary(self, user_id: str | None, session_id: str, state: SummaryState) -> None:
        self.events.log.append(("save_summary", session_id, state.text))


class FakeCache:
    enabled = True

    def __init__(self, events: Events) -> None:
        self.events = events

    async def invalidate(self, session_id: str | None, user_id: str | None) -> None:
        self.events.log.append(("invalidate", session_id or "", user_id or ""))


class FakeRedis:
    async def eval(self, *_: Any) -> int:  # the summary's HSET for readers
        return 1


class Summariser:
    max_tokens = 100

    async def fold(self, state: SummaryState, turns: Sequence[Turn],
                   scores: Mapping[str, float] | None = None) -> SummaryState:
        return SummaryState(text="new summary", kind="test", turns=state.turns + len(turns), folded_through=-1)


async def test_a_fold_that_saves_a_summary_invalidates_the_session_cache() -> None:
    events = Events()
    writer = StmWriter(FakeRedis(), Names(), FakeStore(events), Summariser(), 4, 60,  # type: ignore[arg-type]
                       cache=FakeCache(events))  # type: ignore[arg-type]
    backlog = Backlog([Turn("m0", "user", "I live in Lisbon.", 1.0)], {}, {"m0": 0})
    await writer._fold_locked("s1", "u1", backlog, SummaryState())
    # after the durable copy is saved: a reader reloading then sees the new summary
    assert events.log == [("save_summary", "s1", "new summary"), ("invalidate", "s1", "u1")]
