"""One deletion that reaches everything (issue "Never loses, never leaks", part 3).

A user chats in two sessions through the three services, sets a sensitive preference, context and a session
link, adds two documents to its collection (issue 11: documents beside memory), searches long-term memory and its
documents, and sends one malformed input (dead-lettered with its raw text); another user chats and adds a
document too. ``mesh delete-user``'s entry point (mesh/forget.py) then deletes the first user, and the test scans
every table of the database and the whole Redis keyspace (key names and values of every type, streams and
dead letters included) for the user's id and for a phrase only that user said: nothing is found. The other user
keeps everything; deleting again is harmless and counts zero; the deletion log names no one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from cryptography.fernet import Fernet

from mesh.forget import forget_user
from shared.contracts import MEMORY_RESPONSE, MEMORY_UPDATE, MemoryResponse, decode, new_id
from shared.contracts.memory_api import MEMORY_REQUEST
from shared.runtime.erase import user_hash
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from tests.helpers import Mesh, ask_ltm, ltm_request, running, wait_until

SECRET = "quokka marmalade 4417"  # said only by the deleted user
KEPT = "walrus lantern 9032"  # said only by the other user


async def _memory_call(rpc: RpcClient[MemoryResponse], type_: str, user_id: str, **data: Any) -> dict[str, Any]:
    body = {"request_id": new_id(), "type": type_, "user_id": user_id, "data": data}
    resp = await rpc.call(decode(MEMORY_REQUEST, json.dumps(body)), timeout=20)  # type: ignore[arg-type]
    assert resp.success, resp.error
    return resp.data or {}


async def scan_database(mesh: Mesh, needles: list[str]) -> dict[str, int]:
    """Rows of every table (as text, all columns) that contain one of ``needles``."""
    hits: dict[str, int] = {}
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT table_name FROM information_schema.tables"
                                 " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")
        tables = [r[0] for r in await cur.fetchall()]
        assert "conversation_messages" in tables and "ltm_memories" in tables
        for table in tables:
            for needle in needles:
                cur = await conn.execute(f'SELECT count(*) FROM "{table}" t WHERE strpos(t::text, %s) > 0',
                                         (needle,))
                row = await cur.fetchone()
                if row and row[0]:
                    hits[f"{table}: {needle}"] = int(row[0])
    return hits


async def _values(mesh: Mesh, key: bytes) -> list[bytes]:
    r = mesh.redis
    kind = (await r.type(key)).decode()
    if kind == "string":
        return [await r.get(key) or b""]
    if kind == "hash":
        return [x for kv in (await r.hgetall(key)).items() for x in kv]
    if kind == "list":
        return list(await r.lrange(key, 0, -1))
    if kind == "set":
        return list(await r.smembers(key))
    if kind == "zset":
        return list(await r.zrange(key, 0, -1))
    if kind == "stream":
        return [x for _, fields in await r.xrange(key) for kv in fields.items() for x in kv]
    return []


async def scan_redis(mesh: Mesh, needles: list[str]) -> dict[str, int]:
    """Keys of the whole keyspace whose name or any value contains one of ``needles``."""
    hits: dict[str, int] = {}
    raw = [n.encode() for n in needles]
    async for key in mesh.redis.scan_iter(count=1000):
        texts = [key, *await _values(mesh, key)]
        found = sum(1 for t in texts for n in raw if n in t)
        if found:
            hits[key.decode("utf-8", "replace")] = found
    return hits


async def test_delete_user_leaves_nothing_of_the_user_in_any_table_or_key(mesh: Mesh) -> None:
    user, other = f"u-del-{new_id()[:8]}", f"u-keep-{new_id()[:8]}"
    rpc: RpcClient[MemoryResponse] = RpcClient(
        mesh.redis, queue=mesh.names.memory_requests,
        reply_channel=mesh.names.reply_channel(mesh.names.memory_responses, "test-del"),
        adapter=MEMORY_RESPONSE, metrics=Metrics())
    await rpc.start()
    try:
        async with running(mesh.memory(memory_encryption_key=Fernet.generate_key().decode())), \
                running(mesh.ltm()), running(mesh.chat()):
            turns = 0
            for s in ("a", "b"):
                for text in (f"My locker code is {SECRET} and I keep it at the gym.",
                             f"Remind me: the phrase is {SECRET}, for the {s} project."):
                    await mesh.reply_to(await mesh.send(text, user_id=user, session_id=f"{user}-{s}"), timeout=30)
                    turns += 1
            await mesh.reply_to(await mesh.send(f"I collect {KEPT} postcards.", user_id=other,
                                                session_id=f"{other}-x"), timeout=30)
            for owner, source, text in (
                    (user, "notes/gym.md", f"# Gym\n\n## Locker\n\nThe locker code is {SECRET}. Keep it safe."),
                    (user, "notes/page.html", f"<h1>Page</h1><p>The gym phrase is {SECRET}.</p>"),
                    (other, "notes/cards.txt", f"Postcards: {KEPT}.")):
                added = await ask_ltm(mesh, ltm_request("doc_add", owner, {"source": source, "text": text}))
                assert added.success, added.error
            passages = await ask_ltm(mesh, ltm_request("doc_search", user, {"query": f"locker code {SECRET}"}))
            assert passages.success and passages.data and passages.data["passages"], passages.error
            await _memory_call(rpc, "set_preference", user, key="ssn", value=f"ssn {SECRET}", sensitive=True)
            await _memory_call(rpc, "set_preference", user, key="colour", value=f"teal {SECRET}")
            await _memory_call(rpc, "store_context", user, session_id=f"{user}-a", context_type="project",
                               key="gym", value={"note": SECRET})
            await _memory_call(rpc, "link_sessions", user, source_session_id=f"{user}-a",
                               target_session_id=f"{user}-b", relation_type="continues")
            # a malformed input of the user: dead-lettered with its raw text by memory and chat_ai
            await mesh.redis.xadd(mesh.names.user_input, {"data": json.dumps(
                {"message_id": new_id(), "user_id": user, "session_id": f"{user}-a", "content": 5,
                 "note": SECRET})})
            found = await ask_ltm(mesh, ltm_request("search", user, {"query": f"what is my locker code {SECRET}"}))
            assert found.success and found.memories, found.error
            # a memory forgotten alone: its id goes into the search index's deletion log (ltm migration 012)
            gone = await ask_ltm(mesh, ltm_request("delete", user, {"memory_id": found.memories[-1].memory_id}))
            assert gone.success, gone.error
            assert await mesh.count("SELECT count(*) FROM ltm_search_deletions WHERE user_id = %s", user) == 1

            async def stored_and_ingested() -> tuple[int, int] | None:
                seen = (await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s", user),
                        await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user))
                return seen if seen[0] >= 2 * turns and seen[1] >= turns else None

            await wait_until(stored_and_ingested, timeout=60, message="the user's turns stored and ingested")

            async def dead_lettered() -> bool:
                return bool(await mesh.dead(mesh.names.user_input))

            await wait_until(dead_lettered, timeout=20, message="the malformed input dead-lettered")
            assert await scan_database(mesh, [user, SECRET]), "the scan finds nothing even before the deletion"
            assert await scan_redis(mesh, [user, SECRET]), "the scan finds nothing even before the deletion"

            result = await forget_user(mesh.redis, mesh.names, user)
            assert result["memory"]["rows"]["conversation_messages"] >= 2 * turns
            assert result["memory"]["rows"]["user_preferences"] == 2
            assert result["ltm"]["rows"]["ltm_memories"] >= turns
            assert result["ltm"]["rows"]["ltm_documents"] == 2 and result["ltm"]["rows"]["ltm_doc_chunks"] >= 2
            assert result["ltm"]["rows"]["ltm_search_deletions"] == 1  # and its own deletion logged nothing
            assert sum(result["memory"]["stream_entries"].values()) >= turns, result

            db_hits = await scan_database(mesh, [user, SECRET])
            redis_hits = await scan_redis(mesh, [user, SECRET])
            print(f"deletion: {json.dumps(result)}\ndatabase hits after: {db_hits}\nredis hits after: {redis_hits}")
            assert db_hits == {}, f"rows of the deleted user remain: {db_hits}"
            assert redis_hits == {}, f"keys or entries of the deleted user remain: {redis_hits}"

            # the other user keeps everything
            assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s", other) == 2
            assert await mesh.count("SELECT count(*) FROM ltm_doc_chunks WHERE user_id = %s", other) == 1
            assert await scan_database(mesh, [KEPT])
            assert await scan_redis(mesh, [KEPT])

            again = await forget_user(mesh.redis, mesh.names, user)
            assert again["total"] == 0, again
            assert await scan_database(mesh, [user, SECRET]) == {}

            # the log: who (a hash), when, counts; two calls of two passes, each by memory and ltm
            async with mesh.pool.connection() as conn:
                cur = await conn.execute("SELECT service, counts::text FROM user_deletions WHERE user_hash = %s",
                                         (user_hash(user),))
                log = await cur.fetchall()
            assert sorted(s for s, _ in log) == ["ltm"] * 4 + ["memory"] * 4
            assert not any(user in c or SECRET in c for _, c in log)
    finally:
        await rpc.close()


async def test_a_reply_chat_ai_is_still_writing_is_deleted_too(mesh: Mesh) -> None:
    """A deletion while chat_ai waits for its model: the reply it writes after the first pass is stored by memory
    and ingested by ltm, and the second pass waits for that (it once waited only for memory and ltm, and the reply
    came back after it: the user's session and turn again, in PostgreSQL and ltm)."""
    import threading

    from mesh.forget import _settle
    from shared.runtime.llm import chat_model
    from tests.fake_llm import fake_llm

    user = f"u-late-{new_id()[:8]}"
    release = threading.Event()

    def slow(_body: dict[str, Any]) -> str:
        release.wait(30)
        return f"Noted, {SECRET}."

    with fake_llm(slow) as (base_url, seen):
        llm = chat_model(None, base_url, "fake-model")
        async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat(llm=llm, enable_ltm=False)):
            try:
                await mesh.send(f"Keep this: {SECRET}.", user_id=user, session_id=f"{user}-s")
                await wait_until(lambda: bool(seen), message="the model asked")  # chat_ai is answering

                async def stored() -> bool:
                    return await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s",
                                            user) == 1

                await wait_until(stored, message="memory stored the input")
                assert not await _settle(mesh.redis, mesh.names, 0.5), "settled while chat_ai was still answering"
                forgetting = asyncio.create_task(forget_user(mesh.redis, mesh.names, user, settle_s=30))

                async def first_pass_done() -> bool:
                    return await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s",
                                            user) == 0

                await wait_until(first_pass_done, message="the first pass deleted the user's input")
            finally:
                release.set()
            result = await asyncio.wait_for(forgetting, 60)
            assert result["settled"]
            # the reply is usually the second pass's (1); when it reaches the bus while the first pass is still at
            # work, that pass takes it (stored and deleted, or its stream entry removed before memory read it: 0).
            # Either way nothing of the user may be left, which is what follows
            assert result["second_pass"]["memory"]["rows"].get("conversation_messages", 0) in (0, 1)
            for table in ("conversation_messages", "conversation_sessions", "ltm_ingested", "ltm_memories"):
                assert await mesh.count(f"SELECT count(*) FROM {table} WHERE user_id = %s", user) == 0, table


