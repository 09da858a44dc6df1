"""The tables hash-partitioned by user_id (ltm migration 006, memory migration 004; docs/partitioning.md).

(a) a fresh database has them partitioned, with their partition count, and the one-row-per-user and global tables
plain; the count can be chosen before the first migration only; (b) a database made by the older migrations, with
rows of several users written by the services' own code (and by SQL for the old conversation schema), is converted
in place: every row is still there, the schema is the fresh one, and running the migrations again changes nothing;
(c) the per-user statements of the services, captured as executed (auto_explain), each touch one partition.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from services.ltm.config import LtmSettings
from services.ltm.native import NativeBackend
from services.ltm.store import LtmStore
from services.memory.config import MemorySettings
from services.memory.service import MemoryService
from services.memory.store import Conflict, ConversationStore, SessionOwnershipError, StoredMessage
from shared.contracts import MemoryUpdate, Names
from shared.contracts.memory_api import ImportMessage, StoreMessageData
from shared.contracts.messages import SearchData, SearchEntitiesData
from shared.runtime.db import migrate, migration_files, open_pool
from shared.runtime.embedding import Embedder
from tests.helpers import Mesh, common
from tests.pg_schema import LTM_TABLES, MEMORY_TABLES, empty_database, schema_of, schema_of_url

ROOT = Path(__file__).resolve().parents[2]
DIRS = {"ltm": ROOT / "services" / "ltm" / "migrations", "memory": ROOT / "services" / "memory" / "migrations"}
OLD = {"ltm": 5, "memory": 3}  # the last versions before the partitioning
# today's write path seeds the old schema, so that schema also gets the columns it writes that came later: the
# salience of ltm 009 and content_tokens of 010 (columns added at the end, where a fresh database has them too), and
# the search index's deletion log of 012 (the optimize prunes it; born partitioned)
ALSO = {"ltm": {9, 10, 12}, "memory": set()}
PARTITIONED = {
    "ltm_memories": "user_id", "ltm_entities": "user_id", "ltm_relations": "user_id", "ltm_memory_entities": "user_id",
    "ltm_ingested": "user_id", "ltm_archive": "user_id", "conversation_sessions": "user_id",
    "conversation_messages": "user_id", "conversation_context": "user_id", "session_summary": "user_id",
    "session_relationships": "user_id", "conversation_session_ids": "session_id",
    "ltm_documents": "user_id", "ltm_doc_chunks": "user_id", "ltm_search_deletions": "user_id",
}
# made after 006 (by 007 and 012), partitioned from the start
BORN_PARTITIONED = {"ltm_documents", "ltm_doc_chunks", "ltm_search_deletions"}
PLAIN = ("ltm_profiles", "ltm_user_state", "ltm_search_epochs", "user_preferences", "user_deletions",
         "schema_migrations")
ALL_TABLES = (*LTM_TABLES, *MEMORY_TABLES)
BASE = 1_700_000_000.0
DUMP = os.environ.get("PARTITION_PLANS_DUMP")  # a file: every statement (c) captured, with the partitions it touched


def layout(url: str) -> dict[str, tuple[str, str, int]]:
    """table -> (strategy, key column, number of partitions), for the partitioned tables of public."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, p.partstrat, a.attname, (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)"
            " FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = p.partattrs[0]"
            " WHERE c.relnamespace = 'public'::regnamespace").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def kinds(url: str, tables: tuple[str, ...]) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                            " AND relname = ANY(%s)", (list(tables),)).fetchall()
    return {r[0]: r[1] for r in rows}


def assert_partitioned(url: str, partitions: int = 16) -> None:
    assert layout(url) == {t: ("h", key, partitions) for t, key in PARTITIONED.items()}
    assert kinds(url, PLAIN) == {t: "r" for t in PLAIN}
    with psycopg.connect(url, autocommit=True) as conn:
        # every index of a partitioned table exists on each of its partitions (pgvector, GIN and partial ones too)
        missing = conn.execute(
            "SELECT pi.relname FROM pg_partitioned_table p JOIN pg_index x ON x.indrelid = p.partrelid"
            " JOIN pg_class pi ON pi.oid = x.indexrelid"
            " WHERE (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = pi.oid) <> %s", (partitions,)).fetchall()
        assert missing == []


