"""Isolation as a property (issue "Never loses, never leaks", part 4): no read returns another user's data.

Users, some with hostile ids (``*``, ``%``, quotes, 256 characters), each tell similar facts in two sessions,
every fact tagged with a marker of its owner (``zq<owner>x<n>``). The histories go in through memory's
``import_messages`` and are ingested by ltm. Then random reads over the bus, from those users and from forged
requesters (another user's session id or message id used as a user id): ltm searches (for another user's marker
too, scoped to another user's session, excluding one), entity searches, profiles, document searches (each user holds
one document with its markers) and deletions of another user's document by its id; memory session, message,
STM, context, summary and session-list reads naming the requester's own or another user's session. A response may
carry only the requester's own markers; a forged requester owns nothing, so any marker in its replies is a leak.
(Ids are stripped of surrounding whitespace by the contract: ``" *"`` is the user ``"*"``.)

``ISOLATION_READS`` sets how many (default 4,000 in `make test`; `make chaos` reads 10,000).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from typing import Any

from shared.contracts import LTM_REQUEST, LTM_RESPONSE, MEMORY_RESPONSE, LTMResponse, MemoryResponse, decode, new_id
from shared.contracts.memory_api import MEMORY_REQUEST
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from tests.helpers import Mesh, running, wait_until

READS = int(os.environ.get("ISOLATION_READS", "4000"))
USERS = ["iso-alice", "iso-bob", "*", "%", "o'brien", 'q"uote', "u" * 256]
CITIES = ["Lisbon", "Porto", "Braga", "Faro", "Évora", "Coimbra", "Sintra"]
MARK = re.compile(r"zq(\d+)x")


def history(i: int, user: str) -> list[dict[str, Any]]:
    out = []
    for s in range(2):
        for k in range(3):
            out.append({"session_id": f"{user[:40]}-s{s}", "role": "user" if k != 1 else "assistant",
                        "content": f"My note zq{i}x{s}{k}: I keep a blue kite in {CITIES[i]} and my sister "
                                   f"visits on Sundays.", "timestamp": 1.7e9 + i * 1000 + s * 100 + k})
    return out


async def test_random_reads_from_users_and_forged_ids_never_return_another_users_data(mesh: Mesh) -> None:
    n = mesh.names
    memory_rpc: RpcClient[MemoryResponse] = RpcClient(
        mesh.redis, queue=n.memory_requests, reply_channel=n.reply_channel(n.memory_responses, "iso"),
        adapter=MEMORY_RESPONSE, metrics=Metrics())
    ltm_rpc: RpcClient[LTMResponse] = RpcClient(
        mesh.redis, queue=n.ltm_requests, reply_channel=n.reply_channel(n.ltm_responses, "iso"),
        adapter=LTM_RESPONSE, metrics=Metrics())

    async def memory(type_: str, user: str, **data: Any) -> MemoryResponse:
        req = decode(MEMORY_REQUEST, json.dumps({"request_id": new_id(), "type": type_, "user_id": user,
                                                 "data": data}))
        return await memory_rpc.call(req, 30)  # type: ignore[arg-type]

    async def ltm(type_: str, user: str, **data: Any) -> LTMResponse:
        req = decode(LTM_REQUEST, json.dumps({"request_id": new_id(), "type": type_, "user_id": user, "data": data}))
        return await ltm_rpc.call(req, 30)  # type: ignore[arg-type]

    async with running(mesh.memory()), running(mesh.ltm()):
        await memory_rpc.start()
        await ltm_rpc.start()
        try:
            for i, user in enumerate(USERS):
                resp = await memory("import_messages", user, messages=history(i, user))
                assert resp.success and (resp.data or {})["imported"] == 6, resp.error

            async def ingested() -> int | None:
                done = await mesh.count("SELECT count(DISTINCT user_id) FROM ltm_ingested")
                return done if done == len(USERS) and await mesh.count(
                    "SELECT count(*) FROM ltm_ingested") >= 6 * len(USERS) else None

            await wait_until(ingested, timeout=90, message="every user's history ingested")
            doc_ids: dict[str, str] = {}
            for i, user in enumerate(USERS):
                added = await ltm("doc_add", user, source="field-notes.md", text=(
                    f"# Field notes\n\n## Kites\n\nNote zq{i}x9: the blue kite flies over {CITIES[i]}.\n\n"
                    f"## Sundays\n\nNote zq{i}x8: my sister visits on Sundays."))
                assert added.success and added.data, added.error
                doc_ids[user] = added.data["doc_id"]
            sessions = {u: [f"{u[:40]}-s0", f"{u[:40]}-s1"] for u in USERS}
            message_ids: dict[str, list[str]] = {}
            for u in USERS:
                got = await memory("get_messages", u, session_id=sessions[u][0])
                message_ids[u] = [m["message_id"] for m in (got.data or {})["messages"]]
                assert len(message_ids[u]) == 3
            forged = [sessions[USERS[0]][0], message_ids[USERS[1]][0], "iso-%", "is_-alice", "*-s0", " *",
                      "iso-alice' OR '1'='1", "x" * 256]
            requesters = [*USERS, *forged]
            rng = random.Random(11)

            async def one_read(k: int) -> tuple[str, str, set[int]]:
                who = rng.choice(requesters)
                # half the time the requester's own session (it must be found), else anyone's (it must not)
                other = who.strip() if who.strip() in USERS and rng.random() < 0.5 else rng.choice(USERS)
                session = rng.choice(sessions[other])
                kind = rng.choice(["search", "search_session", "search_exclude", "entities", "profile",
                                   "get_session", "get_messages", "get_stm", "get_context", "summary",
                                   "sessions", "doc_search", "doc_delete"])
                mark = f"zq{USERS.index(other)}x0"
                resp: Any
                if kind == "search":
                    resp = await ltm("search", who, query=rng.choice([f"{mark} kite", "Where is my kite?",
                                                                     "sister Sundays", "*", "%"]), limit=10)
                elif kind == "search_session":
                    resp = await ltm("search", who, query="blue kite", session_id=session, limit=10)
                elif kind == "search_exclude":
                    resp = await ltm("search", who, query="kite city", exclude_session_id=session, limit=10)
                elif kind == "entities":
                    resp = await ltm("search_entities", who, query=CITIES[USERS.index(other)])
                elif kind == "profile":
                    resp = await ltm("profile_get", who)
                elif kind == "doc_search":
                    resp = await ltm("doc_search", who, query=rng.choice([f"{mark} kite", "Where does the kite fly?",
                                                                         "sister Sundays", "*", "%"]), top_k=10)
                elif kind == "doc_delete":  # another user's document by its id: not_found, and it stays
                    target = rng.choice([u for u in USERS if u != who.strip()])
                    resp = await ltm("doc_delete", who, doc_id=doc_ids[target])
                    if resp.success or not resp.error or resp.error.code != "not_found":
                        raise AssertionError(f"doc_delete of another user's document: {resp.model_dump_json()}")
                elif kind == "get_session":
                    resp = await memory("get_session", who, session_id=session)
                elif kind == "get_messages":
                    resp = await memory("get_messages", who, session_id=session)
                elif kind == "get_stm":
                    resp = await memory("get_stm", who, session_id=session)
                elif kind == "get_context":
                    resp = await memory("get_context", who, session_id=session)
                elif kind == "summary":
                    resp = await memory("get_session_summary", who, session_id=session)
                else:
                    resp = await memory("get_user_sessions", who)
                text = resp.model_dump_json()
                if other == who.strip() and resp.success is False and kind.startswith("get_"):
                    raise AssertionError(f"{kind} of the user's own session failed: {text[:300]}")
                return who, kind, {int(x) for x in MARK.findall(text)}

            leaks: list[str] = []
            own_hits = 0
            for start in range(0, READS, 16):
                for who, kind, marks in await asyncio.gather(*(one_read(k) for k in range(start,
                                                                                         min(READS, start + 16)))):
                    owner = who.strip()  # ids are stripped by the contract (Id): " *" is the user "*"
                    mine = {USERS.index(owner)} if owner in USERS else set()
                    if marks - mine:
                        leaks.append(f"{kind} by {who[:40]!r} saw {sorted(marks - mine)}")
                    own_hits += bool(marks & mine)
            print(f"isolation: {READS} reads from {len(requesters)} requesters, {own_hits} returned the "
                  f"requester's own data, {len(leaks)} leaks")
            assert not leaks, f"{len(leaks)} reads returned another user's data: {leaks[:10]}"
            assert own_hits > READS // 10, "the reads hardly ever found the requester's own data: a vacuous test"
            assert await mesh.count("SELECT count(*) FROM ltm_documents") == len(USERS)  # no deletion got through
        finally:
            await ltm_rpc.close()
            await memory_rpc.close()
