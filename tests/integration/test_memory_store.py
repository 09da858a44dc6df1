"""The conversation store on the real servers: schema, triggers, migrations, every API method, user isolation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from services.memory.api import MemoryApi
from services.memory.store import Conflict, NotFound, StoredMessage
from shared.contracts.errors import MeshError
from shared.contracts.memory_api import StoreMessageData
from shared.runtime.db import migrate, migration_files
from tests.helpers import Mesh
from tests.pg_schema import MEMORY_TABLES, empty_database, schema_of, schema_of_url

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "memory" / "migrations"
KEY = Fernet.generate_key().decode()


def api_of(mesh: Mesh, **kw: object) -> MemoryApi:
    return mesh.memory(memory_encryption_key=KEY, **kw).api


def msg(session_id: str, user_id: str | None, i: int, role: str = "human", content: str | None = None,
        ts: float | None = None) -> StoredMessage:
    return StoredMessage(message_id=f"{session_id}-m{i}", session_id=session_id, user_id=user_id, role=role,
                         content=content or f"message number {i} about the garden", timestamp=ts or 1_700_000_000 + i)


async def row(mesh: Mesh, sql: str, *params: object) -> tuple[object, ...]:
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(sql, params)
        r = await cur.fetchone()
    assert r is not None, sql
    return tuple(r)


# ---------------------------------------------------------------------------------------------- schema
async def test_migrations_are_recorded_and_safe_to_run_again(mesh: Mesh, database_url: str,
                                                              pg_admin_url: str) -> None:
    assert await migrate(database_url, "memory", MIGRATIONS) == []  # the template applied them already
    versions = await row(mesh, "SELECT array_agg(version ORDER BY version) FROM schema_migrations"
                               " WHERE component = 'memory'")
    assert versions[0] == [v for v, _ in migration_files(MIGRATIONS)] and versions[0][:4] == [1, 2, 3, 4]
    # Every file is idempotent on its own, not only because schema_migrations skips it: on an empty database
    # each file runs twice before the next one (the schema it was written for), and the newest runs twice more on
    # the migrated database. (002 again after 004 is not such a case: 004 rebuilt the tables 002's triggers were
    # written for, and 002 would put those triggers back.)
    with empty_database(pg_admin_url) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for path in sorted(MIGRATIONS.glob("*.sql")):
            conn.execute(path.read_text().encode())
            conn.execute(path.read_text().encode())
        assert schema_of(conn, MEMORY_TABLES) == schema_of_url(database_url, MEMORY_TABLES)
    with psycopg.connect(database_url, autocommit=True) as conn:
        newest = sorted(MIGRATIONS.glob("*.sql"))[-1]
        conn.execute(newest.read_text().encode())
        conn.execute(newest.read_text().encode())
    for table in ("conversation_context", "user_preferences", "session_relationships", "session_summary",
                  "user_deletions"):
        assert await mesh.count("SELECT count(*) FROM information_schema.tables WHERE table_name = %s", table) == 1


async def test_triggers_keep_last_activity_and_session_summary_current(mesh: Mesh) -> None:
    api = api_of(mesh)
    await api.create_session("u1", "s1")
    before = await api.store.get_session_summary("u1", "s1")
    assert before.message_count == 0 and before.total_tokens == 0
    await api.record(msg("s1", "u1", 1, "human", "I moved to Porto last spring.", ts=2_000_000_000.0))
    await api.record(msg("s1", "u1", 2, "ai", "Porto is lovely in spring.", ts=2_000_000_010.0))
    await api.record(msg("s1", "u1", 3, "system", "note", ts=2_000_000_005.0))
    s = await api.store.get_session_summary("u1", "s1")
    assert (s.message_count, s.human_count, s.ai_count, s.system_count) == (3, 1, 1, 1)
    tokens = await mesh.count("SELECT sum(token_count) FROM conversation_messages WHERE session_id = 's1'")
    assert tokens > 10 and s.total_tokens == tokens
    assert s.last_activity == pytest.approx(2_000_000_010.0)
    session = await api.store.get_session("u1", "s1")
    assert session.last_activity == pytest.approx(2_000_000_010.0)  # moved by the message trigger
    # deleting a message takes it out of the counts
    async with mesh.pool.connection() as conn:
        await conn.execute("DELETE FROM conversation_messages WHERE message_id = 's1-m2'")
    s = await api.store.get_session_summary("u1", "s1")
    assert (s.message_count, s.ai_count) == (2, 0) and s.total_tokens < tokens
    # a context write counts as activity too
    await mesh.count("UPDATE conversation_sessions SET last_activity = to_timestamp(0) WHERE session_id = 's1'"
                     " RETURNING 1")
    await api.store.store_context("u1", "s1", "project", "name", "garden")
    assert (await api.store.get_session("u1", "s1")).last_activity > time.time() - 60


async def test_deleting_a_session_cascades_everywhere(mesh: Mesh) -> None:
    api = api_of(mesh)
    await api.create_session("u1", "a")
    await api.create_session("u1", "b")
    await api.record(msg("a", "u1", 1))
    await api.store.store_context("u1", "a", "conversation", "topic", {"x": 1})
    await api.store.link_sessions("u1", "a", "b", "continues", 0.8)
    await api.delete_session("u1", "a")
    for table, col in (("conversation_messages", "session_id"), ("conversation_context", "session_id"),
                       ("session_summary", "session_id"), ("session_relationships", "source_session_id")):
        assert await mesh.count(f"SELECT count(*) FROM {table} WHERE {col} = 'a'") == 0, table
    assert await mesh.redis.exists(mesh.names.stm_turns("a"), mesh.names.stm_meta("a")) == 0
    with pytest.raises(NotFound):
        await api.get_session("u1", "a")
    assert (await api.get_session("u1", "b")).session_id == "b"


# ---------------------------------------------------------------------------------------------- API
async def test_sessions_create_get_update_list(mesh: Mesh) -> None:
    api = api_of(mesh)
    s = await api.create_session("u1", name="Trip planning", type_="project", metadata={"lang": "en"})
    assert s.user_id == "u1" and s.name == "Trip planning" and s.type == "project" and s.metadata == {"lang": "en"}
    again = await api.create_session("u1", s.session_id, name="ignored")
    assert again.session_id == s.session_id and again.name == "Trip planning"  # idempotent for its owner
    updated = await api.update_session_activity("u1", s.session_id, status="archived", metadata={"k": 2},
                                                relevance_score=0.4)
    assert updated.status == "archived" and updated.metadata == {"lang": "en", "k": 2}
    assert updated.relevance_score == pytest.approx(0.4) and updated.last_activity >= s.last_activity
    other = await api.create_session("u1", "s-2")
    listed = await api.get_user_sessions("u1", limit=10)
    assert {x.session_id for x in listed} == {"s-2", s.session_id}
    assert [x.session_id for x in await api.get_user_sessions("u1", 10, status="archived")] == [s.session_id]
    assert len(await api.get_user_sessions("u1", limit=1)) == 1
    assert other.status == "active"


async def test_messages_store_get_paginate(mesh: Mesh) -> None:
    api = api_of(mesh)
    await api.create_session("u1", "s1")
    stored = await api.store_message("u1", StoreMessageData(session_id="s1", content="Hello, I am Ada.",
                                                            metadata={"lang": "en"}))
    assert stored.role == "human" and stored.message_index == 0 and stored.token_count > 0
    for i in range(1, 10):
        await api.store_message("u1", StoreMessageData(session_id="s1", content=f"turn {i}",
                                                       role="ai" if i % 2 else "human", timestamp=time.time() + i))
    page = await api.get_messages("u1", "s1", limit=3, offset=2)
    assert [m.message_index for m in page] == [2, 3, 4]
    newest = await api.get_messages("u1", "s1", limit=2, newest_first=True)
    assert [m.content for m in newest] == ["turn 9", "turn 8"]
    assert await api.get_messages("u1", "s1", limit=5, offset=50) == []
    # storing the same message id twice stores it once
    dup = StoreMessageData(session_id="s1", content="once", message_id="fixed-id")
    await api.store_message("u1", dup)
    await api.store_message("u1", dup)
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE message_id = 'fixed-id'") == 1
    # a message for a new session id creates the session for its user
    await api.store_message("u1", StoreMessageData(session_id="fresh", content="hi there"))
    assert (await api.get_session("u1", "fresh")).message_count == 1


async def test_the_background_embedding_steps_aside_for_messages_and_requests(mesh: Mesh) -> None:
    """Under load the background embedding of stored messages waits for its turn (MEMORY_EMBED_YIELD_MS) outside its
    lock, so a search_messages meanwhile embeds what it needs at once; released, the background does the rest.
    (With MEMORY_CARRY_VECTORS, the default, the write path embeds published messages; the background job embeds
    the rest: imports, and any message whose pass failed.)"""
    service = mesh.memory(memory_encryption_key=KEY, memory_embed_yield_ms=60_000, memory_carry_vectors=False)
    api = service.api
    for i, text in enumerate(("I keep bees on the roof.", "My bees made honey this summer.")):
        await api.store_message("u-bg", StoreMessageData(session_id="bg", content=text))
        await api.store_message("u-bg-other", StoreMessageData(session_id="bg-other", content=f"{text} ({i})"))
    unembedded = "SELECT count(*) FROM conversation_messages WHERE user_id = %s AND embedding IS NULL"
    with service.foreground.serving():  # a message being stored, a request being served
        background = asyncio.create_task(service._embed_pending())
        hits = await asyncio.wait_for(api.search_messages("u-bg", "honey from my bees", limit=1), 30)
        assert hits and "honey" in hits[0].content
        assert service.metrics.get("background.yielded") >= 1 and not background.done()
        assert await mesh.count(unembedded, "u-bg-other") == 2  # the background has not run a pass yet
    assert await asyncio.wait_for(background, 30) == 2  # the other user's two, once nothing is served
    assert await mesh.count(unembedded, "u-bg-other") == 0


@pytest.mark.parametrize("carry", [True, False])
async def test_semantic_search_over_messages(mesh: Mesh, carry: bool) -> None:
    """Embedded as stored (MEMORY_CARRY_VECTORS) or at the search, only the searcher's messages (without)."""
    api = api_of(mesh, memory_carry_vectors=carry)
    for sid, text in (("s1", "My sister Maria lives in Barcelona and teaches piano."),
                      ("s1", "The weather was rainy all week."),
                      ("s2", "I am allergic to peanuts, so no satay for me.")):
        await api.store_message("u1", StoreMessageData(session_id=sid, content=text))
    await api.store_message("u2", StoreMessageData(session_id="other", content="Peanut allergy here as well."))
    hits = await api.search_messages("u1", "food allergies", limit=2)
    assert hits[0].content.startswith("I am allergic") and hits[0].similarity and hits[0].similarity > 0.3
    assert all(h.session_id in ("s1", "s2") for h in hits)  # never the other user's message
    in_s1 = await api.search_messages("u1", "food allergies", session_id="s1", limit=5)
    assert {h.session_id for h in in_s1} == {"s1"}
    strict = await api.search_messages("u1", "who teaches music?", threshold=0.35)
    assert strict and all((h.similarity or 0) >= 0.35 for h in strict) and "Maria" in strict[0].content
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE embedding IS NULL") == (0 if carry
                                                                                                    else 1)  # u2's


