"""The ltm worker's own bookkeeping (services/ltm/service.py), without Redis or PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from services.ltm.config import LtmSettings
from services.ltm.service import LtmService
from shared.contracts import MemoryUpdate, Names


class _Stores:
    """A backend that stores every update (only what ingest_update calls)."""

    name = "fake"

    async def ingest(self, update: MemoryUpdate) -> bool:
        return True


def _service(**settings: Any) -> LtmService:
    return LtmService(LtmSettings(**settings), Names(), aioredis.Redis(), _Stores())  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [0, 1000])
async def test_users_to_announce_are_collected_only_with_a_search_index(rows: int) -> None:
    """The users ingest touched wait for _warm_announce, which runs only with a search index: with
    LTM_SEARCH_INDEX_ROWS=0 nothing emptied the set, one entry per user ever ingested."""
    service = _service(ltm_search_index_rows=rows)
    for i in range(50):
        assert await service.ingest_update(MemoryUpdate(user_id=f"u{i}", content="I moved to Porto.", timestamp=1.0))
    assert len(service._stored_users) == (50 if rows else 0)
    assert service._stored.is_set() == bool(rows)
