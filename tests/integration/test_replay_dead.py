"""``mesh inspect`` and ``mesh replay-dead`` on real dead letters: messages the services refused while their limit
was too small are seen by reason (without their text), re-queued after the fix, handled exactly once, and a second
replay finds nothing to do; ``--tail`` shows the update the replayed input became."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from typing import Any

import redis.asyncio as aioredis

from mesh.inspector import inspect_bus, tail_updates
from mesh.replay import replay
from shared.contracts import USER_INPUT, Names, UserInput, decode, derive_id, encode, new_id
from shared.contracts.ping import PING_RESPONSE
from tests.conftest import ROOT
from tests.helpers import Mesh, Replies, running, wait_until

LONG = "My grandmother's recipe for plum cake starts with a pound of butter and goes on for a while. " * 2


async def test_dead_letters_replayed_after_a_fix_are_handled_once(mesh: Mesh, redis_url: str) -> None:
    names = mesh.names
    small = {"max_content_bytes": 64}
    msg = UserInput(message_id=new_id(), user_id="u-replay", session_id="s-replay", content=LONG)
    store = {"request_id": new_id(), "type": "store_message", "user_id": "u-replay",
             "data": {"session_id": "s-replay", "content": LONG, "message_id": "m-replay-api"}}
    async with running(mesh.memory(**small)), running(mesh.chat(enable_ltm=False, **small)):
        await mesh.redis.xadd(names.user_input, {"data": encode(msg)})
        async with Replies(mesh.redis, names.memory_responses, PING_RESPONSE) as replies:
            await mesh.redis.rpush(names.memory_requests, json.dumps(store))
            refused = await replies.get(store["request_id"])
        assert refused.error is not None and refused.error.code == "bad_request"

        async def both_groups_refused() -> bool:  # memory's group and chat-ai's each dead-letter it
            return len(await mesh.dead(names.user_input)) == 2

        await wait_until(both_groups_refused, message="two dead letters of the long input")
    assert {d["reason"] for d in await mesh.dead(names.user_input)} == {"too_large"}
    assert len(await mesh.dead(names.memory_requests)) == 1
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-replay'") == 0
    bus = await inspect_bus(mesh.redis, names)
    seen = bus["dead_letters"][f"{names.user_input}:dead"]
    assert (seen["length"], seen["by_reason"]) == (2, {"too_large": 2})
    assert {e["group"] for e in seen["newest"]} == {"memory", "chat-ai"} and "plum" not in json.dumps(bus)
    assert bus["dead_letters"][f"{names.memory_requests}:dead"]["by_reason"] == {"too_large": 1}
    shown = await inspect_bus(mesh.redis, names, content=True)
    assert "plum cake" in shown["dead_letters"][f"{names.user_input}:dead"]["newest"][0]["data"]

    # the fix: the default limit (32 KiB); a dry run changes nothing, the CLI is wired
    env = {**os.environ, "REDIS_URL": redis_url, "MESH_KEY_PREFIX": names.prefix}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mesh", "replay-dead", "user_input_queue",
                                                "--dry-run", "--json", cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and json.loads(out)["replayed"] == 2 and json.loads(out)["left"] == 2
    async with running(mesh.memory()), running(mesh.chat(enable_ltm=False)):
        tailed, following = io.StringIO(), asyncio.Event()
        tail = asyncio.create_task(tail_updates(mesh.redis, names, count=1, content=False, out=tailed, as_json=True,
                                                ready=following))
        await asyncio.wait_for(following.wait(), 10)
        first = await replay(mesh.redis, names, "user_input_queue")
        assert (first["replayed"], first["by_reason"], first["left"], first["kind"]) == (2, {"too_large": 2}, 0,
                                                                                        "stream")
        again = await replay(mesh.redis, names, "user_input_queue:dead")
        assert (again["replayed"], again["left"]) == (0, 0)  # idempotent: nothing twice
        api = await replay(mesh.redis, names, f"{names.prefix}memory_requests")
        assert (api["replayed"], api["kind"], api["left"]) == (1, "list", 0)
        reply = await mesh.reply_to(msg, timeout=30)
        assert reply.session_id == "s-replay"
        assert await asyncio.wait_for(tail, 30) == 1
        update = json.loads(tailed.getvalue())
        assert update["user_id"] == "u-replay" and update["chars"] > 0 and "content" not in update

        async def stored() -> bool:
            return await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-replay'") == 3

        await wait_until(stored, message="the input, its reply and the API message stored")
        # the replayed input reached both groups twice (two dead letters): handled once all the same
        assert [r.in_reply_to for r in await mesh.replies()].count(msg.message_id) == 1
        assert await mesh.dead(names.user_input) == []


async def test_a_replay_takes_every_page_and_keeps_the_ids_and_times_first_derived(redis: aioredis.Redis,
                                                                                   names: Names) -> None:
    """More dead letters than a page, of inputs that named no id or time: every one replayed in one run (a page
    once skipped the entry after the last one replayed), as the same message its first delivery made of it."""
    dead = Names.dead(names.user_input)
    first: dict[str, str] = {}  # content -> the entry it first came in
    for i in range(450):
        entry_id = f"{1_700_000_000_000 + i}-0"
        first[f"hello {i}"] = entry_id
        await redis.xadd(dead, {"data": json.dumps({"user_id": "u", "session_id": "s", "content": f"hello {i}"}),
                                "reason": "max_retries", "entry_id": entry_id})
    result = await replay(redis, names, "user_input_queue")
    assert (result["replayed"], result["left"]) == (450, 0)
    entries: Any = await redis.xrange(names.user_input)
    assert len(entries) == 450
    for _id, fields in entries:
        msg = decode(USER_INPUT, fields[b"data"])
        entry_id = first[msg.content]
        assert msg.message_id == derive_id("user_input", entry_id)
        assert msg.timestamp == int(entry_id.split("-")[0]) / 1000