async def test_a_request_write_its_users_deletion_overtook_is_refused(mesh: Mesh) -> None:
    """A request ltm or memory took before the user's deletion and writes after it (a large doc_add still
    embedding; an add, a profile_update, a store_message, an import) once re-created the user's rows after both
    passes: such a write is refused (not_found); one the server took after the deletion (the user is back) is not."""
    import time

    from services.ltm.config import LtmSettings
    from services.ltm.native import NativeBackend
    from services.ltm.store import LtmStore
    from shared.contracts.errors import MeshError
    from shared.contracts.memory_api import ImportMessage, StoreMessageData
    from shared.contracts.messages import AddData, DocAddData
    from shared.runtime.embedding import Embedder
    from shared.runtime.fence import RECEIVED_AT
    from tests.helpers import common

    user = f"u-fence-{new_id()[:8]}"
    backend = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), redis=mesh.redis, names=mesh.names,
                            settings=LtmSettings(**common(mesh.redis_url, mesh.database_url)))
    memory = mesh.memory()
    writes = {
        "add": lambda: backend.add(user, AddData(content="I keep bees.")),
        "profile_update": lambda: backend.profile_update(user, {"city": "Porto"}),
        "doc_add": lambda: backend.doc_add(user, DocAddData(source="bees.md", text="# Bees\n\nTwo hives.")),
        "store_message": lambda: memory.api.store_message(user, StoreMessageData(session_id=f"{user}-s",
                                                                                content="hello")),
        "import_messages": lambda: memory.api.import_messages(user, [ImportMessage(
            session_id=f"{user}-i", role="user", content="an old turn", timestamp=1_700_000_000)]),
    }
    taken = time.time()
    await backend.delete_user(user)
    await memory.api.delete_user(user)
    token = RECEIVED_AT.set(taken)  # taken from its list before the deletion
    try:
        for kind, write in writes.items():
            with pytest.raises(MeshError) as err:
                await write()
            assert err.value.code.value == "not_found", kind
    finally:
        RECEIVED_AT.reset(token)
    for table in ("ltm_memories", "ltm_profiles", "ltm_documents", "conversation_messages", "conversation_sessions"):
        assert await mesh.count(f"SELECT count(*) FROM {table} WHERE user_id = %s", user) == 0, table
    token = RECEIVED_AT.set(time.time())  # a request taken after the deletion: the user is back
    try:
        for write in writes.values():
            await write()
    finally:
        RECEIVED_AT.reset(token)
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s", user) == 2


