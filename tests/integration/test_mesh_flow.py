"""End to end through the real bus: the three services, real Redis, real PostgreSQL + pgvector."""

from __future__ import annotations

from tests.helpers import Mesh, ask_ltm, ltm_request, running, wait_until


async def ingested(mesh: Mesh, user_id: str, n: int) -> None:
    await wait_until(lambda: _count_ingested(mesh, user_id, n), message=f"{n} updates ingested for {user_id}")


async def _count_ingested(mesh: Mesh, user_id: str, n: int) -> bool:
    return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user_id) >= n


async def test_user_turn_gets_a_reply_and_is_stored(mesh: Mesh) -> None:
    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
        msg = await mesh.send("Hello there, my name is Ada.", user_id="u-a", session_id="s-a")
        reply = await mesh.reply_to(msg)
        assert reply.session_id == "s-a" and reply.user_id == "u-a"
        assert reply.meta.model == "offline" and "offline responder" in reply.content
        assert reply.meta.ltm in ("hit", "miss")
        # both the input and the reply are stored, in order, and in STM
        await wait_until(lambda: _stored(mesh, "s-a", 2), message="both messages stored")
        roles = await _roles(mesh, "s-a")
        assert roles == ["human", "ai"]


async def _count_is(mesh: Mesh, sql: str, n: int, *params: object) -> bool:
    return await mesh.count(sql, *params) == n


async def _stored(mesh: Mesh, session_id: str, n: int) -> bool:
    return await mesh.count("SELECT count(*) FROM conversation_messages WHERE session_id = %s", session_id) >= n


async def _roles(mesh: Mesh, session_id: str) -> list[str]:
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT role FROM conversation_messages WHERE session_id = %s ORDER BY message_index", (session_id,))
        return [r[0] for r in await cur.fetchall()]


async def test_fact_from_session_one_is_recalled_in_a_later_session(mesh: Mesh) -> None:
    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
        fact = await mesh.send("I live in Lisbon and I work as a marine biologist.", user_id="u-b", session_id="s1")
        await mesh.reply_to(fact)
        await ingested(mesh, "u-b", 1)  # the input (the offline reply is never a memory)
        question = await mesh.send("Where do I live?", user_id="u-b", session_id="s2")
        reply = await mesh.reply_to(question)
        assert reply.meta.ltm == "hit"
        assert reply.meta.memories_used >= 1
        assert "Lisbon" in reply.content


async def test_search_over_the_bus_returns_the_users_memory(mesh: Mesh) -> None:
    async with running(mesh.memory()), running(mesh.ltm()):
        await mesh.send("My favourite colour is teal.", user_id="u-c", session_id="s1")
        await ingested(mesh, "u-c", 1)
        resp = await ask_ltm(mesh, ltm_request("search", "u-c", {"query": "what colour do I like?"}))
        assert resp.success and resp.memories and "teal" in resp.memories[0].content
        assert resp.memories[0].source.session_id == "s1"



async def test_another_users_session_id_never_shows_that_session(mesh: Mesh) -> None:
    """A session id is not a secret: an input of user B (or one without a user) naming A's session gets a reply
    built without A's short-term memory."""
    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
        secret = await mesh.send("My bank PIN is PIN3272c9, keep it safe.", user_id="u-owner", session_id="s-own")
        await mesh.reply_to(secret)
        await wait_until(lambda: _stored(mesh, "s-own", 2), message="the owner's turn and reply stored")
        for intruder in ("u-intruder", None):
            probe = await mesh.send("What was my last message before this one?", user_id=intruder,
                                    session_id="s-own")
            reply = await mesh.reply_to(probe)
            assert "PIN3272c9" not in reply.content, (intruder, reply.content)
        # the session's turns and summary left in Redis without their meta (whose user_id names the owner), as a
        # summary written after the session's keys expired leaves them: nobody may read them, not even by guessing
        await mesh.redis.delete(mesh.names.stm_meta("s-own"))
        probe = await mesh.send("What was my last message before this one?", user_id="u-intruder", session_id="s-own")
        reply = await mesh.reply_to(probe)
        assert "PIN3272c9" not in reply.content, reply.content
        # the owner still gets the session's own short-term memory (rebuilt by memory, which checks the owner)
        again = await mesh.send("What was my last message before this one?", user_id="u-owner", session_id="s-own")
        assert "PIN3272c9" in (await mesh.reply_to(again)).content


async def test_another_users_message_id_is_that_users_own_message(mesh: Mesh) -> None:
    """A message id another user's message already has: message ids are per user (the tables are partitioned by
    user, docs/partitioning.md), so B's turn is B's own message: answered, stored in B's session and ingested for B,
    never dropped as a redelivery nor dead-lettered; A's message is untouched."""
    from shared.contracts import UserInput, encode

    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
        first = await mesh.send("I keep my spare key under the blue pot.", user_id="u-first", session_id="s-first")
        await mesh.reply_to(first)
        await wait_until(lambda: _stored(mesh, "s-first", 2), message="the first user's turn and reply stored")
        reused = UserInput(message_id=first.message_id, user_id="u-second", session_id="s-second",
                           content="Where do I keep my spare key?")
        await mesh.redis.xadd(mesh.names.user_input, {"data": encode(reused)})

        async def second_reply() -> bool:
            return any(r.user_id == "u-second" and r.in_reply_to == first.message_id for r in await mesh.replies())

        await wait_until(second_reply, message="a reply to the second user's turn")
        await wait_until(lambda: _stored(mesh, "s-second", 2), message="the second user's turn and reply stored")
        await wait_until(lambda: _count_is(mesh, "SELECT count(*) FROM ltm_ingested WHERE user_id = %s AND"
                                                 " message_id = %s", 1, "u-second", first.message_id),
                         message="the second user's turn ingested for that user")
        reply = next(r for r in await mesh.replies() if r.user_id == "u-second")
        assert "blue pot" not in reply.content
        sql = "SELECT count(*) FROM conversation_messages WHERE message_id = %s AND user_id = %s AND session_id = %s"
        assert await mesh.count(sql, first.message_id, "u-first", "s-first") == 1
        assert await mesh.count(sql, first.message_id, "u-second", "s-second") == 1
        assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE message_id = %s AND content ="
                                " 'I keep my spare key under the blue pot.'", first.message_id) == 1
        assert await mesh.dead(mesh.names.user_input) == []