async def test_context_merge_get_and_expiry_cleanup(mesh: Mesh) -> None:
    api = api_of(mesh)
    await api.create_session("u1", "s1")
    st = api.store
    await st.store_context("u1", "s1", "project", "plan", {"goal": "garden", "budget": 100})
    merged = await st.store_context("u1", "s1", "project", "plan", {"budget": 150, "deadline": "May"},
                                    relevance_score=0.9)
    assert merged.value == {"goal": "garden", "budget": 150, "deadline": "May"}
    replaced = await st.store_context("u1", "s1", "project", "plan", {"only": True}, merge=False)
    assert replaced.value == {"only": True}
    await st.store_context("u1", "s1", "preference", "tone", "friendly", relevance_score=0.5)
    await st.store_context("u1", "s1", "conversation", "scratch", [1, 2], ttl_seconds=3600)
    assert {c.key for c in await st.get_context("u1", "s1")} == {"plan", "tone", "scratch"}
    assert [c.key for c in await st.get_context("u1", "s1", "preference")] == ["tone"]
    # expire one entry (in the database: no waiting), then it is hidden and cleaned up
    await mesh.count("UPDATE conversation_context SET expires_at = now() - interval '1 second'"
                     " WHERE key = 'scratch' RETURNING 1")
    assert "scratch" not in {c.key for c in await st.get_context("u1", "s1")}
    assert await st.cleanup_expired_data("u2") == {"context": 0}  # another user's sweep does not touch it
    assert await st.cleanup_expired_data("u1") == {"context": 1}
    assert await mesh.count("SELECT count(*) FROM conversation_context WHERE key = 'scratch'") == 0


