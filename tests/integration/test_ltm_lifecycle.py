"""Lifecycle on real Redis + PostgreSQL: supersession, the unique constraint under concurrent ingest,
consolidation, decay ordering, budgeted cleanup, the optimize lock and the periodic job."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import numpy as np

from services.ltm.config import LtmSettings
from services.ltm.lifecycle import RedisLock
from services.ltm.native import NativeBackend
from services.ltm.service import LtmService
from services.ltm.store import LtmStore
from shared.contracts import LTMResponse, MemoryUpdate, encode
from shared.runtime.embedding import Embedder
from tests.helpers import Mesh, common, ltm_replies, ltm_request, running, wait_until

DAY = 86400.0


def native(mesh: Mesh, **kw: Any) -> NativeBackend:
    settings = LtmSettings(**{**common(mesh.redis_url, mesh.database_url), **kw})
    return NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), settings=settings, redis=mesh.redis,
                         names=mesh.names)


def service(mesh: Mesh, backend: NativeBackend, **kw: Any) -> LtmService:
    settings = LtmSettings(**{**common(mesh.redis_url, mesh.database_url), **kw})
    return LtmService(settings, mesh.names, mesh.redis, backend)


def update(user: str, text: str, ts: float, **meta: Any) -> MemoryUpdate:
    return MemoryUpdate(user_id=user, content=text, timestamp=ts,
                        meta={"session_id": "s1", "message_id": str(uuid.uuid4()), **meta})


async def publish(mesh: Mesh, *updates: MemoryUpdate) -> None:
    for u in updates:
        await mesh.redis.xadd(mesh.names.memory_updates, {"data": encode(u)})


async def ingested(mesh: Mesh, user: str, n: int) -> None:
    async def done() -> bool:
        return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user) >= n

    await wait_until(done, timeout=60, message=f"{n} updates ingested for {user}")


async def rows(mesh: Mesh, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(sql, params)
        return list(await cur.fetchall())


async def ask(mesh: Mesh, type_: str, user: str, data: dict[str, Any] | None = None) -> LTMResponse:
    reply_to = f"{mesh.names.ltm_responses}:{uuid.uuid4().hex}"
    async with ltm_replies(mesh, reply_to) as replies:
        raw = ltm_request(type_, user, data, reply_to=reply_to)
        await mesh.redis.rpush(mesh.names.ltm_requests, raw)
        return await replies.get(json.loads(raw)["request_id"], timeout=30)


LOCATION = ("SELECT content, valid_to, superseded_by::text, memory_id::text FROM ltm_memories"
            " WHERE user_id = %s AND slot = 'location' ORDER BY asserted_at")


async def test_a_newer_home_supersedes_the_older_one_which_stays_visible(mesh: Mesh) -> None:
    t0 = time.time() - 30 * DAY
    async with running(service(mesh, native(mesh))):
        await publish(mesh, update("u1", "I live in Lisbon.", t0), update("u1", "I moved to Berlin.", t0 + DAY))
        await ingested(mesh, "u1", 2)
        lisbon, berlin = await rows(mesh, LOCATION, "u1")
        assert lisbon[0] == "User lives in Lisbon" and berlin[0] == "User moved to Berlin"
        assert lisbon[1] == t0 + DAY and lisbon[2] == berlin[3]  # valid_to, superseded_by
        assert berlin[1] is None and berlin[2] is None
        # the graph relation of the old fact ends too
        rels = dict(await rows(mesh, "SELECT o.name, r.valid_to FROM ltm_relations r JOIN ltm_entities o"
                                     " ON o.entity_id = r.object_id WHERE r.user_id = %s AND predicate = 'lives_in'",
                               "u1"))
        assert rels == {"Lisbon": t0 + DAY, "Berlin": None}
        # a statement that arrives late but was made earlier does not win
        await publish(mesh, update("u1", "I live in Porto.", t0 - DAY))
        await ingested(mesh, "u1", 3)
        porto, lisbon, berlin = await rows(mesh, LOCATION, "u1")
        assert porto[2] == lisbon[3] and porto[1] == t0 and berlin[1] is None
        # saying the old value again makes it current again; nothing was deleted on the way
        await publish(mesh, update("u1", "I live in Lisbon.", t0 + 2 * DAY))
        await ingested(mesh, "u1", 4)
        porto, berlin, lisbon = await rows(mesh, LOCATION, "u1")
        assert lisbon[1] is None and berlin[2] == lisbon[3] and berlin[1] == t0 + 2 * DAY
        profile = await ask(mesh, "profile_get", "u1")
        assert profile.user_profile is not None and profile.user_profile["location"] == "Lisbon"
    # another user's slot is untouched
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id <> 'u1'") == 0


async def test_concurrent_ingest_of_one_fact_never_duplicates_it(mesh: Mesh) -> None:
    ts = time.time()
    updates = [update("u1", "I love pottery and I work at Acme.", ts + i) for i in range(24)]
    async with running(service(mesh, native(mesh))), running(service(mesh, native(mesh))):
        await publish(mesh, *updates)
        await ingested(mesh, "u1", 24)
    # and straight through two backends at once, for the same content from other messages
    a, b = native(mesh), native(mesh)
    more = [update("u1", "I love pottery and I work at Acme.", ts + 100 + i) for i in range(16)]
    results = await asyncio.gather(*(x.ingest(u) for x, u in zip([a, b] * 8, more, strict=True)))
    assert all(results)
    prefs = await rows(mesh, "SELECT content, mentions, jsonb_array_length(sources) FROM ltm_memories"
                             " WHERE user_id = %s AND type = 'preference'", "u1")
    assert prefs == [("User loves pottery", 40, 40)]
    facts = await rows(mesh, "SELECT content, mentions FROM ltm_memories WHERE user_id = %s AND type = 'fact'", "u1")
    assert facts == [("User works at Acme", 40)]
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s AND type = 'episodic'", "u1") == 1
    assert await mesh.count("SELECT count(*) FROM ltm_entities WHERE user_id = %s AND name_norm = 'acme'", "u1") == 1
    assert await mesh.count("SELECT count(*) FROM ltm_relations WHERE user_id = %s", "u1") == 2


async def test_how_a_thing_is_now_never_supersedes_what_it_is(mesh: Mesh) -> None:
    """"My sister is sick" once superseded "my sister is a nurse" (one slot, "my sister"): what she is and how she
    is now are two slots; a state supersedes the state before it."""
    backend = native(mesh)
    t0 = time.time() - 30 * DAY
    for i, text in enumerate(("My sister is a nurse.", "My sister is sick.", "My sister is better now.")):
        assert await backend.ingest(update("u1", text, t0 + i * DAY))
    held = dict(await rows(mesh, "SELECT content, valid_to IS NULL FROM ltm_memories WHERE user_id = %s"
                                 " AND type = 'fact'", "u1"))
    assert held == {"User's sister is a nurse": True, "User's sister is sick": False,
                    "User's sister is better": True}, held
    profile = await backend.profile_get("u1")
    assert profile["attributes"] == {"sister": "nurse", "sister (state)": "better"}, profile


async def test_consolidation_merges_near_duplicates_and_keeps_provenance(mesh: Mesh) -> None:
    backend = native(mesh)
    ts = time.time() - DAY
    first = update("u1", "I love hiking in the mountains.", ts)
    second = update("u1", "I love hiking in mountains.", ts + 60)
    other = update("u1", "I love baking sourdough bread.", ts + 120)
    for u in (first, second, other):
        assert await backend.ingest(u)
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s AND type = 'preference'",
                            "u1") == 3
    result = await backend.optimize("u1")
    assert result["status"] == "done" and result["consolidated"] == 1
    prefs = await rows(mesh, "SELECT memory_id, content, mentions, sources FROM ltm_memories"
                             " WHERE user_id = %s AND type = 'preference' ORDER BY content", "u1")
    assert prefs[0][1] == "User loves baking sourdough bread"
    kept = prefs[1]
    assert kept[2] == 2 and {s["message_id"] for s in kept[3]} == {first.message_id, second.message_id}
    archived = await rows(mesh, "SELECT reason, merged_into, row ->> 'content' FROM ltm_archive WHERE user_id = %s",
                          "u1")
    assert len(archived) == 1 and archived[0][0] == "merged" and archived[0][1] == kept[0]
    assert {archived[0][2], kept[1]} == {"User loves hiking in the mountains", "User loves hiking in mountains"}
    # the merged memory's entity links moved to the one that stays
    assert await mesh.count("SELECT count(*) FROM ltm_memory_entities WHERE user_id = %s AND memory_id = %s",
                            "u1", kept[0]) >= 2
    # a second run finds nothing more to merge
    assert (await backend.optimize("u1"))["consolidated"] == 0


async def test_consolidation_keeps_statements_that_name_other_dates_or_days(mesh: Mesh) -> None:
    """Two commitments a sentence embedding finds alike (cosine over LTM_CONSOLIDATE_SIMILARITY) but for other
    dates, or "tomorrow" said on two days, are two things to remember: they once merged into one, and the user's
    second appointment was archived. A near repeat with the same particulars still merges."""
    backend = native(mesh)
    ts = time.time() - 10 * DAY
    said = [("I need to call my mom on 8 May.", ts), ("I need to call my mom on 15 May.", ts + 60),
            ("I have to renew my passport tomorrow.", ts), ("I have to renew my passport tomorrow.", ts + 3 * DAY),
            ("I need to water the garden every Sunday.", ts), ("I need to water my garden every Sunday.", ts + 60)]
    for text, at in said:
        assert await backend.ingest(update("u1", text, at))
    held = await rows(mesh, "SELECT type, subject, coalesce(slot_value, ''), meta ->> 'predicate', embedding::text,"
                            " content FROM ltm_memories WHERE user_id = %s AND type <> 'episodic' ORDER BY content",
                      "u1")
    assert len(held) == 6 and len({r[:4] for r in held}) == 1, held  # one group of commitments: type, subject...
    vecs = {r[5]: np.array(json.loads(r[4])) for r in held}

    def cosine(a: str, b: str) -> float:
        [va], [vb] = [v for c, v in vecs.items() if a in c], [v for c, v in vecs.items() if b in c]
        return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))

    # "tomorrow" is resolved to a date at extraction: two days, whatever today's date (matching them by a day's
    # digits failed on the days when one date's number began with the other's)
    first, second = sorted(c for c in vecs if "passport" in c)
    assert first != second
    # alike enough to merge by the embedding alone
    assert min(cosine("8 May", "15 May"), cosine(first, second), cosine("User's garden", "the garden")) >= 0.92
    result = await backend.optimize("u1")
    assert result["consolidated"] == 1, result  # the garden, said twice
    contents = [r[0] for r in await rows(mesh, "SELECT content FROM ltm_memories WHERE user_id = %s"
                                               " AND type = 'commitment'", "u1")]
    assert sum("8 May" in c for c in contents) == 1 and sum("15 May" in c for c in contents) == 1, contents
    assert sum("passport" in c for c in contents) == 2 and len(contents) == 5, contents


async def test_deleting_a_memory_deletes_its_relations_and_the_duplicates_merged_into_it(mesh: Mesh) -> None:
    """The relations a memory states (no foreign key) and the archived rows merged into it (their whole content)
    went on with it; a chain of merges (an older duplicate merged into one archived later) goes too. Only the
    user's own rows: another user's are never touched."""
    backend = native(mesh)
    ts = time.time() - DAY
    for i, text in enumerate(("I love hiking in the mountains.", "I love hiking in mountains.",
                              "I love baking sourdough bread.")):
        assert await backend.ingest(update("u1", text, ts + 60 * i))
    assert (await backend.optimize("u1"))["consolidated"] == 1
    [(kept, archived)] = await rows(mesh, "SELECT merged_into, memory_id FROM ltm_archive WHERE user_id = %s", "u1")
    older, foreign = uuid.uuid4(), uuid.uuid4()
    async with mesh.pool.connection() as conn:  # an older merge into the archived one; another user's row
        await conn.execute("INSERT INTO ltm_archive (user_id, memory_id, reason, merged_into, row)"
                           " VALUES ('u1', %s, 'merged', %s, '{\"content\": \"I love hiking.\"}'),"
                           " ('u2', %s, 'merged', %s, '{}')", (older, archived, foreign, kept))
    relations = "SELECT count(*) FROM ltm_relations WHERE user_id = %s AND memory_id = %s"
    assert await mesh.count(relations, "u1", kept) >= 1
    others = await mesh.count("SELECT count(*) FROM ltm_relations WHERE user_id = %s", "u1") \
        - await mesh.count(relations, "u1", kept)
    assert others >= 1  # the bread's

    await backend.delete("u1", str(kept))
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s AND memory_id = %s", "u1", kept) == 0
    assert await mesh.count(relations, "u1", kept) == 0
    assert await mesh.count("SELECT count(*) FROM ltm_relations WHERE user_id = %s", "u1") == others
    assert await mesh.count("SELECT count(*) FROM ltm_archive WHERE user_id = %s", "u1") == 0
    assert await rows(mesh, "SELECT memory_id FROM ltm_archive WHERE user_id = %s", "u2") == [(foreign,)]


async def test_decay_orders_by_age_and_disuse(mesh: Mesh) -> None:
    backend = native(mesh, ltm_decay_half_life_days=30)
    now = time.time()
    for text, ts in [("I love fresh figs.", now - 200 * DAY), ("I love green tea.", now - DAY),
                     ("I love old maps.", now - 200 * DAY), ("I live in Oslo.", now - 300 * DAY),
                     ("I live in Bergen.", now - 250 * DAY)]:
        assert await backend.ingest(update("u1", text, ts))
    maps = await rows(mesh, "SELECT memory_id::text FROM ltm_memories WHERE user_id = %s AND content = %s",
                      "u1", "User loves old maps")
    backend.store.record_access("u1", [maps[0][0]] * 20)  # used often, lately
    await backend.store.flush_access()
    await backend.optimize("u1")
    decay = dict(await rows(mesh, "SELECT content, decay FROM ltm_memories WHERE user_id = %s AND type <> 'episodic'"
                                  " AND type <> 'entity'", "u1"))
    # same age: the one in use keeps its strength; same use: the newer one is stronger
    assert decay["User loves old maps"] > decay["User loves fresh figs"]
    assert decay["User loves green tea"] > decay["User loves fresh figs"]
    assert decay["User lives in Oslo"] < decay["User lives in Bergen"]  # older and superseded
    assert min(decay.values()) >= 0.0 and max(decay.values()) <= 1.0
    # a pass right after another rewrites no row whose value did not move (lifecycle.DECAY_STEP)
    assert await backend.lifecycle.decay("u1") == 0
    figs = await rows(mesh, "SELECT memory_id::text FROM ltm_memories WHERE user_id = %s AND content = %s",
                      "u1", "User loves fresh figs")
    backend.store.record_access("u1", [figs[0][0]])
    await backend.store.flush_access()
    assert await backend.lifecycle.decay("u1") == 1  # the old memory just used, only


async def test_budgeted_cleanup_archives_the_lowest_value_first(mesh: Mesh) -> None:
    backend = native(mesh, ltm_memory_budget=6, ltm_cleanup_batch=3)
    now = time.time()
    assert await backend.ingest(update("u1", "Always answer in French.", now - 400 * DAY))
    for i, text in enumerate(["ok", "sure thing", "nice", "haha", "fine", "cool", "right", "great"]):
        assert await backend.ingest(update("u1", text, now - (300 - 30 * i) * DAY))
    total = await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s", "u1")
    first = await backend.optimize("u1")
    assert first["archived"] == 3 and first["memories"] == total - 3
    archived = [r[0] for r in await rows(mesh, "SELECT row ->> 'content' FROM ltm_archive WHERE user_id = %s"
                                               " AND reason = 'budget'", "u1")]
    # the oldest go first: the instruction's turn and entity (400 days), then the oldest small talk
    assert sorted(archived) == ["Always answer in French.", "French (language)", "ok"]
    while (await backend.optimize("u1"))["archived"]:
        pass
    # down to the budget; the instruction itself is never cleaned up, however old
    left = {r[0] for r in await rows(mesh, "SELECT content FROM ltm_memories WHERE user_id = %s", "u1")}
    assert left == {"User instructs: Always answer in French", "haha", "fine", "cool", "right", "great"}


async def test_an_optimize_ending_after_the_users_deletion_writes_nothing_back(mesh: Mesh) -> None:
    backend = native(mesh)
    assert await backend.ingest(update("u-late", "I love chess.", time.time()))
    consolidate = backend.lifecycle.consolidate

    async def deleted_meanwhile(user_id: str) -> int:
        merged = await consolidate(user_id)
        await backend.store.delete_user(user_id)  # the user's deletion lands while the optimize runs
        return merged

    backend.lifecycle.consolidate = deleted_meanwhile  # type: ignore[method-assign]
    assert (await backend.optimize("u-late"))["status"] == "done"
    assert await mesh.count("SELECT count(*) FROM ltm_user_state WHERE user_id = %s", "u-late") == 0
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s", "u-late") == 0


async def test_optimize_runs_for_one_user_at_a_time(mesh: Mesh) -> None:
    a, b = native(mesh), native(mesh)
    assert await a.ingest(update("u1", "I love chess.", time.time()))
    entered, release = asyncio.Event(), asyncio.Event()
    original = a.lifecycle.run_unlocked

    async def slow(user_id: str) -> dict[str, Any]:
        entered.set()
        await release.wait()
        return await original(user_id)

    a.lifecycle.run_unlocked = slow  # type: ignore[method-assign]
    first = asyncio.create_task(a.optimize("u1"))
    await asyncio.wait_for(entered.wait(), 10)
    assert (await b.optimize("u1"))["status"] == "busy"  # another worker, same user: refused
    assert (await b.optimize("u2"))["status"] == "done"  # another user is not blocked
    key = mesh.names.lock("ltm", "optimize", "u1")
    assert 0 < await mesh.redis.pttl(key) <= 120_000
    # a release with another token does not free the lock
    assert await RedisLock(mesh.redis, key, 1000).release() is False and await mesh.redis.exists(key)
    release.set()
    assert (await first)["status"] == "done"
    assert not await mesh.redis.exists(key)
    assert (await b.optimize("u1"))["status"] == "done"


async def test_lock_watchdog_keeps_a_long_run_locked(mesh: Mesh) -> None:
    key = mesh.names.lock("ltm", "optimize", "u1")
    lock = RedisLock(mesh.redis, key, 1000)
    async with lock.held() as ok:
        assert ok and not await RedisLock(mesh.redis, key, 1000).acquire()
        await mesh.redis.pexpire(key, 400)  # as if most of the TTL had run out

        async def refreshed() -> bool:
            return await mesh.redis.pttl(key) > 500

        await wait_until(refreshed, timeout=5, message="the watchdog extends the TTL")
        assert await RedisLock(mesh.redis, key, 1000).extend() is False  # only the holder's token extends
    assert not await mesh.redis.exists(key)


async def test_periodic_job_optimises_recently_active_users(mesh: Mesh) -> None:
    backend = native(mesh, ltm_optimize_interval_s=0.5)
    other = native(mesh, ltm_optimize_interval_s=0.5)
    optimised_at = "SELECT last_optimized_at FROM ltm_user_state WHERE user_id = %s"
    async with running(service(mesh, backend, ltm_maintenance_s=0.05)), \
            running(service(mesh, other, ltm_maintenance_s=0.05)):
        await publish(mesh, update("u1", "I love jazz.", time.time()), update("u2", "I love rock.", time.time()))

        async def optimised() -> bool:
            return await mesh.count("SELECT count(*) FROM ltm_user_state WHERE last_optimized_at IS NOT NULL") == 2

        await wait_until(optimised, timeout=30, message="both users optimised by the periodic job")
        first = (await rows(mesh, optimised_at, "u1"))[0][0]
        # new activity makes the user due again (after the interval), an idle user is left alone
        idle = (await rows(mesh, optimised_at, "u2"))[0][0]
        await publish(mesh, update("u1", "I love blues.", time.time()))

        async def again() -> bool:
            return (await rows(mesh, optimised_at, "u1"))[0][0] > first

        await wait_until(again, timeout=30, message="u1 optimised again after new activity")
        assert (await rows(mesh, optimised_at, "u2"))[0][0] == idle
        resp = await ask(mesh, "optimize", "u1")
        assert resp.success and resp.data is not None and resp.data["status"] in ("done", "busy")
    assert await backend.lifecycle.due_users() == []


async def test_optimize_needs_the_lock(mesh: Mesh) -> None:
    backend = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model),
                            settings=LtmSettings(**common(mesh.redis_url, mesh.database_url)))
    async with running(service(mesh, backend)):
        resp = await ask(mesh, "optimize", "u1")
    assert not resp.success and resp.error is not None and resp.error.code == "unknown_type"


async def test_a_memory_dated_decades_back_decays_without_failing_the_optimize(mesh: Mesh) -> None:
    backend = native(mesh)
    for i, ts in enumerate((1_262_304_000.0, 0.0)):  # 2010-01-01, and the epoch's edge (before it: refused)
        assert await backend.ingest(update("u-old", f"I planted an oak tree number {i}.", ts))
    resp = await backend.optimize("u-old")
    assert resp["status"] == "done"
    decays = [r[0] for r in await rows(mesh, "SELECT decay FROM ltm_memories WHERE user_id = 'u-old'")]
    assert decays and all(d is not None and 0.0 <= d <= 1.0 for d in decays)


async def test_one_users_failed_optimize_does_not_stop_the_round_for_the_others(mesh: Mesh) -> None:
    backend = native(mesh, ltm_optimize_interval_s=0.5)
    for user in ("u-bad", "u-good"):
        assert await backend.ingest(update(user, "I love jazz.", time.time()))
        await backend.lifecycle.touch(user)
    real = backend.lifecycle.consolidate

    async def consolidate(user_id: str) -> int:  # a fault injected for one user: any non-passing error
        if user_id == "u-bad":
            raise ValueError("broken for this user")
        return await real(user_id)

    backend.lifecycle.consolidate = consolidate  # type: ignore[method-assign]
    results = {r["user_id"]: r["status"] for r in await backend.lifecycle.periodic()}
    assert results == {"u-bad": "failed", "u-good": "done"}
    assert await backend.lifecycle.due_users() == []  # the failed one waits for the interval, like the others
