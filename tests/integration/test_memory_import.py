"""History import (import_messages over memory_requests, and `mesh import`) on real Redis and PostgreSQL; and
the offline responder's replies: stored, kept in STM, never published to long-term memory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.importer import ImportFailed, batches, import_history, load_history
from services.memory.service import MemoryService
from shared.contracts import (
    MEMORY_RESPONSE,
    MEMORY_UPDATE,
    AIResponse,
    MemoryResponse,
    MemoryUpdate,
    decode,
    encode,
    new_id,
)
from shared.contracts.memory_api import ImportMessage, import_message_id
from shared.contracts.messages import AIResponseMeta
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from shared.runtime.stm import read_stm
from tests.helpers import Mesh, Replies, running, wait_until

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_684_000_000.0

# Two sessions of one user, given out of time order on purpose; ids on some turns, derived for the others.
HISTORY: list[dict[str, Any]] = [
    {"message_id": "m2", "session_id": "trip", "role": "assistant", "content": "Lisbon is lovely in May.",
     "timestamp": T0 + 60},
    {"message_id": "m1", "session_id": "trip", "role": "user", "content": "I am planning a trip to Lisbon.",
     "timestamp": T0},
    {"session_id": "trip", "role": "human", "content": "My sister lives there.", "timestamp": T0 + 120},
    {"session_id": "bees", "role": "user", "content": "I keep three hives of bees.", "timestamp": T0 + 86_400},
    {"session_id": "bees", "role": "ai", "content": "How much honey do they make?", "timestamp": T0 + 86_460},
]


@pytest.fixture
async def memory(mesh: Mesh) -> AsyncIterator[MemoryService]:
    async with running(mesh.memory(memory_import_max_batch=50, memory_embed_messages=False)) as service:
        yield service  # type: ignore[misc]


@pytest.fixture
async def rpc(mesh: Mesh) -> AsyncIterator[RpcClient[MemoryResponse]]:
    client: RpcClient[MemoryResponse] = RpcClient(
        mesh.redis, queue=mesh.names.memory_requests,
        reply_channel=mesh.names.reply_channel(mesh.names.memory_responses, "import-test"),
        adapter=MEMORY_RESPONSE, metrics=Metrics())
    await client.start()
    yield client
    await client.close()


async def send_import(mesh: Mesh, rpc: RpcClient[MemoryResponse], user_id: str,
                      messages: list[dict[str, Any]]) -> MemoryResponse:
    """The exact wire shape, sent raw (bad input included) on memory_requests; the reply comes on reply_to."""
    channel = mesh.names.reply_channel(mesh.names.memory_responses, "raw")
    body = {"request_id": new_id(), "type": "import_messages", "user_id": user_id, "reply_to": channel,
            "data": {"messages": messages}}
    async with Replies(mesh.redis, channel, MEMORY_RESPONSE) as replies:
        await mesh.redis.rpush(mesh.names.memory_requests, json.dumps(body))
        return await replies.get(body["request_id"], timeout=30)


async def updates(mesh: Mesh) -> list[MemoryUpdate]:
    rows = await mesh.redis.xrange(mesh.names.memory_updates)
    return [decode(MEMORY_UPDATE, fields[b"data"]) for _, fields in rows]


async def stored(mesh: Mesh, user_id: str) -> list[tuple[Any, ...]]:
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT message_id, session_id, role, content, message_index, extract(epoch from timestamp)::float8,"
            " user_id, token_count FROM conversation_messages WHERE user_id = %s ORDER BY session_id, message_index",
            (user_id,))
        return list(await cur.fetchall())


async def test_import_stores_folds_stm_and_publishes_each_new_turn_once(
        mesh: Mesh, memory: MemoryService, rpc: RpcClient[MemoryResponse]) -> None:
    resp = await send_import(mesh, rpc, "u1", HISTORY)
    assert resp.success, resp.error
    assert resp.data == {"imported": 5, "duplicates": 0, "sessions": 2, "updates_published": 5}

    rows = await stored(mesh, "u1")
    by_session = {s: [r for r in rows if r[1] == s] for s in ("trip", "bees")}
    # ordered by timestamp within each session, original times kept (to the microsecond), roles mapped
    assert [r[3] for r in by_session["trip"]] == ["I am planning a trip to Lisbon.", "Lisbon is lovely in May.",
                                                  "My sister lives there."]
    assert [r[4] for r in by_session["trip"]] == [0, 1, 2]
    assert [r[2] for r in by_session["trip"]] == ["human", "ai", "human"]
    assert [r[5] for r in by_session["trip"]] == pytest.approx([T0, T0 + 60, T0 + 120], abs=1e-5)
    assert all(r[7] > 0 for r in rows)  # token counts kept, as for live turns
    derived = import_message_id("u1", ImportMessage.model_validate(HISTORY[2]))
    assert by_session["trip"][2][0] == derived
    # the session records: created at the first turn, counted, owned by the user
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT s.session_id, s.user_id, s.message_count, extract(epoch from s.created_at)::float8,"
            " extract(epoch from s.last_activity)::float8, ss.human_count, ss.ai_count FROM conversation_sessions s"
            " JOIN session_summary ss USING (session_id) ORDER BY s.session_id")
        sessions = await cur.fetchall()
    assert [s[:3] for s in sessions] == [("bees", "u1", 2), ("trip", "u1", 3)]
    assert sessions[1][3:5] == pytest.approx((T0, T0 + 120), abs=1e-5)
    assert sessions[1][5:] == (2, 1)

    # STM of each session is there, in order, without a rebuild on read
    for sid, expected in (("trip", 3), ("bees", 2)):
        stm = await read_stm(mesh.redis, mesh.names, sid)
        assert stm.exists and len(stm.turns) == expected
        assert [t.content for t in stm.turns] == [r[3] for r in by_session[sid]]
        assert stm.turns[0].role == "user"

    # one MemoryUpdate per turn, as the live path makes them
    ups = await updates(mesh)
    assert len(ups) == 5
    by_id = {u.message_id: u for u in ups}
    assert set(by_id) == {r[0] for r in rows}
    assert by_id["m1"].source == "user" and by_id["m2"].source == "ai"
    assert by_id["m2"].meta.session_id == "trip" and by_id["m2"].timestamp == pytest.approx(T0 + 60)
    assert by_id["m1"].user_id == "u1" and by_id["m1"].content == "I am planning a trip to Lisbon."

    # importing the same history again stores and publishes nothing
    again = await send_import(mesh, rpc, "u1", HISTORY)
    assert again.success and again.data == {"imported": 0, "duplicates": 5, "sessions": 2, "updates_published": 0}
    assert len(await stored(mesh, "u1")) == 5
    assert len(await updates(mesh)) == 5
    # a later batch into an existing session continues its order; a repeat inside the batch is a duplicate
    later = {"session_id": "trip", "role": "user", "content": "We fly on Friday.", "timestamp": T0 + 180}
    third = await send_import(mesh, rpc, "u1", [later, later, HISTORY[0]])
    assert third.data == {"imported": 1, "duplicates": 2, "sessions": 1, "updates_published": 1}
    rows = [r for r in await stored(mesh, "u1") if r[1] == "trip"]
    assert [r[4] for r in rows] == [0, 1, 2, 3] and rows[-1][3] == "We fly on Friday."
    stm = await read_stm(mesh.redis, mesh.names, "trip")
    assert stm.turns[-1].content == "We fly on Friday."


async def test_a_long_session_keeps_the_window_and_folds_the_rest(mesh: Mesh, rpc: RpcClient[MemoryResponse]) -> None:
    async with running(mesh.memory(stm_max_messages=5, memory_embed_messages=False)):
        history = [{"session_id": "long", "role": "user" if i % 2 == 0 else "assistant",
                    "content": f"Turn {i}: my \"favourite colour\" number {i} is teal {i}.", "timestamp": T0 + i}
                   for i in range(40)]
        resp = await send_import(mesh, rpc, "u1", history)
        assert resp.success and resp.data and resp.data["imported"] == 40
        stm = await read_stm(mesh.redis, mesh.names, "long")
        assert [t.content for t in stm.turns] == [h["content"] for h in history[-5:]]
        assert stm.summary  # the 35 older turns are in the summary, read back from PostgreSQL too
        summary = ok(await rpc.call(_req("get_session_summary", "u1", session_id="long"), 10))["summary"]
        assert summary["summary_turns"] == 35 and summary["message_count"] == 40


async def test_a_batch_over_the_limit_is_refused_whole(mesh: Mesh, memory: MemoryService,
                                                       rpc: RpcClient[MemoryResponse]) -> None:
    many = [{"session_id": "s", "role": "user", "content": f"turn {i}", "timestamp": T0 + i} for i in range(51)]
    resp = await send_import(mesh, rpc, "u1", many)
    assert not resp.success and resp.error is not None
    assert resp.error.code == "bad_request"
    assert "at most 50" in resp.error.message and "MEMORY_IMPORT_MAX_BATCH" in resp.error.message
    assert await mesh.count("SELECT count(*) FROM conversation_messages") == 0
    assert await mesh.count("SELECT count(*) FROM conversation_sessions") == 0
    # a bad message is refused with its place named; too long a text is refused as for any message
    bad = await send_import(mesh, rpc, "u1", [{"session_id": "s", "role": "robot", "content": "x", "timestamp": 1}])
    assert bad.error and bad.error.code == "bad_request" and "data.messages.0.role" in bad.error.message
    big = await send_import(mesh, rpc, "u1", [{"session_id": "s", "role": "user", "content": "x" * 40_000,
                                               "timestamp": T0}])
    assert big.error and big.error.code == "bad_request" and "over the limit" in big.error.message
    # the function splits what is over the limit into batches the service takes
    msgs = [ImportMessage.model_validate(m) for m in many]
    totals = await import_history(mesh.redis, mesh.names, "u1", msgs, batch=50, rpc=rpc)
    assert (totals.batches, totals.imported, totals.updates_published) == (2, 51, 51)
    with pytest.raises(ImportFailed) as failed:
        await import_history(mesh.redis, mesh.names, "u1", msgs, batch=51, rpc=rpc)
    assert failed.value.code == "bad_request"


async def test_a_batch_bigger_than_an_ordinary_message_is_accepted(mesh: Mesh, memory: MemoryService,
                                                                   rpc: RpcClient[MemoryResponse]) -> None:
    text = "I like long walks by the river and the smell of rain. " * 40  # ~2 KiB
    history = [{"session_id": f"s{i % 5}", "role": "user", "content": f"{i} {text}", "timestamp": T0 + i}
               for i in range(50)]
    assert len(json.dumps(history)) > 2 * memory.settings.max_content_bytes + 16 * 1024  # over payload_limit()
    resp = await send_import(mesh, rpc, "u1", history)
    assert resp.success and resp.data and resp.data["imported"] == 50


async def test_another_users_session_fails_the_batch_and_applies_none_of_it(
        mesh: Mesh, memory: MemoryService, rpc: RpcClient[MemoryResponse]) -> None:
    ok(await rpc.call(_req("create_session", "alice", session_id="alices"), 10))
    resp = await send_import(mesh, rpc, "mallory", [
        {"session_id": "fresh", "role": "user", "content": "a new session of mine", "timestamp": T0},
        {"session_id": "alices", "role": "user", "content": "sneaking into alice's", "timestamp": T0 + 1},
    ])
    assert not resp.success and resp.error is not None and resp.error.code == "not_found"
    assert "'alices'" in resp.error.message and "nothing of this batch" in resp.error.message
    assert await mesh.count("SELECT count(*) FROM conversation_messages") == 0
    assert await mesh.count("SELECT count(*) FROM conversation_sessions WHERE session_id = 'fresh'") == 0
    assert await mesh.count("SELECT count(*) FROM conversation_sessions WHERE user_id = 'mallory'") == 0
    assert await updates(mesh) == []
    assert not (await read_stm(mesh.redis, mesh.names, "fresh")).exists


async def test_no_updates_when_publishing_is_off(mesh: Mesh, rpc: RpcClient[MemoryResponse]) -> None:
    async with running(mesh.memory(enable_ltm_publish=False, memory_embed_messages=False)):
        resp = await send_import(mesh, rpc, "u1", HISTORY)
        assert resp.data == {"imported": 5, "duplicates": 0, "sessions": 2, "updates_published": 0}
    assert await updates(mesh) == []


async def test_offline_replies_are_stored_but_not_published(mesh: Mesh, memory: MemoryService,
                                                             rpc: RpcClient[MemoryResponse]) -> None:
    user = await mesh.send("I live in Porto.", user_id="u1", session_id="s1")
    replies = [
        AIResponse(message_id=new_id(), in_reply_to=user.message_id, user_id="u1", session_id="s1",
                   content="[offline responder: ...] You live in Porto.", meta=AIResponseMeta(model=model))
        for model in ("offline", "offline (llm error: APITimeoutError)", "gpt-4o-mini")
    ]
    for r in replies:
        await mesh.redis.xadd(mesh.names.ai_responses, {"data": encode(r)})
    await wait_until(lambda: _count_is(mesh, "SELECT count(*) FROM conversation_messages WHERE session_id = 's1'", 4),
                     message="four messages stored")
    stm = await wait_until(lambda: _stm_with(mesh, "s1", 4), message="four turns in STM")
    assert {t.message_id for t in stm.turns} == {user.message_id, *(r.message_id for r in replies)}
    await wait_until(lambda: _updates_n(mesh, 2), message="two memory updates")
    ups = await updates(mesh)
    assert {u.message_id for u in ups} == {user.message_id, replies[2].message_id}
    assert memory.metrics.get("offline_replies_not_published") == 2
    # an imported assistant turn that was an offline reply is treated the same way
    resp = await send_import(mesh, rpc, "u1", [
        {"session_id": "s2", "role": "assistant", "content": "[offline responder: ...] Porto.", "timestamp": T0,
         "meta": {"model": "offline"}},
        {"session_id": "s2", "role": "user", "content": "Thanks!", "timestamp": T0 + 1}])
    assert resp.data == {"imported": 2, "duplicates": 0, "sessions": 1, "updates_published": 1}
    assert memory.metrics.get("offline_replies_not_published") == 3


async def test_mesh_import_command_and_function(mesh: Mesh, memory: MemoryService, rpc: RpcClient[MemoryResponse],
                                                tmp_path: Path) -> None:
    doc = {"user_id": "carol", "sessions": [
        {"session_id": "c1", "date": "2023/05/20 (Sat) 10:01", "messages": [
            {"role": "user", "content": "I adopted a cat called Miso."},
            {"role": "assistant", "content": "Congratulations on Miso!"},
            {"role": "user", "content": "  "}]},  # empty: skipped
        {"session_id": "c2", "messages": [
            {"role": "user", "content": "Miso likes tuna.", "date": "2023-05-27T09:00:00Z", "message_id": "c2-1"}]},
    ]}
    path = tmp_path / "history.json"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "REDIS_URL": mesh.redis_url, "MESH_KEY_PREFIX": mesh.names.prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "import", str(path), "--batch", "2", cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    totals = json.loads(out.decode().strip().splitlines()[-1])
    assert totals["imported"] == 3 and totals["sessions"] == 2 and totals["batches"] == 2
    assert totals["skipped"] == 1 and totals["updates_published"] == 3
    rows = await stored(mesh, "carol")
    c1_start = 1_684_576_860.0  # 2023-05-20 10:01 UTC
    assert [r[1] for r in rows] == ["c1", "c1", "c2"]
    assert [r[5] for r in rows] == pytest.approx([c1_start, c1_start + 1, 1_685_178_000.0])
    # the same file through the function (and as JSON Lines): nothing new
    lines = tmp_path / "history.jsonl"
    user, messages, skipped = load_history(path)
    lines.write_text("\n".join(m.model_dump_json() for m in messages))
    user2, again, _ = load_history(lines, user="carol")
    assert (user, user2, skipped, len(again)) == ("carol", "carol", 1, 3)
    totals2 = await import_history(mesh.redis, mesh.names, user2, again)
    assert (totals2.imported, totals2.duplicates, totals2.updates_published) == (0, 3, 0)
    # a bad file is a clear error, not a traceback
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"session_id": "x", "role": "user", "content": "no time"}]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "import", str(bad), "--user", "carol", cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2 and b"no timestamp or date" in out


def test_batches_keep_sessions_whole_where_they_fit() -> None:
    def msgs(sid: str, n: int, start: float) -> list[ImportMessage]:
        return [ImportMessage(session_id=sid, role="user", content=f"{sid} {i}", timestamp=start + i) for i in range(n)]

    history = msgs("a", 3, 0) + msgs("b", 3, 10) + msgs("c", 7, 20) + msgs("d", 1, 40)
    got = [[(m.session_id, m.content) for m in b] for b in batches(history, 4, 1 << 20)]
    assert [len(b) for b in got] == [3, 3, 4, 4]  # a | b | c split in order | rest of c + d
    assert [sid for b in got for sid, _ in b] == [m.session_id for m in history]
    by_bytes = batches(history, 100, 300)  # a byte budget splits too, and one message always fits
    assert all(b for b in by_bytes) and sum(len(b) for b in by_bytes) == len(history) and len(by_bytes) > 1
    assert len(batches(msgs("x", 1, 0), 1, 1)) == 1


# ------------------------------------------------------------------ helpers
def _req(type_: str, user_id: str, **data: Any) -> Any:
    from shared.contracts.memory_api import MEMORY_REQUEST

    return decode(MEMORY_REQUEST, json.dumps({"request_id": new_id(), "type": type_, "user_id": user_id,
                                              "data": data}))


def ok(resp: MemoryResponse) -> dict[str, Any]:
    assert resp.success, resp.error
    assert resp.data is not None
    return resp.data


async def _count_is(mesh: Mesh, sql: str, n: int) -> bool:
    return await mesh.count(sql) == n


async def _stm_with(mesh: Mesh, session_id: str, n: int) -> Any:
    stm = await read_stm(mesh.redis, mesh.names, session_id)
    return stm if len(stm.turns) == n else None


async def _updates_n(mesh: Mesh, n: int) -> bool:
    return len(await updates(mesh)) >= n
