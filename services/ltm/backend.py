"""What an ltm backend must do. The service decodes, dispatches and replies; a backend stores and finds.

Two implementations: :mod:`services.ltm.native` (PostgreSQL + pgvector, this project's own)
and :mod:`services.ltm.mem0_backend` (mem0ai, ``LTM_BACKEND=mem0``). Every method is scoped
by ``user_id``; none may return another user's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from shared.contracts import Memory, MemoryUpdate
from shared.contracts.errors import NotFound as NotFound  # replied as not_found by the request server
from shared.contracts.errors import Unsupported as Unsupported  # replied as unknown_type
from shared.contracts.messages import (
    AddData,
    DocAddData,
    DocAdded,
    DocDeleted,
    DocDeleteData,
    DocPassage,
    DocSearchData,
    ListData,
    SearchData,
    SearchEntitiesData,
)


class LtmBackend(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def ingest(self, update: MemoryUpdate) -> bool:
        """Store what the update teaches, once per ``message_id``; False for a duplicate."""
        ...

    async def search(self, user_id: str, data: SearchData) -> list[Memory]: ...
    async def add(self, user_id: str, data: AddData) -> Memory: ...
    async def profile_get(self, user_id: str) -> dict[str, Any]: ...
    async def profile_update(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]: ...
    async def delete(self, user_id: str, memory_id: str) -> None: ...
    async def delete_user(self, user_id: str) -> dict[str, Any]: ...
    async def stats(self, user_id: str) -> dict[str, Any]: ...
    async def list_memories(self, user_id: str, data: ListData) -> list[Memory]: ...
    async def optimize(self, user_id: str) -> dict[str, Any]: ...
    async def search_entities(self, user_id: str, data: SearchEntitiesData) -> list[dict[str, Any]]: ...
    # the user's documents (services/ltm/documents/); delete_user removes them too
    async def doc_add(self, user_id: str, data: DocAddData) -> DocAdded: ...
    async def doc_search(self, user_id: str, data: DocSearchData) -> list[DocPassage]: ...
    async def doc_delete(self, user_id: str, data: DocDeleteData) -> DocDeleted: ...
    def warm(self, user_ids: Sequence[str]) -> None:
        """A hint: these users have new memories and will likely search soon (get ready in the background)."""
        ...

    def forget(self, user_ids: Sequence[str]) -> None:
        """These users were deleted (by this process or another): drop whatever this process still holds of them
        in memory (search index entries, caches keyed by text)."""
        ...

    async def maintenance(self) -> list[str]:
        """Periodic background work (access-statistics flush, lifecycle jobs); called every few seconds. Returns
        the users whose memories it changed (consolidated, archived: their search index entries are stale)."""
        ...
