"""The native backend: PostgreSQL + pgvector, local embeddings."""

from __future__ import annotations

from typing import Any

from services.ltm.backend import NotFound, Unsupported
from services.ltm.store import LtmStore, NewMemory
from shared.contracts import Memory, MemoryUpdate
from shared.contracts.messages import AddData, SearchData, SearchEntitiesData
from shared.runtime.embedding import Embedder
from shared.runtime.logging import content, get_logger

log = get_logger(__name__)


class NativeBackend:
    name = "native"

    def __init__(self, store: LtmStore, embedder: Embedder) -> None:
        self.store, self.embedder = store, embedder

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self.store.flush_access()

    async def ingest(self, update: MemoryUpdate) -> bool:
        vec = await self.embedder.embed(update.content)
        episodic = NewMemory(
            user_id=update.user_id, type="episodic", content=update.content, embedding=vec, confidence=1.0,
            message_id=update.message_id, session_id=update.meta.session_id, timestamp=update.timestamp,
            speaker=update.source, meta=dict(update.meta.model_extra or {}),
        )
        stored = await self.store.ingest(update.user_id, update.message_id, [episodic])
        log.debug("ltm.ingested", stored=stored, content=content(update.content))
        return stored

    async def search(self, user_id: str, data: SearchData) -> list[Memory]:
        vec = await self.embedder.embed(data.query)
        return await self.store.search(user_id, vec, data.limit, threshold=data.threshold,
                                       types=list(data.types) if data.types else None)

    async def add(self, user_id: str, data: AddData) -> Memory:
        vec = await self.embedder.embed(data.content)
        return await self.store.add(NewMemory(
            user_id=user_id, type=data.type, content=data.content, embedding=vec, confidence=data.confidence,
            message_id=data.source_turn, meta=data.meta,
        ))

    async def profile_get(self, user_id: str) -> dict[str, Any]:
        return await self.store.get_profile(user_id)

    async def profile_update(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        return await self.store.update_profile(user_id, profile)

    async def delete(self, user_id: str, memory_id: str) -> None:
        if not await self.store.delete(user_id, memory_id):
            raise NotFound("no such memory for this user")

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        return await self.store.delete_user(user_id)

    async def stats(self, user_id: str) -> dict[str, Any]:
        return await self.store.stats(user_id)

    async def optimize(self, user_id: str) -> dict[str, Any]:
        raise Unsupported("optimize is not implemented yet")

    async def search_entities(self, user_id: str, data: SearchEntitiesData) -> list[dict[str, Any]]:
        raise Unsupported("search_entities is not implemented yet")

    async def maintenance(self) -> None:
        await self.store.flush_access()