async def test_a_store_message_whose_stm_turn_comes_after_the_deletion_leaves_no_turn(mesh: Mesh) -> None:
    """A store_message committed just before its user's deletion, whose STM turn was written just after it: the
    deletion removed the row and the session's keys, and its second pass finds no session to clear, so that turn
    (the user's words) stayed for the STM's TTL. The request now looks for the deletion after writing the turn,
    removes it again and fails as overtaken."""
    import time

    from shared.contracts.errors import MeshError
    from shared.contracts.memory_api import StoreMessageData
    from shared.runtime.fence import RECEIVED_AT

    user = f"u-late-{new_id()[:8]}"
    session = f"{user}-s"
    memory = mesh.memory()
    append = memory.api.stm.append

    async def deleted_first(*args: Any, **kwargs: Any) -> Any:  # the deletion lands between commit and STM write
        await memory.api.delete_user(user)
        return await append(*args, **kwargs)

    memory.api.stm.append = deleted_first  # type: ignore[method-assign]
    token = RECEIVED_AT.set(time.time())
    try:
        with pytest.raises(MeshError) as err:
            await memory.api.store_message(user, StoreMessageData(session_id=session, content="my PIN is 4321"))
    finally:
        RECEIVED_AT.reset(token)
        memory.api.stm.append = append  # type: ignore[method-assign]
    assert err.value.code.value == "not_found"
    names = mesh.names
    left = [k for k in (names.stm_turns(session), names.stm_summary(session), names.stm_meta(session))
            if await mesh.redis.exists(k)]
    assert left == [], left
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s", user) == 0
    assert memory.metrics.get("writes_overtaken") == 1
    updates = [decode(MEMORY_UPDATE, f[b"data"]) for _, f in await mesh.redis.xrange(names.memory_updates)]
    assert [u for u in updates if u.user_id == user] == []  # its update, which ltm had not read, went too