# ---------------------------------------------------------------------------------------------- (a) fresh
async def test_a_fresh_database_has_the_per_user_tables_partitioned(database_url: str) -> None:
    assert_partitioned(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # every key of a partitioned table holds its partition key (PostgreSQL insists), so ids are per user
        keys = conn.execute(
            "SELECT c.relname, pg_get_indexdef(x.indexrelid) FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid"
            " WHERE c.relkind = 'p' AND x.indisunique").fetchall()
        assert {t for t, _ in keys} == set(PARTITIONED)
        assert all(f"({PARTITIONED[t]}" in d for t, d in keys), keys
        bounds = conn.execute("SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                              " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'ltm_memories'::regclass"
                              " ORDER BY c.relname").fetchall()
    assert [b[0] for b in bounds] == [f"FOR VALUES WITH (modulus 16, remainder {i})" for i in range(16)]


async def test_the_partition_count_is_chosen_before_the_first_migration(pg_admin_url: str) -> None:
    with empty_database(pg_admin_url) as url:
        await migrate(url + "?options=-c%20mesh.partitions%3D4", "ltm", DIRS["ltm"])
        # the other service follows the count the database has, whatever it is given
        await migrate(url + "?options=-c%20mesh.partitions%3D8", "memory", DIRS["memory"])
        assert_partitioned(url, 4)


# ---------------------------------------------------------------------------------------------- (b) conversion
async def test_two_services_migrating_a_new_database_at_once_both_succeed(pg_admin_url: str) -> None:
    """memory and ltm started together on an empty database: the bookkeeping table is created under the migration
    lock too (it was not: the second CREATE TABLE IF NOT EXISTS failed on pg_type's unique index)."""
    from shared.runtime.db import MIGRATION_LOCK
    from tests.helpers import wait_until

    with empty_database(pg_admin_url) as url:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as holder:
            await holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            both = asyncio.gather(migrate(url, "ltm", DIRS["ltm"]), migrate(url, "memory", DIRS["memory"]))

            async def both_waiting() -> bool:
                cur = await holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                           " AND NOT granted")
                return await cur.fetchone() == (2,)

            await wait_until(both_waiting, message="both migrations waiting for the lock")
            cur = await holder.execute("SELECT to_regclass('schema_migrations') IS NULL")
            assert await cur.fetchone() == (True,)  # nobody created it without the lock
            await holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            ltm, memory = await asyncio.wait_for(both, 120)
        assert ltm == [v for v, _ in migration_files(DIRS["ltm"])]
        assert memory == [v for v, _ in migration_files(DIRS["memory"])]


async def migrate_to(url: str, tmp: Path, versions: dict[str, int]) -> None:
    for component, directory in DIRS.items():
        target = tmp / f"{component}-{versions[component]}"
        target.mkdir(exist_ok=True)
        for path in sorted(directory.glob("*.sql")):
            if int(path.name[:3]) <= versions[component] or int(path.name[:3]) in ALSO[component]:
                shutil.copy(path, target)
        await migrate(url, component, target)


def backend(url: str, pool: Any, model: Any, redis: aioredis.Redis, redis_url: str, names: Names,
            **kw: Any) -> NativeBackend:
    settings = LtmSettings(**{**common(redis_url, url), **kw})
    return NativeBackend(LtmStore(pool, settings.ltm_search_index_rows), Embedder(model), settings=settings,
                         redis=redis, names=names)


TURNS = ["I live in Oslo.", "My sister Anna works at Google.", "I love green tea.", "I moved to Berlin.",
         "I work as a nurse.", "My favourite colour is teal.", "I love old maps.", "We adopted a cat called Miso."]


