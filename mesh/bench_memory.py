"""Benchmarks of the conversation store (issue 3), at 1,000-turn sessions.

All through :class:`services.memory.api.MemoryApi`, the code both the streams and ``memory_requests`` run,
on real Redis and PostgreSQL, in one process (the bus round trip is not included: it is the same
BLPOP/PUBLISH for every request type and is measured where the bus is benchmarked). Seed ceilings and
aims from the issue: create < 500 ms, store < 200 ms (aim p95 ≤ 5 ms), retrieval < 2 s, context merge
< 1 s, rehydration < 5 s (aim ≤ 100 ms).
"""

from __future__ import annotations

import time

from mesh.bench import BenchEnv, Measured, bench, timer

TURNS = 1000
USER = "bench-user"
SESSION = "bench-long"


def _text(i: int) -> str:
    topics = ("our trip to Kyoto in April", "the garden beds and tomatoes", "the Rust rewrite of the billing service",
              "my sister Maria's wedding in Porto", "the budget for 2025", "training for the Lisbon half marathon")
    return (f"Message {i}: let's talk about {topics[i % len(topics)]}. I think we should decide by Friday, "
            f"and keep notes so that we remember what we agreed on.")


@bench("memory", "conversation_store")
async def conversation_store(env: BenchEnv) -> list[Measured]:
    from cryptography.fernet import Fernet

    from services.memory.config import MemorySettings
    from services.memory.service import MemoryService
    from services.memory.store import ConversationStore, StoredMessage
    from shared.contracts import Names
    from shared.runtime.db import open_pool
    from shared.runtime.runner import redis_client

    settings = MemorySettings(redis_url=env.redis_url, database_url=env.database_url, openai_api_key=None,
                              openai_base_url=None, memory_embed_messages=False,
                              memory_encryption_key=Fernet.generate_key().decode())
    names = Names().with_prefix(env.key_prefix)
    pool = await open_pool(env.database_url, max_size=4, name="bench")
    redis = redis_client(env.redis_url)
    try:
        svc = MemoryService(settings, names, redis, ConversationStore(pool))
        api = svc.api
        base = time.time() - 10 * TURNS

        def message(session: str, i: int) -> StoredMessage:
            return StoredMessage(message_id=f"{session}-{i}", session_id=session, user_id=USER,
                                 role="human" if i % 2 == 0 else "ai", content=_text(i), timestamp=base + i)

        # The background summary catch-ups, timed (they are off the store path, but they share its CPU).
        catch_up: list[float] = []
        untimed = svc.stm.catch_up

        async def timed_catch_up(session_id: str) -> None:
            with timer(catch_up):
                await untimed(session_id)

        svc.stm.catch_up = timed_catch_up  # type: ignore[method-assign]

        # 1,000 turns through the full write path (this warms every cache and the summariser too).
        await api.create_session(USER, SESSION, name="long")
        fill: list[float] = []
        for i in range(TURNS):
            with timer(fill):
                await api.record(message(SESSION, i))
        await svc.stm.drain()

        # What one durable commit costs on this machine: the floor under any write that must survive a crash.
        floor: list[float] = []
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (n int)")
            for n in range(env.reps(200)):
                with timer(floor):
                    await conn.execute("INSERT INTO bench_commit_floor VALUES (%s)", (n,))

        create: list[float] = []
        for n in range(env.reps(200)):
            with timer(create):
                await api.create_session(USER, f"new-{n}", name="bench", metadata={"n": n})

        store: list[float] = []
        for i in range(TURNS, TURNS + env.reps(300)):
            with timer(store):
                await api.record(message(SESSION, i))

        await svc.stm.drain()

        retrieval: list[float] = []
        for _ in range(env.reps(100)):
            with timer(retrieval):
                messages = await api.get_messages(USER, SESSION, limit=TURNS)
            assert len(messages) == TURNS

        merge: list[float] = []
        for n in range(env.reps(300)):
            with timer(merge):
                await api.store.store_context(USER, SESSION, "project", "plan", {f"k{n % 50}": n, "last": n})
                context = await api.store.get_context(USER, SESSION, "project")
            assert context[0].value["last"] == n

        rehydrate: list[float] = []
        for _ in range(env.reps(50)):
            await svc.stm.forget_session(SESSION)  # what FLUSHALL or eviction does to this session
            with timer(rehydrate):
                stm = await api.get_stm(USER, SESSION)
            assert stm.rehydrated and len(stm.turns) == settings.stm_max_messages and stm.summary

        cold: list[float] = []
        for _ in range(env.reps(10)):
            await svc.stm.forget_session(SESSION)
            async with pool.connection() as conn:  # as if no summary had ever been written
                await conn.execute("UPDATE conversation_sessions SET context_summary = NULL,"
                                   " summary_state = '{}'::jsonb WHERE session_id = %s", (SESSION,))
            with timer(cold):
                stm = await api.get_stm(USER, SESSION)
            assert stm.rehydrated and stm.summary
    finally:
        await redis.aclose()
        await pool.close()
    size = f"session of {TURNS}-{TURNS + env.reps(300)} turns"
    return [
        Measured("db_commit_floor", floor, None, None,
                 "reference, no ceiling: a one-row INSERT and its durable commit (WAL flush) on this machine"),
        Measured("session_create", create, 500, None, "create_session (PostgreSQL insert + trigger, cache generation)"),
        Measured("message_store", store, 200, 5,
                 f"full write path into a {size}: PostgreSQL insert (+ triggers), STM window, summary fold of the "
                 "evicted turn (Redis + PostgreSQL), cache invalidation, memory_updates publish"),
        Measured("message_store_first_1000", fill, 200, 5, "the same path while the session grows from 0 to 1,000"),
        Measured("summary_catch_up", catch_up, None, None,
                 "reference, no ceiling: background fold of the turns that left the window (lock, PostgreSQL "
                 "read, extractive fold, Redis + PostgreSQL write); not on the store path"),
        Measured("conversation_retrieval", retrieval, 2000, None, f"get_messages of all {TURNS} turns"),
        Measured("context_merge", merge, 1000, None, "store_context with a JSON merge, then get_context"),
        Measured("rehydration", rehydrate, 5000, 100,
                 f"get_stm after the session's STM keys were lost, {size}: summary + window from PostgreSQL"),
        Measured("rehydration_unsummarised", cold, 5000, None,
                 f"the same with no stored summary: the whole {size} is summarised during the rebuild"),
    ]
