"""The native backend: PostgreSQL + pgvector, local embeddings."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from services.ltm.backend import NotFound, Unsupported
from services.ltm.config import LtmSettings
from services.ltm.extraction import Extracted, Extraction, LlmExtractor, RuleExtractor, Turn, ground_dates
from services.ltm.graph import Provenance, TurnKnowledge, entity_names, norm_name, search_entities, write_knowledge
from services.ltm.lifecycle import Lifecycle, LifecycleConfig
from services.ltm.profile import build_profile
from services.ltm.retrieval import RetrievalConfig, is_question
from services.ltm.store import LtmStore, NewMemory, content_hash
from shared.contracts import Memory, MemoryUpdate, Names
from shared.contracts.messages import OFFLINE_REPLY_PREFIX, AddData, SearchData, SearchEntitiesData
from shared.runtime.embedding import Embedder
from shared.runtime.llm import chat_model
from shared.runtime.logging import content, get_logger

log = get_logger(__name__)

ENTITY_VECTOR_CACHE = 20_000


def build_extraction(settings: LtmSettings) -> Extraction | None:
    """LTM_EXTRACTION: auto = the LLM when one is configured, else the rules; off = episodic memories only."""
    if settings.ltm_extraction == "off":
        return None
    rules = RuleExtractor()
    llm = None
    if settings.ltm_extraction in ("auto", "llm"):
        model = chat_model(settings.openai_api_key, settings.openai_base_url, settings.llm_model,
                           settings.llm_timeout_s)
        if model is not None:
            llm = LlmExtractor(model, rules, retries=settings.ltm_llm_retries)
        elif settings.ltm_extraction == "llm":
            log.warning("ltm.extraction_llm_unconfigured", using="rules")
    return Extraction(rules, llm, max_batch=settings.ltm_extract_batch)


def lifecycle_config(settings: LtmSettings) -> LifecycleConfig:
    return LifecycleConfig(
        half_life_days=settings.ltm_decay_half_life_days, consolidate_similarity=settings.ltm_consolidate_similarity,
        consolidate_max=settings.ltm_consolidate_max, memory_budget=settings.ltm_memory_budget,
        cleanup_batch=settings.ltm_cleanup_batch, optimize_interval_s=settings.ltm_optimize_interval_s,
        users_per_run=settings.ltm_optimize_users_per_run, lock_ms=settings.ltm_optimize_lock_ms,
    )


class NativeBackend:
    name = "native"

    def __init__(self, store: LtmStore, embedder: Embedder, *, settings: LtmSettings | None = None,
                 redis: aioredis.Redis | None = None, names: Names | None = None,
                 extraction: Extraction | None = None) -> None:
        """``redis`` and ``names`` give ``optimize`` and the periodic lifecycle job their lock; without them
        ``optimize`` is refused and the periodic job does not run."""
        self.store, self.embedder = store, embedder
        settings = settings or LtmSettings()
        self.retrieval = RetrievalConfig.from_settings(settings)
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()  # query text -> embedding (search)
        self._query_cache = settings.ltm_query_cache
        self.extraction = extraction if extraction is not None else build_extraction(settings)
        lock_names = names or Names()
        self.lifecycle = Lifecycle(store.pool, lifecycle_config(settings), redis,
                                   lambda user_id: lock_names.lock("ltm", "optimize", user_id))
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    async def start(self) -> None:
        if self.extraction is not None:  # load spaCy now, not on the first message
            await asyncio.to_thread(lambda: self.extraction.rules.nlp if self.extraction else None)

    async def close(self) -> None:
        await self.store.flush_access()

    async def ingest(self, update: MemoryUpdate) -> bool:
        if update.source == "ai" and update.content.lstrip().startswith(OFFLINE_REPLY_PREFIX):
            return False  # the offline responder only repeats memories: indexing it would echo them back
        if await self.store.ingested(update.user_id, update.message_id):
            return False  # a redelivery: skip extraction and embedding (the transaction below still guards races)
        extra = dict(update.meta.model_extra or {})
        named = str(extra.get("speaker") or "").strip()
        subject = named or ("User" if update.source == "user" else "Assistant")
        speaker = named or update.source
        items = await self._extract(Turn(update.content, update.timestamp, subject, update.source))
        refs = ground_dates(update.content, update.timestamp)
        meta = {**extra, "role": update.source, "question": is_question(update.content)}
        if refs:
            meta["dates"] = [{"text": r.phrase, "date": r.iso} for r in refs]
        mentioned = [(n, k) for it in items if it.type == "entity" for n, k in it.entities]
        vecs = await self.embedder.embed_many([update.content, *(it.content for it in items)])
        episodic = NewMemory(
            user_id=update.user_id, type="episodic", content=update.content, embedding=vecs[0], confidence=1.0,
            entities=[n for n, _ in mentioned], message_id=update.message_id, session_id=update.meta.session_id,
            timestamp=update.timestamp, speaker=speaker, meta=meta,
        )
        knowledge = TurnKnowledge(
            user_id=update.user_id, subject=subject,
            source=Provenance(update.message_id, update.meta.session_id, update.timestamp, speaker),
            items=list(zip(items, vecs[1:], strict=True)),
            entity_vectors=await self._entity_vectors([*entity_names(items, subject), *mentioned]),
            episodic_hash=content_hash(update.content), episodic_entities=mentioned, meta=extra,
        )
        stored = await self.store.ingest(update.user_id, update.message_id, [episodic],
                                         then=lambda conn: write_knowledge(conn, knowledge))
        if stored:
            await self.lifecycle.touch(update.user_id)
        log.debug("ltm.ingested", stored=stored, extracted=len(items), content=content(update.content))
        return stored

    async def _extract(self, turn: Turn) -> list[Extracted]:
        if self.extraction is None:
            return []
        try:
            return await self.extraction.extract(turn)
        except Exception:
            # the turn itself is still stored as an episodic memory: recall never depends on extraction
            log.warning("ltm.extraction_failed", exc_info=True)
            return []

    async def _entity_vectors(self, names: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        keys = {norm_name(n): n for n, _ in names if norm_name(n)}
        missing = [k for k in keys if k not in self._vectors]
        for key, vec in zip(missing, await self.embedder.embed_many([keys[k] for k in missing]), strict=True):
            self._vectors[key] = vec
        out = {}
        for key in keys:
            self._vectors.move_to_end(key)
            out[key] = self._vectors[key]
        while len(self._vectors) > ENTITY_VECTOR_CACHE:
            self._vectors.popitem(last=False)
        return out

    async def search(self, user_id: str, data: SearchData) -> list[Memory]:
        return await self.store.search(user_id, data, await self._query_vector(data.query), self.retrieval)

    async def _query_vector(self, text: str) -> np.ndarray:
        """The query's embedding, from a per-process LRU of LTM_QUERY_CACHE texts (retries, k=10 then k=20)."""
        queries = self._queries
        vec = queries.get(text)
        if vec is None:
            vec = await self.embedder.embed(text)
            queries[text] = vec
            while len(queries) > self._query_cache:
                queries.popitem(last=False)
        else:
            queries.move_to_end(text)
        return vec

    async def add(self, user_id: str, data: AddData) -> Memory:
        vec = await self.embedder.embed(data.content)
        return await self.store.add(NewMemory(
            user_id=user_id, type=data.type, content=data.content, embedding=vec, confidence=data.confidence,
            message_id=data.source_turn, meta=data.meta,
        ))

    async def profile_get(self, user_id: str) -> dict[str, Any]:
        return await build_profile(self.store.pool, user_id, await self.store.get_profile(user_id))

    async def profile_update(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        return await build_profile(self.store.pool, user_id, await self.store.update_profile(user_id, profile))

    async def delete(self, user_id: str, memory_id: str) -> None:
        if not await self.store.delete(user_id, memory_id):
            raise NotFound("no such memory for this user")

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        return await self.store.delete_user(user_id)

    async def stats(self, user_id: str) -> dict[str, Any]:
        return await self.store.stats(user_id)

    async def optimize(self, user_id: str) -> dict[str, Any]:
        if self.lifecycle.redis is None:
            raise Unsupported("optimize needs the backend's Redis lock (NativeBackend(redis=..., names=...))")
        return await self.lifecycle.optimize(user_id)

    async def search_entities(self, user_id: str, data: SearchEntitiesData) -> list[dict[str, Any]]:
        vec = await self.embedder.embed(data.query)
        return await search_entities(self.store.pool, user_id, data.query, vec, data.limit, data.types)

    async def maintenance(self) -> None:
        await self.store.flush_access()
        await self.lifecycle.periodic()