async def seed_ltm(native: NativeBackend, users: list[str]) -> None:
    """Through ltm's own write path: memories, entities, relations, links, supersession, ingest records; then
    archive rows (a small budget), a profile, access counts and a deletion (a search epoch)."""
    for k, user in enumerate(users):
        for i, text in enumerate(TURNS[: 5 + k]):
            update = MemoryUpdate(user_id=user, content=text, timestamp=BASE + 100 * i,
                                  meta={"session_id": f"{user}-s{i % 2}", "message_id": f"{user}-m{i}"})
            assert await native.ingest(update)
        assert (await native.optimize(user))["status"] == "done"
        await native.profile_update(user, {"name": user.upper()})
        await native.search(user, SearchData(query="Where do I live?"))  # access counts
    await native.store.flush_access()
    await native.delete(users[0], (await native.search(users[0], SearchData(query="green tea")))[0].memory_id)


OLD_MEMORY_SQL = [  # the conversation schema of migrations 001-003 (its triggers count messages and summaries)
    ("INSERT INTO conversation_sessions (session_id, user_id, name, metadata) VALUES (%s, %s, %s, '{\"k\": 1}')",
     [("s-u1-a", "u1", "Trip"), ("s-u1-b", "u1", None), ("s-u2-a", "u2", "Work"), ("s-claimed", None, None),
      ("s-anon", None, None)]),
    ("INSERT INTO conversation_messages (message_id, session_id, user_id, role, content, message_index, timestamp,"
     " token_count) VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), 3)",
     [(f"{s}-m{i}", s, u, "human" if i % 2 == 0 else "ai", f"turn {i} of {s}", i, BASE + i)
      for s, u in (("s-u1-a", "u1"), ("s-u1-b", "u1"), ("s-u2-a", "u2"), ("s-anon", None)) for i in range(4)]
     + [("s-claimed-m0", "s-claimed", None, "human", "before the claim", 0, BASE)]),
    ("UPDATE conversation_sessions SET user_id = %s WHERE session_id = %s", [("u2", "s-claimed")]),  # old claim
    ("INSERT INTO conversation_messages (message_id, session_id, user_id, role, content, message_index, timestamp)"
     " VALUES (%s, %s, %s, 'human', 'after the claim', 1, to_timestamp(%s))", [("s-claimed-m1", "s-claimed", "u2",
                                                                                 BASE + 1)]),
    ("INSERT INTO conversation_context (session_id, context_type, key, value, expires_at)"
     " VALUES (%s, %s, %s, %s, to_timestamp(%s))",
     [("s-u1-a", "project", "trip", '{"to": "Kyoto"}', None), ("s-u2-a", "preference", "tone", '"dry"', BASE)]),
    ("INSERT INTO session_relationships (source_session_id, target_session_id, relation_type, strength)"
     " VALUES (%s, %s, %s, %s)", [("s-u1-a", "s-u1-b", "continues", 0.5), ("s-u2-a", "s-claimed", "related", 1.0)]),
    ("INSERT INTO user_preferences (user_id, key, value) VALUES (%s, %s, %s)", [("u1", "lang", '"en"')]),
    ("UPDATE conversation_sessions SET context_summary = 'so far', summary_state = '{\"turns\": 2}'"
     " WHERE session_id = %s", [("s-u1-a",)]),
]


