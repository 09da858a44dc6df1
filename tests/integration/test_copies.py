"""Every service as two copies at once (issue "Fast at any size", part 3): what one copy does, two do together.

Two memory, two ltm and two chat_ai services share the bus (consumer groups, one consumer name each) and the
database. Many users chat at once, in several sessions each: every input gets exactly one reply, every input and
reply is stored exactly once, every input is ingested exactly once, and no turn becomes two memories.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from tests.helpers import Mesh, running, wait_until

USERS = 6
SESSIONS = 2
TURNS = 4  # per session


async def test_two_copies_of_every_service_lose_nothing_and_do_nothing_twice(mesh: Mesh) -> None:
    memories = [mesh.memory(consumer_name=f"memory-{i}") for i in range(2)]
    ltms = [mesh.ltm(consumer_name=f"ltm-{i}") for i in range(2)]
    chats = [mesh.chat(consumer_name=f"chat-{i}") for i in range(2)]
    async with AsyncExitStack() as stack:
        for service in (*memories, *ltms, *chats):
            await stack.enter_async_context(running(service))

        async def converse(user: int) -> list[str]:
            sent = []
            for s in range(SESSIONS):
                for t in range(TURNS):
                    msg = await mesh.send(f"Turn {t} of session {s}: my item number {user * 100 + s * 10 + t} "
                                          f"is a blue kite.", user_id=f"u-copy-{user}", session_id=f"s-copy-{user}-{s}")
                    await mesh.reply_to(msg, timeout=60)  # a user waits for the reply before the next turn
                    sent.append(msg.message_id)
            return sent

        inputs = [m for sent in await asyncio.gather(*(converse(u) for u in range(USERS))) for m in sent]
        total = USERS * SESSIONS * TURNS
        assert len(set(inputs)) == total

        async def all_stored() -> bool:
            return await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'u-copy-%%'") \
                >= 2 * total

        async def all_ingested() -> bool:
            return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id LIKE 'u-copy-%%'") >= total

        await wait_until(all_stored, timeout=60, message=f"{2 * total} messages stored")
        await wait_until(all_ingested, timeout=120, message=f"{total} updates ingested")

    replies = [r for r in await mesh.replies() if r.user_id and r.user_id.startswith("u-copy-")]
    per_input: dict[str, int] = {}
    for r in replies:
        per_input[r.in_reply_to] = per_input.get(r.in_reply_to, 0) + 1
    assert set(per_input) == set(inputs), "an input without a reply"
    assert max(per_input.values()) == 1, "an input answered twice"
    # stored exactly once: one row per message id, the inputs and the replies
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'u-copy-%%'") == 2 * total
    assert await mesh.count("SELECT count(DISTINCT message_id) FROM conversation_messages"
                            " WHERE user_id LIKE 'u-copy-%%'") == 2 * total
    # ingested exactly once, one episodic memory per input (offline replies are never memories)
    assert await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id LIKE 'u-copy-%%'") == total
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id LIKE 'u-copy-%%'"
                            " AND type = 'episodic'") == total
    assert await mesh.count("SELECT count(*) FROM (SELECT source_message_id FROM ltm_memories"
                            " WHERE user_id LIKE 'u-copy-%%' AND type = 'episodic'"
                            " GROUP BY source_message_id HAVING count(*) > 1) d") == 0
    # both copies of each service did work (the test would prove nothing with one idle copy)
    assert all(c.metrics.get("updates_published") > 0 for c in memories), [c.metrics.totals for c in memories]
    assert all(c.metrics.get("ingested") > 0 for c in ltms), [c.metrics.totals for c in ltms]
    assert all(sum(n for k, n in c.metrics.totals.items() if k.startswith("replies.")) > 0 for c in chats)


async def test_one_input_sent_four_times_at_once_gets_one_reply(mesh: Mesh) -> None:
    """A client that sends a turn again before the reply (or a replayed dead letter) must not get two replies,
    whether the copies land on one chat_ai process or on two."""
    from shared.contracts import UserInput, encode, new_id

    chats = [mesh.chat(consumer_name=f"chat-dup-{i}", enable_ltm=False) for i in range(2)]
    msg = UserInput(message_id=new_id(), user_id="u-dup", session_id="s-dup", content="Hello, twice over.")
    async with AsyncExitStack() as stack:
        for chat in chats:
            await stack.enter_async_context(running(chat))
        for _ in range(4):
            await mesh.redis.xadd(mesh.names.user_input, {"data": encode(msg)})
        await mesh.reply_to(msg, timeout=30)

        async def all_handled() -> bool:
            return sum(c.metrics.get("duplicate_inputs") for c in chats) == 3

        await wait_until(all_handled, timeout=30, message="the three other copies skipped")
    assert [r.in_reply_to for r in await mesh.replies()].count(msg.message_id) == 1