async def test_an_import_whose_stm_comes_after_the_deletion_leaves_no_stm_and_no_update(mesh: Mesh) -> None:
    """The same for import_messages: committed just before the user's deletion, its sessions' STM rebuilt and its
    updates published after it; the request removes both again and fails as overtaken."""
    import time

    from shared.contracts.errors import MeshError
    from shared.contracts.memory_api import ImportMessage
    from shared.runtime.fence import RECEIVED_AT

    user = f"u-late-i-{new_id()[:8]}"
    memory = mesh.memory()
    rebuild = memory.api.importer._rebuild_stm

    async def deleted_first(*args: Any, **kwargs: Any) -> Any:  # the deletion lands between commit and STM
        await memory.api.delete_user(user)
        return await rebuild(*args, **kwargs)

    memory.api.importer._rebuild_stm = deleted_first  # type: ignore[method-assign]
    sessions = [f"{user}-a", f"{user}-b"]
    token = RECEIVED_AT.set(time.time())
    try:
        with pytest.raises(MeshError) as err:
            await memory.api.import_messages(user, [
                ImportMessage(session_id=s, role="user", content=f"an old turn of {s}: my PIN is 4321",
                              timestamp=1_700_000_000 + i) for i, s in enumerate(sessions)])
    finally:
        RECEIVED_AT.reset(token)
        memory.api.importer._rebuild_stm = rebuild  # type: ignore[method-assign]
    assert err.value.code.value == "not_found"
    names = mesh.names
    left = [k for s in sessions for k in (names.stm_turns(s), names.stm_summary(s), names.stm_meta(s))
            if await mesh.redis.exists(k)]
    assert left == [], left
    updates = [decode(MEMORY_UPDATE, f[b"data"]) for _, f in await mesh.redis.xrange(names.memory_updates)]
    assert [u for u in updates if u.user_id == user] == []
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = %s", user) == 0


