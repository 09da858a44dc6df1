"""Redis ACLs (issue "Never loses, never leaks", security): each service as its own least-privilege user.

A Redis of the test's own starts with the ACL file mesh/acl.py writes (random passwords, the test's key prefix).
The three services run, each logged in as its own user, and do their whole job: a fact told in one session is
answered from long-term memory in another, a memory request is served, a user is deleted everywhere. Then each
user is refused what is not its job (forging another service's stream, reading the STM it has no business
with, admin commands), and the default user is off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from mesh.acl import USERS, acl_file, random_passwords
from mesh.forget import forget_user
from mesh.redis_server import RedisServer
from services.chat_ai.config import ChatSettings
from services.chat_ai.service import ChatService
from services.ltm.config import LtmSettings
from services.ltm.service import LtmService, build_backend
from services.memory.config import MemorySettings
from services.memory.service import MemoryService
from services.memory.store import ConversationStore
from shared.contracts import AI_RESPONSE, MEMORY_RESPONSE, MemoryResponse, Names, UserInput, decode, encode, new_id
from shared.contracts.memory_api import MEMORY_REQUEST
from shared.runtime.db import open_pool
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from tests.helpers import common, running, wait_until


@asynccontextmanager
async def acl_redis(tmp_path: Path, names: Names) -> AsyncIterator[tuple[RedisServer, dict[str, str]]]:
    passwords = random_passwords()
    path = tmp_path / "users.acl"
    path.write_text(acl_file(names, passwords))
    server = RedisServer(tmp_path / "redis", persist=False, acl_file=path, admin=("admin", passwords["admin"]))
    server.start()
    try:
        yield server, passwords
    finally:
        server.stop()


def services_as_users(server: RedisServer, passwords: dict[str, str], clients: dict[str, aioredis.Redis], n: Names,
                      database_url: str, pool: Any, model: Any) -> tuple[MemoryService, LtmService, ChatService]:
    """memory, ltm and chat_ai, each logged in as its own Redis user."""
    def url(user: str) -> str:
        return server.url_as(user, passwords[user])

    mem_s = MemorySettings(**common(url("memory"), database_url))
    ltm_s = LtmSettings(**common(url("ltm"), database_url))
    chat_s = ChatSettings(**common(url("chat_ai"), database_url))
    return (MemoryService(mem_s, n, clients["memory"], ConversationStore(pool)),
            LtmService(ltm_s, n, clients["ltm"], build_backend(ltm_s, pool, model, clients["ltm"], n)),
            ChatService(chat_s, n, clients["chat_ai"], None))


async def refused(client: aioredis.Redis, *command: str) -> bool:
    try:
        await client.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        return "NOPERM" in str(exc)
    return False


async def test_each_service_does_its_job_as_its_own_user_and_nothing_else(
        tmp_path: Path, names: Names, database_url: str, sync_embedder) -> None:  # type: ignore[no-untyped-def]
    n = names
    async with acl_redis(tmp_path, n) as (server, passwords):
        clients = {u: aioredis.Redis.from_url(server.url_as(u, passwords[u])) for u in USERS}
        admin = clients["admin"]
        pool = await open_pool(database_url, max_size=8)
        try:
            # the mesh at work, each service with its own user
            memory, ltm, chat = services_as_users(server, passwords, clients, n, database_url, pool, sync_embedder)
            async with running(memory), running(ltm), running(chat):
                async def say(text: str, session: str) -> str:
                    msg = UserInput(message_id=new_id(), user_id="u-acl", session_id=session, content=text)
                    await admin.xadd(n.user_input, {"data": encode(msg)})

                    async def reply() -> str | None:
                        for _, f in await admin.xrange(n.ai_responses):
                            r = decode(AI_RESPONSE, f[b"data"])
                            if r.in_reply_to == msg.message_id:
                                return f"{r.meta.ltm}|{r.content}"
                        return None

                    got: str = await wait_until(reply, timeout=30, message="a reply under ACLs")
                    return got

                await say("My sister Ottilie lives in Lisbon.", "acl-1")

                async def ingested() -> bool:
                    async with pool.connection() as conn:
                        cur = await conn.execute("SELECT count(*) FROM ltm_ingested WHERE user_id = 'u-acl'")
                        row = await cur.fetchone()
                    return bool(row and row[0] >= 1)

                await wait_until(ingested, timeout=30, message="the fact ingested under ACLs")
                answer = await say("Where does my sister live?", "acl-2")
                assert answer.startswith("hit|") and "Lisbon" in answer, answer

                rpc: RpcClient[MemoryResponse] = RpcClient(
                    admin, queue=n.memory_requests, reply_channel=n.reply_channel(n.memory_responses, "acl"),
                    adapter=MEMORY_RESPONSE, metrics=Metrics())
                await rpc.start()
                try:
                    req = decode(MEMORY_REQUEST, json.dumps({"request_id": new_id(), "type": "get_messages",
                                                             "user_id": "u-acl", "data": {"session_id": "acl-1"}}))
                    resp = await rpc.call(req, 20)  # type: ignore[arg-type]
                    assert resp.success and len((resp.data or {})["messages"]) == 2, resp.error
                finally:
                    await rpc.close()
                deleted = await forget_user(admin, n, "u-acl")
                assert deleted["memory"]["rows"]["conversation_messages"] == 4, deleted
                assert deleted["ltm"]["rows"]["ltm_memories"] >= 1, deleted
                for service in (memory, ltm, chat):  # nothing was refused along the way
                    assert service.metrics.get("handler_errors") == 0 and service.metrics.get("task_errors") == 0

            # and nothing beyond: forging another's stream, reading what is not theirs, admin commands
            mem, lt, ch = clients["memory"], clients["ltm"], clients["chat_ai"]
            stm = n.stm_turns("acl-1")
            checks = {
                "ltm XADD ai_responses": await refused(lt, "XADD", n.ai_responses, "*", "data", "{}"),
                "ltm XADD user_input": await refused(lt, "XADD", n.user_input, "*", "data", "{}"),
                "ltm reads the STM": await refused(lt, "ZRANGE", stm, "0", "-1"),
                "ltm RPUSH memory_requests": await refused(lt, "RPUSH", n.memory_requests, "{}"),
                "chat_ai XADD memory_updates": await refused(ch, "XADD", n.memory_updates, "*", "data", "{}"),
                "chat_ai writes the STM": await refused(ch, "ZADD", stm, "1", "x"),
                "chat_ai deletes the STM": await refused(ch, "DEL", stm),
                "chat_ai reads the cache": await refused(ch, "GET", n.cache("memory", "x")),
                "memory XADD ai_responses": await refused(mem, "XADD", n.ai_responses, "*", "data", "{}"),
                "memory RPUSH ltm_requests": await refused(mem, "RPUSH", n.ltm_requests, "{}"),
                "memory PUBLISH ltm_responses": await refused(mem, "PUBLISH", n.ltm_responses, "{}"),
                "memory reads ltm's lock": await refused(mem, "GET", n.lock("ltm", "optimize", "u")),
            }
            for user, client in (("memory", mem), ("ltm", lt), ("chat_ai", ch)):
                checks[f"{user} FLUSHALL"] = await refused(client, "FLUSHALL")
                checks[f"{user} CONFIG GET"] = await refused(client, "CONFIG", "GET", "*")
                checks[f"{user} KEYS"] = await refused(client, "KEYS", "*")
                checks[f"{user} ACL LIST"] = await refused(client, "ACL", "LIST")
            print("acl refusals:", json.dumps(checks))
            assert all(checks.values()), [k for k, v in checks.items() if not v]
            anonymous = aioredis.Redis.from_url(server.url_as("default", "nopass").replace("default:nopass@", ""))
            with pytest.raises(redis.exceptions.AuthenticationError):
                await anonymous.ping()
            await anonymous.aclose()
        finally:
            await pool.close()
            for c in clients.values():
                await c.aclose()


async def test_the_gateway_serves_http_as_its_own_user_and_nothing_else(
        tmp_path: Path, names: Names, database_url: str, sync_embedder) -> None:  # type: ignore[no-untyped-def]
    """``python -m services.gateway`` logged in as ``gateway``: chat with memory, search, the bus's status and a
    deletion over HTTP work; forging a service's stream or reply, reading the STM or the cache, taking requests
    off a service's list and admin commands are refused."""
    import asyncio
    import os
    import sys

    import httpx

    from mesh.infra import free_port
    from tests.conftest import ROOT

    n = names
    key = "acl-admin-key"
    async with acl_redis(tmp_path, n) as (server, passwords):
        clients = {u: aioredis.Redis.from_url(server.url_as(u, passwords[u])) for u in USERS}
        pool = await open_pool(database_url, max_size=8)
        port = free_port()
        env = {**os.environ, "REDIS_URL": server.url_as("gateway", passwords["gateway"]), "MESH_KEY_PREFIX": n.prefix,
               "GATEWAY_PORT": str(port), "GATEWAY_API_KEYS": f"{key}=admin", "GATEWAY_TIMEOUT_S": "20",
               "LOG_FORMAT": "json"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.gateway", cwd=ROOT, env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            memory, ltm, chat = services_as_users(server, passwords, clients, n, database_url, pool, sync_embedder)
            headers = {"Authorization": f"Bearer {key}"}
            async with running(memory), running(ltm), running(chat), \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as c:
                async def healthy() -> bool:
                    if proc.returncode is not None:
                        err = await proc.stderr.read() if proc.stderr else b""
                        raise AssertionError(f"the gateway exited {proc.returncode}: {err[-2000:]!r}")
                    try:
                        return (await c.get("/api/v1/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_until(healthy, timeout=60, interval=0.2, message="the gateway's health 200 under ACLs")
                first = await c.post("/v1/chat", json={"user_id": "u-gw",
                                                       "content": "My sister Ottilie lives in Lisbon."})
                assert first.status_code == 200, first.text

                async def ingested() -> bool:
                    async with pool.connection() as conn:
                        cur = await conn.execute("SELECT count(*) FROM ltm_ingested WHERE user_id = 'u-gw'")
                        row = await cur.fetchone()
                    return bool(row and row[0] >= 1)

                await wait_until(ingested, timeout=30, message="the fact ingested under ACLs")
                second = await c.post("/v1/chat", json={"user_id": "u-gw", "content": "Where does my sister live?"})
                assert second.status_code == 200 and second.json()["ltm"] == "hit", second.text
                assert "Lisbon" in second.json()["reply"]
                found = await c.post("/api/v1/memories/u-gw/search", params={"query": "sister", "top_k": 5})
                assert found.status_code == 200 and found.json()["memories"], found.text
                status = await c.get("/memory/status")
                assert status.status_code == 200, status.text
                deleted = await c.delete("/memory/user/u-gw")
                assert deleted.status_code == 200, deleted.text
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-gw'")
                    assert (await cur.fetchone()) == (0,)
                # no stream entry of the user is left, though the gateway's user could not sweep them itself
                from shared.runtime.erase import mesh_streams

                left = {s: len([1 for _, f in await clients["admin"].xrange(s) if b"u-gw" in b"".join(f.values())])
                        for s in mesh_streams(n)}
                assert not any(left.values()), left
                for service in (memory, ltm, chat):
                    assert service.metrics.get("handler_errors") == 0 and service.metrics.get("task_errors") == 0

            gw = clients["gateway"]
            checks = {
                "gateway XADD ai_responses": await refused(gw, "XADD", n.ai_responses, "*", "data", "{}"),
                "gateway XADD memory_updates": await refused(gw, "XADD", n.memory_updates, "*", "data", "{}"),
                "gateway PUBLISH ltm_responses": await refused(gw, "PUBLISH", f"{n.ltm_responses}:x", "{}"),
                "gateway BLPOP ltm_requests": await refused(gw, "BLPOP", n.ltm_requests, "1"),
                "gateway XREADGROUP user_input": await refused(gw, "XREADGROUP", "GROUP", n.chat_group, "x",
                                                               "STREAMS", n.user_input, ">"),
                "gateway XRANGE user_input": await refused(gw, "XRANGE", n.user_input, "-", "+"),
                "gateway reads the STM": await refused(gw, "ZRANGE", n.stm_turns("s"), "0", "-1"),
                "gateway reads the cache": await refused(gw, "GET", n.cache("memory", "x")),
                "gateway FLUSHALL": await refused(gw, "FLUSHALL"),
                "gateway KEYS": await refused(gw, "KEYS", "*"),
                "gateway CONFIG GET": await refused(gw, "CONFIG", "GET", "*"),
            }
            print("gateway acl refusals:", json.dumps(checks))
            assert all(checks.values()), [k for k, v in checks.items() if not v]
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
            await pool.close()
            for cl in clients.values():
                await cl.aclose()