def rows_of(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every mesh table (partitioned or not), as JSON, sorted."""
    out: dict[str, list[dict[str, Any]]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
            " AND NOT relispartition AND relname LIKE ANY(%s)", (list(ALL_TABLES),)).fetchall()]
        for table in tables:
            rows = conn.execute(sql.SQL("SELECT to_jsonb(t)::text FROM {} t").format(sql.Identifier(table))).fetchall()
            out[table] = sorted((json.loads(r[0]) for r in rows), key=lambda d: json.dumps(d, sort_keys=True))
    return out


def expected_after(before: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """What 004 makes of the conversation rows: a session's user ('' for nobody) on the session and every row of it;
    columns of later migrations are NULL."""
    owner = {s["session_id"]: s["user_id"] or "" for s in before["conversation_sessions"]}
    out = dict(before)
    out["conversation_sessions"] = [{**s, "user_id": owner[s["session_id"]]} for s in before["conversation_sessions"]]
    for table in ("conversation_messages", "conversation_context", "session_summary"):
        out[table] = [{**r, "user_id": owner[r["session_id"]]} for r in before[table]]
    out["conversation_messages"] = [{"salience": None, "embed_failures": 0, **r}  # 006: NULL; 007: 0
                                    for r in out["conversation_messages"]]
    out["session_relationships"] = [{**r, "user_id": owner[r["source_session_id"]]}
                                    for r in before["session_relationships"]]
    out["conversation_session_ids"] = [{"session_id": s, "user_id": u} for s, u in owner.items()]
    return {t: sorted(rows, key=lambda d: json.dumps(d, sort_keys=True)) for t, rows in out.items()}


async def test_an_existing_database_is_converted_in_place_keeping_every_row(
        pg_admin_url: str, database_url: str, tmp_path: Path, sync_embedder: Any, redis: aioredis.Redis,
        redis_url: str, names: Names) -> None:
    with empty_database(pg_admin_url) as url:
        await migrate_to(url, tmp_path, OLD)
        pool = await open_pool(url, max_size=4)
        try:
            await seed_ltm(backend(url, pool, sync_embedder, redis, redis_url, names, ltm_memory_budget=6),
                           ["u1", "u2", "u3"])
        finally:
            await pool.close()
        with psycopg.connect(url, autocommit=True) as conn:
            for statement, params in OLD_MEMORY_SQL:
                for p in params:
                    conn.execute(statement, p)
        before = rows_of(url)
        assert set(layout(url)) == {"ltm_search_deletions"}  # 012 (of ALSO) is born partitioned; nothing else yet
        counts = {t: len(r) for t, r in before.items()}
        assert all(counts[t] > 0 for t in PARTITIONED if t not in {"conversation_session_ids", *BORN_PARTITIONED}), \
            counts
        assert counts["ltm_archive"] > 0 and counts["ltm_relations"] > 0 and counts["ltm_memory_entities"] > 0

        started = time.perf_counter()
        # the conversions, and whatever came after them
        for component, last in OLD.items():
            assert await migrate(url, component, DIRS[component]) == [
                v for v, _ in migration_files(DIRS[component]) if v > last and v not in ALSO[component]]
        seconds = time.perf_counter() - started

        after = {t: r for t, r in rows_of(url).items() if t in before or r}  # later migrations' tables: empty
        assert after == expected_after(before)  # every row, each column as it was (ltm rows: exactly)
        assert_partitioned(url)
        schema = schema_of_url(url, ALL_TABLES)
        assert schema == schema_of_url(database_url, ALL_TABLES)  # the same schema as a fresh database's

        # again: recorded, and each file on its own is a no-op on the converted database
        assert await migrate(url, "ltm", DIRS["ltm"]) == [] and await migrate(url, "memory", DIRS["memory"]) == []
        with psycopg.connect(url, autocommit=True) as conn:
            for component, version in (("ltm", 6), ("memory", 4)):
                path = next(DIRS[component].glob(f"{version:03d}_*.sql"))
                conn.execute(path.read_text().encode())
                assert schema_of(conn, ALL_TABLES) == schema
        assert {t: r for t, r in rows_of(url).items() if t in after or r} == after

        await check_converted(url, sync_embedder, redis, redis_url, names)
    print(f"conversion of {sum(counts.values())} rows: {seconds:.2f} s")


async def check_converted(url: str, model: Any, redis: aioredis.Redis, redis_url: str, names: Names) -> None:
    """The services' code on the converted rows: reads, writes, the ownership of old session ids, ltm search."""
    pool = await open_pool(url, max_size=4)
    try:
        store = ConversationStore(pool)
        assert [m.message_id for m in await store.get_messages("u1", "s-u1-a", 10)] == [f"s-u1-a-m{i}"
                                                                                      for i in range(4)]
        claimed = await store.get_messages("u2", "s-claimed", 10)
        assert [m.content for m in claimed] == ["before the claim", "after the claim"]
        assert (await store.get_session_summary("u1", "s-u1-a")).message_count == 4
        assert [ln.target_session_id for ln in await store.session_links("u2", "s-claimed")] == ["s-claimed"]
        assert await store.store_message(StoredMessage(message_id="new", session_id="s-u1-a", user_id="u1",
                                                       role="human", content="a new turn", timestamp=BASE + 9))
        assert (await store.get_session("u1", "s-u1-a")).message_count == 5
        for intruder, session in (("u2", "s-u1-a"), ("u1", "s-anon"), (None, "s-u2-a")):
            with pytest.raises(SessionOwnershipError):  # the session ids of the old rows are held
                await store.store_message(StoredMessage(message_id=f"x-{uuid.uuid4()}", session_id=session,
                                                        user_id=intruder, role="human", content="hi", timestamp=BASE))
        assert await store.session_owner("s-anon") == (True, None)
        native = backend(url, pool, model, redis, redis_url, names)
        found = await native.search("u2", SearchData(query="Where do I live?"))
        assert found and "Berlin" in " ".join(m.content for m in found)
        await native.delete_user("u3")
        assert {k: v for k, v in (await native.stats("u3")).items() if k in ("memories", "by_type")} == \
            {"memories": 0, "by_type": {}}
    finally:
        await pool.close()


async def test_a_session_id_taken_at_once_by_several_users_goes_to_one(mesh: Mesh) -> None:
    """Session ids are unique across users although each user's sessions are in the user's partition: writers of
    four users creating one id at once (sessions and first messages) leave it to exactly one of them."""
    store = ConversationStore(mesh.pool)

    async def take(i: int) -> str | None:
        user = f"u{i % 4}"
        try:
            if i % 2:
                await store.create_session(user, "contested")
            else:
                await store.store_message(StoredMessage(message_id=f"m{i}", session_id="contested", user_id=user,
                                                        role="human", content="mine", timestamp=BASE + i))
        except (Conflict, SessionOwnershipError):
            return None
        return user

    owners = {u for u in await asyncio.gather(*(take(i) for i in range(16))) if u is not None}
    assert len(owners) == 1
    owner = owners.pop()
    assert await store.session_owner("contested") == (True, owner)
    assert await mesh.count("SELECT count(*) FROM conversation_sessions WHERE session_id = 'contested'") == 1
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE session_id = 'contested'"
                            " AND user_id <> %s", owner) == 0