async def test_links_and_preferences(mesh: Mesh) -> None:
    api = api_of(mesh)
    await api.create_session("u1", "a")
    await api.create_session("u1", "b")
    await api.create_session("u2", "c")
    link = await api.store.link_sessions("u1", "a", "b", "follow_up", 0.7)
    assert (link.source_session_id, link.target_session_id, link.strength) == ("a", "b", pytest.approx(0.7))
    assert [lk.target_session_id for lk in await api.store.session_links("u1", "b")] == ["b"]
    with pytest.raises(NotFound):
        await api.store.link_sessions("u1", "a", "c", "steal", 1.0)  # c is u2's
    with pytest.raises(Conflict):
        await api.store.link_sessions("u1", "a", "a", "self", 1.0)
    await api.store.set_preference("u1", "units", "metric")
    await api.store.set_preference("u1", "health", {"condition": "asthma"}, sensitive=True)
    assert await api.store.get_preferences("u1") == {"health": {"condition": "asthma"}, "units": "metric"}
    assert await api.store.get_preferences("u1", ["units"]) == {"units": "metric"}
    assert await api.store.get_preferences("u2") == {}
    raw = await row(mesh, "SELECT value, value_encrypted::text FROM user_preferences WHERE key = 'health'")
    assert raw[0] is None and "asthma" not in str(raw[1])  # only ciphertext at rest
    # another key cannot read it
    other = api_of(mesh).store
    other.cipher = type(api.store.cipher)(Fernet.generate_key().decode(), None)  # type: ignore[call-arg,misc]
    with pytest.raises(MeshError, match="cannot be decrypted"):  # answered as internal, with this message
        await other.get_preferences("u1")