async def test_settling_does_not_wait_for_an_entry_the_first_pass_deleted(mesh: Mesh) -> None:
    """The first pass deletes the user's entries a group had yet to read: the stream's last generated id may be one
    of them, never to be delivered, so a stage waiting for it once waited out the whole settle time."""
    from mesh.forget import _settle

    names, redis = mesh.names, mesh.redis
    await redis.xgroup_create(names.user_input, names.chat_group, id="0", mkstream=True)
    await redis.xadd(names.user_input, {"data": "{}"})
    read: Any = await redis.xreadgroup(names.chat_group, "c1", {names.user_input: ">"}, count=10)
    await redis.xack(names.user_input, names.chat_group, *[i for _s, entries in read for i, _f in entries])
    unread = await redis.xadd(names.user_input, {"data": "{}"})  # the user's, deleted by the first pass
    await redis.xdel(names.user_input, unread)
    assert await _settle(redis, names, 5.0)


async def test_settling_waits_for_an_entry_the_first_pass_deleted_after_a_consumer_read_it(mesh: Mesh) -> None:
    """An entry a consumer had read (ltm ingesting the reply's update) when the first pass deleted it is still being
    handled: the stage once looked only at the stream's newest entry (none left), went on, and the ingest committed
    the user's rows after both passes."""
    from mesh.forget import _settle

    names, redis = mesh.names, mesh.redis
    await redis.xgroup_create(names.memory_updates, names.ltm_group, id="0", mkstream=True)
    await redis.xadd(names.memory_updates, {"data": "{}"})
    read: Any = await redis.xreadgroup(names.ltm_group, "c1", {names.memory_updates: ">"}, count=10)
    [taken] = [i for _s, entries in read for i, _f in entries]
    await redis.xdel(names.memory_updates, taken)  # the first pass; the consumer is still at work on it
    assert not await _settle(redis, names, 0.5)
    await redis.xack(names.memory_updates, names.ltm_group, taken)
    assert await _settle(redis, names, 5.0)
