"""Embeddings by choice (issue "Operate it", part 7): an OpenAI-compatible embedding model instead of the local one.

A fake ``/v1/embeddings`` server gives 1,536-value vectors (the local model's, turned by a fixed random rotation
into 1,536 dimensions, so that similarity means what it does locally). With ``EMBEDDING_MODEL=text-embedding-3-small``
the vector columns of a fresh database are sized for it at start-up, a fact told in one turn is ingested with the
server's vectors and found by a search; a service started with another model over stored vectors refuses with a
clear message; ``mesh reembed`` embeds every stored text again (ltm's memories and entities in place, memory's
message vectors cleared for its background job, a document's chunks) and the searches still find the fact and
the passage afterwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from mesh.reembed import reembed
from shared.contracts import Names, new_id
from shared.runtime.embedding import EmbeddingSettings, SyncEmbedder
from shared.runtime.vectors import EmbeddingModelMismatch, column_dims, ensure_vector_columns, recorded_model
from tests.fake_llm import fake_embeddings
from tests.helpers import Mesh, ask_ltm, ltm_request, mesh_for, running, wait_until
from tests.integration.test_documents import doc_add, doc_search

REMOTE = "text-embedding-3-small"


def rotation(dim_in: int, dim_out: int) -> np.ndarray:
    """Orthonormal rows: x @ R keeps every length and dot product of the local vectors."""
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((dim_out, dim_in)))
    return np.asarray(q.T, dtype=np.float32)


async def _dims(mesh: Mesh) -> dict[str, int]:
    async with mesh.pool.connection() as conn:
        return {**await column_dims(conn, "ltm"), **await column_dims(conn, "memory")}


async def _tell_and_find(mesh: Mesh, user: str, overrides: dict[str, Any]) -> list[str]:
    async with running(mesh.memory(**overrides)), running(mesh.ltm(**overrides)), running(mesh.chat()):
        msg = await mesh.send("My sister Ingrid lives in Tromsø and works as a glaciologist.", user_id=user,
                              session_id=f"{user}-1")
        await mesh.reply_to(msg, timeout=30)

        async def ingested() -> bool:
            return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user) >= 1

        await wait_until(ingested, timeout=30, message="the turn ingested")
        resp = await ask_ltm(mesh, ltm_request("search", user, {"query": "Where does my sister live?"}))
        assert resp.success, resp.error
        return [m.content for m in resp.memories or []]


async def test_a_remote_embedding_model_sizes_the_columns_and_serves_recall(
        names: Names, redis: aioredis.Redis, redis_url: str, database_url: str, sync_embedder: Any) -> None:
    turn = rotation(sync_embedder.dim, 1536)
    with fake_embeddings(lambda texts: sync_embedder.encode(texts) @ turn) as (url, seen):
        remote = {"embedding_model": REMOTE, "embedding_base_url": url, "embedding_api_key": "sk-test"}
        model = SyncEmbedder(settings=EmbeddingSettings(**remote))
        assert (model.name, model.dim, model.backend) == (REMOTE, 1536, "remote")
        async with mesh_for(names, redis, redis_url, database_url, model) as mesh:
            assert set((await _dims(mesh)).values()) == {384}  # the migrations' columns
            for component in ("ltm", "memory"):
                await ensure_vector_columns(mesh.pool, component, model.name, model.dim)
                await ensure_vector_columns(mesh.pool, component, model.name, model.dim)  # a second start: no-op
            assert set((await _dims(mesh)).values()) == {1536}
            user = f"u-remote-{new_id()[:8]}"
            found = await _tell_and_find(mesh, user, {**remote, "ltm_ingest_model": "own"})
            assert any("Tromsø" in c for c in found), found
            async with mesh.pool.connection() as conn:
                cur = await conn.execute("SELECT vector_dims(embedding) FROM ltm_memories WHERE user_id = %s", (user,))
                assert {r[0] for r in await cur.fetchall()} == {1536}
                assert await recorded_model(conn, "ltm") == (REMOTE, 1536)
    assert seen and {b["model"] for b in seen} == {REMOTE}
    assert all(isinstance(b["input"], list) for b in seen)


async def test_another_model_over_stored_vectors_is_refused_until_reembed(
        names: Names, redis: aioredis.Redis, redis_url: str, database_url: str, sync_embedder: Any) -> None:
    user = f"u-reembed-{new_id()[:8]}"
    async with mesh_for(names, redis, redis_url, database_url, sync_embedder) as mesh:
        for component in ("ltm", "memory"):
            await ensure_vector_columns(mesh.pool, component, sync_embedder.name, sync_embedder.dim)
        found = await _tell_and_find(mesh, user, {})  # stored with the local model
        assert any("Tromsø" in c for c in found), found
        async with running(mesh.ltm()):  # and a document of the user's, chunked and embedded with it
            await doc_add(mesh, user, "fjords.md", "# Fjords\n\n## Geirangerfjord\n\nThe Geirangerfjord is 15 "
                          "kilometres long and lies in Sunnmøre.\n\n## Sognefjord\n\nThe Sognefjord is the longest.")
        memories = await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s", user)
        entities = await mesh.count("SELECT count(*) FROM ltm_entities WHERE user_id = %s", user)
        assert memories >= 1 and entities >= 1

        turn = rotation(sync_embedder.dim, 1536)
        with fake_embeddings(lambda texts: sync_embedder.encode(texts) @ turn) as (url, _seen):
            remote = {"embedding_model": REMOTE, "embedding_base_url": url, "embedding_api_key": "sk-test"}
            with pytest.raises(EmbeddingModelMismatch, match="mesh reembed"):
                await ensure_vector_columns(mesh.pool, "ltm", REMOTE, 1536)
            assert set((await _dims(mesh)).values()) == {384}, "a refused start changed the columns"

            env = {"EMBEDDING_MODEL": REMOTE, "EMBEDDING_BASE_URL": url, "EMBEDDING_API_KEY": "sk-test"}
            seen_progress: dict[str, int] = {}

            def progress(label: str, total: int) -> Any:
                seen_progress[label] = 0

                def step(n: int) -> None:
                    seen_progress[label] += n
                return step

            with pytest.MonkeyPatch.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                result = await reembed(mesh.database_url, ["ltm", "memory"], batch=3, progress=progress)
            ltm = result["components"]["ltm"]
            assert result["dim"] == 1536 and ltm["ltm_memories.embedding"]["embedded"] >= memories, result
            assert seen_progress["ltm_memories.embedding"] >= memories
            assert set((await _dims(mesh)).values()) == {1536}
            for component in ("ltm", "memory"):  # the services now start with the new model
                await ensure_vector_columns(mesh.pool, component, REMOTE, 1536)
            remote_model = SyncEmbedder(settings=EmbeddingSettings(**remote))
            async with mesh_for(names, redis, redis_url, database_url, remote_model) as after:
                async with running(after.ltm(**remote)):
                    resp = await ask_ltm(after, ltm_request("search", user, {"query": "Where does my sister live?"}))
                    passages = (await doc_search(after, user, "How long is the Geirangerfjord?")).passages
                assert resp.success and any("Tromsø" in m.content for m in resp.memories or []), resp
                assert passages and "15" in passages[0].text, passages
                assert await after.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s"
                                         " AND vector_dims(embedding) = 1536", user) == memories
                assert await after.count("SELECT count(*) FROM ltm_memories WHERE embedding IS NULL") == 0
