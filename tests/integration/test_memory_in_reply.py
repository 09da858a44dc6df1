"""The product path from a user's history to the reply: what is indexed, how it ranks, what the prompt holds."""

from __future__ import annotations

from services.chat_ai.prompt import MEMORY_HEADER, count_tokens
from shared.contracts import AIResponse
from shared.runtime.llm import chat_model
from tests.fake_llm import fake_llm
from tests.helpers import Mesh, ask_ltm, ltm_request, running, wait_until

DAY = 86_400.0


def quotes(reply: AIResponse) -> list[str]:
    """The lines where the offline responder quotes a memory."""
    return [line for line in reply.content.splitlines() if line.startswith("- (")]


async def ingested(mesh: Mesh, user_id: str, n: int) -> None:
    async def count() -> int:
        return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user_id)

    last: list[int] = []

    async def enough() -> bool:
        last.append(await count())
        return last[-1] >= n

    try:
        await wait_until(enough, timeout=30)
    except AssertionError:
        raise AssertionError(f"{n} updates ingested for {user_id}: last saw {last[-1:]}") from None


async def test_a_fact_told_once_is_quoted_in_every_later_session(mesh: Mesh) -> None:
    """The issue's redis-cli flow: the fact wins over the user's own earlier question and the assistant's echoes."""
    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
        fact = await mesh.send("My sister Ottilie lives in Lisbon and I love teal sailboats.", user_id="u-o",
                               session_id="s1")
        await mesh.reply_to(fact)
        await ingested(mesh, "u-o", 1)
        for n, session in enumerate(("s2", "s3", "s4"), start=1):
            ask = await mesh.send("Where does my sister live?", user_id="u-o", session_id=session)
            reply = await mesh.reply_to(ask)
            assert reply.meta.ltm == "hit", reply
            lines = quotes(reply)
            assert lines and "Ottilie lives in Lisbon" in lines[0], reply.content
            assert not any("Where does my sister live?" in line for line in lines), reply.content
            assert not any("offline responder" in line for line in lines), reply.content
            await ingested(mesh, "u-o", 1 + n)  # each question is a memory too; the offline replies are not
    # only user turns were indexed: offline replies only repeat
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = 'u-o' AND meta->>'role' = 'ai'") == 0


async def test_search_ranks_the_users_statement_above_questions_and_the_assistant(mesh: Mesh) -> None:
    user, t0 = "u-rank", 1_700_000_000.0
    async with running(mesh.ltm()):
        turns = [
            ("user", "s1", "I'm allergic to peanuts and my dog is called Biscuit."),
            ("ai", "s1", "Noted: your dog is called Biscuit, and you are allergic to peanuts."),
            ("user", "s2", "What is my dog called?"),
            ("ai", "s2", "Your dog is called Biscuit."),
        ]
        for i, (source, session, text) in enumerate(turns):
            await mesh.redis.xadd(mesh.names.memory_updates, {"data": (
                f'{{"user_id": "{user}", "content": "{text}", "source": "{source}", "timestamp": {t0 + i * DAY},'
                f' "meta": {{"session_id": "{session}", "message_id": "m{i}"}}}}')})
        await ingested(mesh, user, len(turns))
        resp = await ask_ltm(mesh, ltm_request("search", user, {"query": "What is my dog called?", "limit": 4,
                                                                "exclude_session_id": "s3"}))
        assert resp.success
        order = [m.source.message_id for m in resp.memories]
        assert order[0] == "m0", [(m.content, m.score) for m in resp.memories]
        # asked about the assistant's own words, its turns are not held back
        resp = await ask_ltm(mesh, ltm_request("search", user, {"query": "What did you say my dog is called?",
                                                                "limit": 4}))
        assert {"m1", "m3"} & {m.source.message_id for m in resp.memories[:2]}
        # the current session is left out on request (the STM already holds it)
        resp = await ask_ltm(mesh, ltm_request("search", user, {"query": "dog Biscuit", "limit": 10,
                                                                "exclude_session_id": "s1"}))
        assert resp.memories and all(m.source.session_id != "s1" for m in resp.memories)
        assert all(c.message_id not in ("m0", "m1") for m in resp.memories for c in m.context)


async def test_the_llm_prompt_holds_one_labelled_bounded_memory_block(mesh: Mesh) -> None:
    user = "u-block"
    with fake_llm(lambda body: "ok") as (base_url, seen):
        llm = chat_model(None, base_url, "fake-model")
        async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat(llm=llm, ltm_prompt_tokens=300)):
            for i in range(8):
                told = await mesh.send(f"Fact number {i}: I keep {i + 2} tortoises in the garden shed.",
                                       user_id=user, session_id=f"old-{i}", timestamp=1_690_000_000.0 + i * DAY)
                await mesh.reply_to(told)
            await ingested(mesh, user, 16)  # inputs and the fake model's replies
            here = await mesh.send("I have one tortoise in this session.", user_id=user, session_id="now")
            await mesh.reply_to(here)
            ask = await mesh.send("How many tortoises do I keep?", user_id=user, session_id="now",
                                  timestamp=1_700_000_000.0)
            reply = await mesh.reply_to(ask)
    assert reply.meta.ltm == "hit" and reply.meta.memories_used >= 1
    prompt = next(r["messages"] for r in seen if r["messages"][-1]["content"] == "How many tortoises do I keep?")
    blocks = [m["content"] for m in prompt if m["role"] == "system" and m["content"].startswith(MEMORY_HEADER)]
    assert len(blocks) == 1
    block = blocks[0]
    assert count_tokens(block) <= 300
    lines = block.splitlines()[1:]
    assert lines and all(", user: " in line or ", assistant: " in line for line in lines), block
    assert all(line[2:12].count("-") == 2 for line in lines), block  # each line starts with its date
    assert len(set(lines)) == len(lines)
    assert "one tortoise in this session" not in block  # the current session comes from the STM, not ltm