# ---------------------------------------------------------------------------------------------- (c) one partition
class Plans:
    """The plan of every statement a pool's connections run, nested ones (triggers, foreign-key checks) included:
    auto_explain, logged at NOTICE level, so that the client receives it."""

    SETTINGS = {"log_min_duration": "0", "log_level": "notice", "log_format": "json", "log_nested_statements": "on"}

    def __init__(self) -> None:
        self.plans: list[dict[str, Any]] = []
        self.parent: dict[str, str] = {}  # partition -> its partitioned table

    def _notice(self, diag: psycopg.errors.Diagnostic) -> None:
        text = diag.message_primary or ""
        if " plan:\n" in text:
            self.plans.append(json.loads(text.split(" plan:\n", 1)[1]))

    async def configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await register_vector_async(conn)
        conn.add_notice_handler(self._notice)
        await conn.execute("LOAD 'auto_explain'")
        for name, value in self.SETTINGS.items():
            await conn.execute(sql.SQL("SET auto_explain.{} = {}").format(sql.Identifier(name), sql.Literal(value)))

    async def pool(self, url: str) -> AsyncConnectionPool:
        with psycopg.connect(url, autocommit=True) as conn:
            self.parent = {r[0]: r[1] for r in conn.execute(
                "SELECT c.relname, p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relkind = 'p' AND c.relkind = 'r'").fetchall()}
        pool = AsyncConnectionPool(url, min_size=1, max_size=4, configure=self.configure, open=False,
                                   kwargs={"autocommit": True, "prepare_threshold": None})
        await pool.open(wait=True, timeout=30)
        return pool

    def touched(self, node: dict[str, Any], out: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
        """{partitioned table: the partitions the plan reads or writes}."""
        out = {} if out is None else out
        rel = node.get("Relation Name")
        if rel in self.parent:
            out.setdefault(self.parent[rel], set()).add(rel)
        for child in node.get("Plans", []):
            self.touched(child, out)
        return out

    def check(self, *expected: tuple[str, str]) -> set[str]:
        """Every captured statement touched at most one partition of each table; each (text, table) of
        ``expected`` was run and touched exactly one partition of table. Returns the tables touched."""
        seen: set[str] = set()
        wide = []
        for plan in self.plans:
            parts = self.touched(plan["Plan"])
            seen.update(parts)
            wide += [(plan["Query Text"], sorted(p)) for p in parts.values() if len(p) > 1]
        assert not wide, f"statements that touched several partitions: {wide}"
        if DUMP:
            with open(DUMP, "a") as out:
                for plan in self.plans:
                    parts = {t: sorted(p) for t, p in self.touched(plan["Plan"]).items()}
                    out.write(f"{parts}  {' '.join(plan['Query Text'].split())[:300]}\n")
        for text, table in expected:
            hits = [self.touched(p["Plan"]).get(table) for p in self.plans if text in p["Query Text"]]
            assert hits and all(h is not None and len(h) == 1 for h in hits), (text, table, hits)
        self.plans.clear()
        return seen


async def plans_or_skip(url: str) -> tuple[Plans, AsyncConnectionPool]:
    plans = Plans()
    try:
        return plans, await plans.pool(url)
    except psycopg.Error as exc:  # a server without auto_explain (or a role that may not load it): DATABASE_URL
        pytest.skip(f"auto_explain is not available: {exc}")


async def test_each_statement_of_the_memory_service_touches_one_partition(
        database_url: str, redis: aioredis.Redis, redis_url: str, names: Names) -> None:
    plans, pool = await plans_or_skip(database_url)
    try:
        svc = MemoryService(MemorySettings(**common(redis_url, database_url), stm_max_messages=3), names, redis,
                            ConversationStore(pool))
        api = svc.api
        await api.create_session("u1", "s1", name="plans")
        for i in range(6):  # the STM window is 3: older turns are folded (load_summary, unfolded_turns, save_summary)
            await api.record(StoredMessage(message_id=f"m{i}", session_id="s1", user_id="u1", role="human",
                                           content=f"turn {i} about the garden", timestamp=BASE + i))
        await svc.stm.drain()
        await api.store_message("u1", StoreMessageData(session_id="s2", content="a second session"))
        await api.get_session("u1", "s1")
        await api.get_messages("u1", "s1", limit=10)
        await api.get_session_summary("u1", "s1")
        await api.store.get_message("u1", "m1")
        await api.store.store_context("u1", "s1", "project", "trip", {"to": "Kyoto"})
        await api.store.get_context("u1", "s1")
        await api.store.link_sessions("u1", "s1", "s2", "continues", 0.5)
        await api.store.session_links("u1", "s1")
        await api.store.update_session_activity("u1", "s1", status="active")
        await api.store.get_user_sessions("u1", 10)
        await api.store.cleanup_expired_data("u1")
        await api.search_messages("u1", "garden", limit=3)
        await api.import_messages("u1", [ImportMessage(session_id="s3", role="user", content=f"old turn {i}",
                                                       timestamp=BASE - 100 + i) for i in range(3)])
        await svc.stm.redis.delete(names.stm_turns("s1"), names.stm_meta("s1"), names.stm_summary("s1"))
        await api.get_stm("u1", "s1")  # rebuilt from PostgreSQL
        await api.store.session_owner("s1")
        await api.delete_session("u1", "s2")
        seen = plans.check(
            ('FROM "public"."conversation_sessions" x WHERE', "conversation_sessions"),  # store: the foreign key
            ("UPDATE conversation_sessions SET last_activity", "conversation_sessions"),  # its trigger
            ("FROM conversation_sessions WHERE session_id = $1 AND user_id = $2", "conversation_sessions"),
            ("LEFT JOIN LATERAL (SELECT * FROM conversation_messages", "conversation_messages"),  # session read
            ("LEFT JOIN session_summary ss", "session_summary"),
            ("FROM conversation_messages WHERE user_id = $1 AND session_id = $2", "conversation_messages"),
            ("1 - (m.embedding <=> $1) AS similarity FROM conversation_messages", "conversation_messages"),
            ("FROM conversation_session_ids WHERE session_id = $1", "conversation_session_ids"),
            ("DELETE FROM conversation_sessions", "conversation_sessions"),
        )
        assert {"conversation_sessions", "conversation_messages", "conversation_context", "session_summary",
                "session_relationships", "conversation_session_ids"} <= seen
        await api.delete_user("u1")
        plans.check(("DELETE FROM conversation_messages WHERE user_id = $1", "conversation_messages"))
    finally:
        await pool.close()


async def test_each_statement_of_ltm_touches_one_partition(database_url: str, sync_embedder: Any,
                                                           redis: aioredis.Redis, redis_url: str,
                                                           names: Names) -> None:
    plans, pool = await plans_or_skip(database_url)
    try:
        for rows in (0, 1000):  # searched in SQL, then through the search index (its catch-up reads)
            user = f"u-index-{rows}"
            native = backend(database_url, pool, sync_embedder, redis, redis_url, names, ltm_memory_budget=6,
                             ltm_search_index_rows=rows)
            for i, text in enumerate(TURNS):
                assert await native.ingest(MemoryUpdate(user_id=user, content=text, timestamp=BASE + 100 * i,
                                                        meta={"session_id": "s1", "message_id": f"m{i}"}))
            found = await native.search(user, SearchData(query="Where does my sister work?", source_turns=True))
            await native.store.flush_access()
            await native.search(user, SearchData(query="Where do I live?"))  # the index's catch-up of changed rows
            await native.search_entities(user, SearchEntitiesData(query="Anna"))
            await native.profile_get(user)
            await native.stats(user)
            assert (await native.optimize(user))["status"] == "done"
            await native.delete(user, found[0].memory_id)
            seen = plans.check(
                ("FROM ltm_memories m CROSS JOIN tq", "ltm_memories") if rows == 0 else
                ("FROM ltm_memories m CROSS JOIN LATERAL", "ltm_memories"),  # search candidates (SQL / index load)
                ("FROM ltm_memories h CROSS JOIN LATERAL", "ltm_memories"),  # neighbouring turns
                ("FROM ltm_entities", "ltm_entities"),  # entity lookup
                ("FROM ltm_relations r", "ltm_relations"),
                ("FROM ltm_memory_entities l JOIN ltm_memories m", "ltm_memory_entities"),
                ("UPDATE ltm_memories m SET access_count", "ltm_memories"),
                ("FROM ltm_ingested WHERE user_id = $1", "ltm_ingested"),
                *([("m.txid >= $", "ltm_memories")] if rows else []),  # the index's changes since its last read
                ("DELETE FROM ltm_memories WHERE user_id = $1 AND memory_id = $2", "ltm_memories"),
            )
            assert {"ltm_memories", "ltm_entities", "ltm_relations", "ltm_memory_entities", "ltm_ingested"} <= seen
            await native.delete_user(user)
            plans.check(("DELETE FROM ltm_memories WHERE user_id = $1", "ltm_memories"))
    finally:
        await pool.close()