async def test_every_session_call_of_another_user_is_not_found(mesh: Mesh) -> None:
    api = api_of(mesh)
    await api.create_session("alice", "private")
    await api.record(msg("private", "alice", 1, content="My PIN is 4321."))
    st = api.store
    calls = [
        api.get_session("bob", "private"),
        api.get_messages("bob", "private"),
        api.store_message("bob", StoreMessageData(session_id="private", content="intrusion")),
        st.store_context("bob", "private", "conversation", "k", 1),
        st.get_context("bob", "private"),
        api.update_session_activity("bob", "private", status="hijacked"),
        api.delete_session("bob", "private"),
        api.get_session_summary("bob", "private"),
        api.get_stm("bob", "private"),
        st.link_sessions("bob", "private", "private2", "x", 1.0),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            await call
    with pytest.raises(Conflict):  # the id is taken; nothing about the session is revealed
        await api.create_session("bob", "private")
    assert await api.get_user_sessions("bob") == []
    assert await api.search_messages("bob", "PIN") == []
    assert (await api.get_session("alice", "private")).status == "active"
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE session_id = 'private'") == 1


async def test_session_reads_are_cached_and_invalidated_on_write(mesh: Mesh) -> None:
    svc = mesh.memory(memory_encryption_key=KEY)
    api = svc.api
    await api.create_session("u1", "s1", name="first")
    assert (await api.get_session("u1", "s1")).name == "first"
    # A change behind the API's back is not seen while the entry lives: the read is served from Redis.
    await mesh.count("UPDATE conversation_sessions SET name = 'behind' WHERE session_id = 's1' RETURNING 1")
    assert (await api.get_session("u1", "s1")).name == "first"
    assert svc.metrics.get("cache.hit") >= 1
    # A write through the API invalidates: the next read is fresh.
    await api.record(msg("s1", "u1", 1))
    fresh = await api.get_session("u1", "s1")
    assert fresh.name == "behind" and fresh.message_count == 1
    summary = await api.get_session_summary("u1", "s1")
    assert summary.message_count == 1
    await api.record(msg("s1", "u1", 2))
    assert (await api.get_session_summary("u1", "s1")).message_count == 2
    # the per-user list is cached by the user's generation
    assert [s.session_id for s in await api.get_user_sessions("u1")] == ["s1"]
    await api.create_session("u1", "s2")
    assert {s.session_id for s in await api.get_user_sessions("u1")} == {"s1", "s2"}
    ttl = await mesh.redis.ttl(mesh.names.cache("memory", "gen", "s1"))
    assert 0 < ttl <= 4 * svc.settings.memory_cache_ttl_s


async def test_a_summary_fold_invalidates_the_cached_session_reads(mesh: Mesh) -> None:
    """The fold runs in the background after the write that evicted its turn, and the write's own invalidation:
    reads cached in between (context_summary, summary_turns) are made stale when the fold saves the summary."""
    svc = mesh.memory(memory_encryption_key=KEY, stm_max_messages=2, memory_summary_delay_ms=300)
    api = svc.api
    await api.create_session("u1", "s1")
    await api.record(msg("s1", "u1", 0, content="I live in Lisbon and I work at the Oceanario."))
    await api.record(msg("s1", "u1", 1, role="ai"))
    await svc.stm.drain()
    await api.record(msg("s1", "u1", 2))  # turn 0 leaves the window; its fold waits MEMORY_SUMMARY_DELAY_MS
    # read (and cached) between the write and the fold
    assert not (await api.get_session("u1", "s1")).context_summary
    assert (await api.get_session_summary("u1", "s1")).summary_turns == 0
    assert not (await api.get_user_sessions("u1"))[0].context_summary
    await svc.stm.drain()
    assert "Lisbon" in ((await api.get_session("u1", "s1")).context_summary or "")
    assert (await api.get_session_summary("u1", "s1")).summary_turns == 1
    assert "Lisbon" in ((await api.get_user_sessions("u1"))[0].context_summary or "")
