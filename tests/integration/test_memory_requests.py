"""The storage API over the real bus: memory_requests list → memory_responses channel (or reply_to)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.fernet import Fernet

from shared.contracts import MEMORY_RESPONSE, MemoryResponse, decode, new_id
from shared.contracts.memory_api import MEMORY_REQUEST
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from tests.helpers import Mesh, Replies, running, wait_until


@pytest.fixture
async def rpc(mesh: Mesh) -> AsyncIterator[RpcClient[MemoryResponse]]:
    client: RpcClient[MemoryResponse] = RpcClient(
        mesh.redis, queue=mesh.names.memory_requests,
        reply_channel=mesh.names.reply_channel(mesh.names.memory_responses, "test"),
        adapter=MEMORY_RESPONSE, metrics=Metrics(),
    )
    await client.start()
    async with running(mesh.memory(memory_encryption_key=Fernet.generate_key().decode())):
        yield client
    await client.close()


async def call(rpc: RpcClient[MemoryResponse], type_: str, user_id: str | None, **data: Any) -> MemoryResponse:
    body: dict[str, Any] = {"request_id": new_id(), "type": type_, "data": data}
    if user_id is not None:
        body["user_id"] = user_id
    return await rpc.call(decode(MEMORY_REQUEST, json.dumps(body)), timeout=10)  # type: ignore[arg-type]


def ok(resp: MemoryResponse) -> dict[str, Any]:
    assert resp.success, resp.error
    assert resp.data is not None
    return resp.data


async def test_every_request_type_over_the_bus(rpc: RpcClient[MemoryResponse]) -> None:
    pong = ok(await call(rpc, "ping", None))
    assert (pong["pong"], pong["service"]) == (True, "memory")
    s = ok(await call(rpc, "create_session", "u1", name="Plans", metadata={"a": 1}))["session"]
    sid = s["session_id"]
    other = ok(await call(rpc, "create_session", "u1", session_id="second"))["session"]["session_id"]
    m = ok(await call(rpc, "store_message", "u1", session_id=sid, content="I keep bees in Alentejo."))["message"]
    assert m["role"] == "human" and m["message_index"] == 0
    ok(await call(rpc, "store_message", "u1", session_id=sid, content="Tomorrow will be cold and windy.", role="ai"))
    msgs = ok(await call(rpc, "get_messages", "u1", session_id=sid, limit=10))["messages"]
    assert [x["content"] for x in msgs] == ["I keep bees in Alentejo.", "Tomorrow will be cold and windy."]
    found = ok(await call(rpc, "search_messages", "u1", query="beekeeping hobby", limit=1))["messages"]
    assert found[0]["content"] == "I keep bees in Alentejo." and found[0]["similarity"] > 0.3
    ctx = ok(await call(rpc, "store_context", "u1", session_id=sid, context_type="project", key="hives",
                        value={"count": 3}))["context"]
    assert ctx["value"] == {"count": 3}
    merged = ok(await call(rpc, "store_context", "u1", session_id=sid, context_type="project", key="hives",
                           value={"queen": "new"}))["context"]
    assert merged["value"] == {"count": 3, "queen": "new"}
    got = ok(await call(rpc, "get_context", "u1", session_id=sid, context_type="project"))["context"]
    assert [c["key"] for c in got] == ["hives"]
    upd = ok(await call(rpc, "update_session_activity", "u1", session_id=sid, status="paused"))["session"]
    assert upd["status"] == "paused"
    sessions = ok(await call(rpc, "get_user_sessions", "u1", limit=5))["sessions"]
    assert {x["session_id"] for x in sessions} == {sid, other}
    link = ok(await call(rpc, "link_sessions", "u1", source_session_id=sid, target_session_id=other,
                         relation_type="continues", strength=0.5))["link"]
    assert link["relation_type"] == "continues"
    got_session = ok(await call(rpc, "get_session", "u1", session_id=sid))
    assert got_session["session"]["name"] == "Plans" and got_session["links"][0]["target_session_id"] == other
    summary = ok(await call(rpc, "get_session_summary", "u1", session_id=sid))["summary"]
    assert (summary["message_count"], summary["human_count"], summary["ai_count"]) == (2, 1, 1)
    stm = ok(await call(rpc, "get_stm", "u1", session_id=sid))["stm"]
    assert [t["content"] for t in stm["turns"]] == ["I keep bees in Alentejo.", "Tomorrow will be cold and windy."]
    ok(await call(rpc, "set_preference", "u1", key="address", value="Rua 1", sensitive=True))
    ok(await call(rpc, "set_preference", "u1", key="units", value="metric"))
    prefs = ok(await call(rpc, "get_preferences", "u1"))["preferences"]
    assert prefs == {"address": "Rua 1", "units": "metric"}
    assert ok(await call(rpc, "cleanup_expired_data", "u1")) == {"deleted": {"context": 0}}
    assert ok(await call(rpc, "delete_session", "u1", session_id=other)) == {"deleted": other}
    gone = await call(rpc, "get_session", "u1", session_id=other)
    assert not gone.success and gone.error and gone.error.code == "not_found"


async def test_another_users_session_is_not_found_over_the_bus(rpc: RpcClient[MemoryResponse]) -> None:
    sid = ok(await call(rpc, "create_session", "alice"))["session"]["session_id"]
    ok(await call(rpc, "store_message", "alice", session_id=sid, content="secret plans"))
    for type_, data in (("get_session", {"session_id": sid}), ("get_messages", {"session_id": sid}),
                        ("store_message", {"session_id": sid, "content": "x"}),
                        ("get_context", {"session_id": sid}), ("delete_session", {"session_id": sid}),
                        ("get_session_summary", {"session_id": sid}), ("get_stm", {"session_id": sid}),
                        ("update_session_activity", {"session_id": sid, "status": "x"}),
                        ("store_context", {"session_id": sid, "key": "k", "value": 1})):
        resp = await call(rpc, type_, "mallory", **data)
        assert not resp.success and resp.error is not None, type_
        assert resp.error.code == "not_found" and resp.error.message == "no such session", type_
    assert ok(await call(rpc, "get_user_sessions", "mallory"))["sessions"] == []
    assert ok(await call(rpc, "search_messages", "mallory", query="plans"))["messages"] == []


async def test_bad_requests_get_error_replies_and_dead_letters(mesh: Mesh, rpc: RpcClient[MemoryResponse]) -> None:
    async with Replies(mesh.redis, mesh.names.memory_responses, MEMORY_RESPONSE) as replies:
        for body in ({"request_id": "r-unknown", "type": "teleport", "user_id": "u1", "data": {}},
                 {"request_id": "r-bad", "type": "get_messages", "user_id": "u1", "data": {"limit": 5}},
                     {"request_id": "r-nouser", "type": "get_session", "data": {"session_id": "s"}}):
            await mesh.redis.rpush(mesh.names.memory_requests, json.dumps(body))
        await mesh.redis.rpush(mesh.names.memory_requests, b"not json")
        unknown, bad, nouser = [await replies.get(r) for r in ("r-unknown", "r-bad", "r-nouser")]
    assert unknown.error and unknown.error.code == "unknown_type"
    assert bad.error and bad.error.code == "bad_request"
    assert nouser.error and nouser.error.code == "bad_request"
    dead = await wait_until(lambda: _dead(mesh, 4), message="four dead letters")
    assert {d["reason"] for d in dead} == {"unknown_type", "invalid", "invalid_json"}



async def _dead(mesh: Mesh, n: int) -> list[dict[str, str]] | None:
    dead = await mesh.dead(mesh.names.memory_requests)
    return dead if len(dead) >= n else None
