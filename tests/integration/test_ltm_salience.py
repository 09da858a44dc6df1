"""Salience on real PostgreSQL: stored at ingest, a ranking term (LTM_SALIENCE_WEIGHT), cleanup order
(LTM_SALIENCE_CLEANUP)."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from services.ltm.config import LtmSettings
from services.ltm.native import NativeBackend
from services.ltm.retrieval import RetrievalConfig, search
from services.ltm.store import LtmStore
from shared.contracts import MemoryUpdate
from shared.contracts.messages import SearchData
from shared.runtime.embedding import Embedder
from tests.helpers import Mesh, common
from tests.integration.test_ltm_retrieval import put

DAY = 86_400.0


def native(mesh: Mesh, **kw: Any) -> NativeBackend:
    settings = LtmSettings(**{**common(mesh.redis_url, mesh.database_url), **kw})
    return NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), settings=settings, redis=mesh.redis,
                         names=mesh.names)


def update(user: str, text: str, ts: float, session: str = "s1", source: str = "user") -> MemoryUpdate:
    return MemoryUpdate(user_id=user, content=text, timestamp=ts, source=source,  # type: ignore[arg-type]
                        meta={"session_id": session, "message_id": str(uuid.uuid4())})


async def rows(mesh: Mesh, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(sql, params)
        return list(await cur.fetchall())


async def test_ingest_stores_a_salience_on_the_turn_and_its_knowledge(mesh: Mesh) -> None:
    backend = native(mesh, ltm_extraction="rules")
    await backend.start()
    now = time.time()
    turns = ["Hi! How are you?", "Good, thanks.", "My sister Anna moved to Lisbon last week, she works at a bakery.",
             "Cool!"]
    updates = [update("sal1", text, now + i) for i, text in enumerate(turns)]
    for u in updates:
        assert await backend.ingest(u)
    found = await rows(mesh, "SELECT type, content, salience, source_message_id FROM ltm_memories"
                             " WHERE user_id = %s", "sal1")
    assert {r[0] for r in found} > {"episodic"}  # knowledge was extracted too
    assert all(r[2] is not None and 0.0 <= r[2] <= 1.0 for r in found), found
    by_text = {r[1]: r[2] for r in found if r[0] == "episodic"}
    assert by_text[turns[2]] > by_text[turns[3]]  # the trained model: a fact over small talk
    knowledge = [r[2] for r in found if r[0] != "episodic" and r[3] == updates[2].message_id]
    assert knowledge and all(abs(s - by_text[turns[2]]) < 1e-6 for s in knowledge)  # the turn's salience
    assert len(backend._salience_states) == 1  # one session's state held
    off = native(mesh, ltm_salience=False)
    assert await off.ingest(update("sal2", "My dog is called Rex.", now))
    assert {r[0] for r in await rows(mesh, "SELECT salience FROM ltm_memories WHERE user_id = %s", "sal2")} == {None}


async def _order(mesh: Mesh, user: str, query: str, cfg: RetrievalConfig) -> list[str]:
    vec = mesh.model.encode([query])[0]
    sql = [m.content for m in await search(mesh.pool, user, SearchData(query=query, limit=2), vec, cfg)]
    store = LtmStore(mesh.pool)  # the search index's path gives the same order
    indexed = [m.content for m in await store.search(user, SearchData(query=query, limit=2), vec, cfg)]
    await store.index.settle()
    indexed = [m.content for m in await store.search(user, SearchData(query=query, limit=2), vec, cfg)]
    assert sql == indexed
    return sql


async def test_salience_weight_reorders_two_similar_memories(mesh: Mesh) -> None:
    now = time.time()
    a = await put(mesh, "sal3", "I adopted a cat named Luna.", session="s1", ts=now - DAY)
    b = await put(mesh, "sal3", "I adopted a cat named Milo.", session="s2", ts=now - DAY)
    cfg = RetrievalConfig(context_turns=0)
    before = await _order(mesh, "sal3", "What is the name of my cat?", cfg)
    assert len(before) == 2
    first, second = before
    low, high = (a, b) if first.endswith("Luna.") else (b, a)
    async with mesh.pool.connection() as conn:  # the first one not salient, the second one very
        await conn.execute("UPDATE ltm_memories SET salience = 0.05 WHERE memory_id = %s", (low,))
        await conn.execute("UPDATE ltm_memories SET salience = 0.95 WHERE memory_id = %s", (high,))
    assert await _order(mesh, "sal3", "What is the name of my cat?", cfg) == before  # weight 0: no change
    assert await _order(mesh, "sal3", "What is the name of my cat?", replace(cfg, salience=3.0)) == [second, first]
    async with mesh.pool.connection() as conn:  # NULL is neutral: only the other's salience counts
        await conn.execute("UPDATE ltm_memories SET salience = NULL WHERE memory_id = %s", (low,))
        await conn.execute("UPDATE ltm_memories SET salience = 0.0 WHERE memory_id = %s", (high,))
    assert await _order(mesh, "sal3", "What is the name of my cat?", replace(cfg, salience=3.0)) == before


async def test_cleanup_archives_the_least_salient_first(mesh: Mesh) -> None:
    now = time.time()
    texts = ["ok", "sure thing", "nice", "haha", "fine", "cool"]
    for on in (False, True):
        user = f"sal-clean-{on}"
        backend = native(mesh, ltm_extraction="off", ltm_salience=False, ltm_memory_budget=4, ltm_cleanup_batch=2,
                         ltm_salience_cleanup=on)
        for i, text in enumerate(texts):  # oldest first; salience rising with age: the newest least salient
            assert await backend.ingest(update(user, text, now - (100 - 10 * i) * DAY))
        async with mesh.pool.connection() as conn:
            for i, text in enumerate(texts):
                await conn.execute("UPDATE ltm_memories SET salience = %s WHERE user_id = %s AND content = %s",
                                   (0.9 - 0.1 * i, user, text))
        assert (await backend.optimize(user))["archived"] == 2
        archived = sorted(r[0] for r in await rows(mesh, "SELECT row ->> 'content' FROM ltm_archive"
                                                         " WHERE user_id = %s AND reason = 'budget'", user))
        # off: by decay (the oldest go); on: the least salient (here the newest) go first
        assert archived == (sorted(["fine", "cool"]) if on else sorted(["ok", "sure thing"]))
